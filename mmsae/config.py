"""Config loading and validation against config/schema.yaml, with defaults filled.

The same schema serves Snakemake's `validate(config, schema)` and the standalone stage scripts, so a
value means the same thing whichever way a stage is started.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mmsae.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _fill_defaults(instance: Any, schema: dict[str, Any]) -> Any:
    if schema.get("type") == "object" or "properties" in schema:
        if not isinstance(instance, dict):
            return instance
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = _fill_defaults(instance[key], sub)
    return instance


def validate(config: dict[str, Any], source: str | os.PathLike = "config", schema: dict | None = None) -> dict[str, Any]:
    """Fill defaults, then validate; raise InputError naming the offending field."""
    schema = schema or load_schema()
    config = _fill_defaults(copy.deepcopy(config), schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        field = ".".join(str(p) for p in err.absolute_path) or "<root>"
        raise InputError(source, field, err.message)
    return config


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, "file", f"unreadable YAML ({exc.__class__.__name__})") from exc
    return validate(raw, path)


def stage_params(stage: str, params: dict[str, Any] | str | None, source: str = "--params") -> dict[str, Any]:
    """A stage's config slice with defaults filled and validated (JSON string, YAML/JSON file or dict)."""
    if isinstance(params, str):
        text = Path(params).read_text() if os.path.exists(params) else params
        try:  # JSON first: YAML 1.1 reads JSON's 3e-05 as a string
            params = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            try:
                params = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise InputError(source, stage, f"not valid JSON/YAML ({exc})") from exc
    schema = load_schema()
    if stage not in schema["properties"]:
        raise KeyError(stage)
    return validate({stage: params or {}}, source, {"type": "object", "properties": {stage: schema["properties"][stage]}})[stage]


@functools.cache
def execution_keys(stage: str) -> tuple[str, ...]:
    """The stage's keys marked `execution: true` in the schema: they change how its work is cut into
    jobs (shards, parts, launcher), never its result, so they stay out of its folder hash."""
    props = load_schema()["properties"].get(stage, {}).get("properties", {})
    return tuple(key for key, sub in props.items() if sub.get("execution"))


def dumps(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)
