"""Config loading and validation against config/schema.yaml, with defaults filled.

The same schema serves Snakemake's `validate(config, schema)` and the standalone stage scripts, so a
value means the same thing whichever way a stage is started.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

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


def _rule(err: jsonschema.ValidationError) -> str:
    """What a failed schema check asks for, in a few words ('must be >= 1')."""
    v = err.validator_value
    words = {"minimum": f"must be >= {v}", "maximum": f"must be <= {v}", "exclusiveMinimum": f"must be > {v}",
             "exclusiveMaximum": f"must be < {v}", "type": f"must be of type {v}", "minItems": f"needs >= {v} items",
             "enum": "must be one of " + ", ".join(json.dumps(x) for x in v) if isinstance(v, list) else ""}
    if err.validator == "additionalProperties":
        return err.message.replace("Additional properties are not allowed", "unknown key")
    return words.get(err.validator) or err.message


def config_error(config: dict[str, Any], schema: dict | None = None) -> str | None:
    """The first problem of a whole config as one line naming the field and its value
    (`config: train_sae.steps = -5: must be >= 1`), or None when the config is valid."""
    schema = schema or load_schema()
    filled = _fill_defaults(copy.deepcopy(config), schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(filled), key=lambda e: list(e.path))
    if not errors:
        return None
    err = errors[0]
    field = ".".join(str(p) for p in err.absolute_path) or "<root>"
    value = "" if err.validator == "additionalProperties" else f" = {json.dumps(err.instance, default=str)}"
    return f"config: {field}{value}: {_rule(err)}"


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


def section_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A copy of one config section's values with the schema's defaults filled: for sections whose
    entries jsonschema's defaults do not reach (each entry of `pools` has the keys of `sae_data`)."""
    return _fill_defaults(copy.deepcopy(values), load_schema()["properties"][section])


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


def result_keys(stage: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config slice without its execution keys: what the stage's result depends on (folder hashes,
    resume keys)."""
    skip = execution_keys(stage)
    return {k: v for k, v in values.items() if k not in skip}


def dumps(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


# --- typed stage params -------------------------------------------------------------------------------
# Each stage's config slice travels as a frozen dataclass of mmsae.params, generated from the schema by
# `render_params_module` (`make params`); tests/test_config.py fails when the two disagree. The schema
# stays the one source of every name, type, default and description, and jsonschema stays the one
# validator: the classes add attribute access and static types, not a second set of rules.


@dataclasses.dataclass(frozen=True)
class StageParams:
    """A validated, default-filled config slice; `STAGE` names its schema section."""

    STAGE: ClassVar[str] = ""
    NESTED: ClassVar[dict[str, type[StageParams]]] = {}

    @classmethod
    def load(cls, raw: dict[str, Any] | str | None = None, source: str = "--params") -> Self:
        """Fill defaults from the schema, validate, and type a JSON/YAML string, file or dict."""
        return cls.from_dict(stage_params(cls.STAGE, raw, source))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """From an already validated slice (every key present, as `stage_params` returns it)."""
        return cls(**{k: cls.NESTED[k].from_dict(v) if k in cls.NESTED else v for k, v in values.items()})

    def as_dict(self) -> dict[str, Any]:
        """The plain slice, for manifests and hashes: equal to what `stage_params` returned."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _class_name(*parts: str) -> str:
    return "".join(w.capitalize() for p in parts for w in p.split("_")) + "Params"


def _annotation(prop: dict[str, Any], nested_name: str | None) -> str:
    if nested_name:
        return nested_name
    if "enum" in prop:
        literal = f"Literal[{', '.join(json.dumps(v) for v in prop['enum'] if v is not None)}]"
        return literal + (" | None" if None in prop["enum"] else "")
    scalar = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "None"}
    types = prop.get("type")
    if types is None:
        return "Any"

    def one(t: str) -> str:
        if t == "array":
            item = prop.get("items", {}).get("type")
            return f"list[{scalar.get(item, 'Any') if isinstance(item, str) else 'Any'}]"
        return scalar.get(t, "dict[str, Any]")

    return " | ".join(one(t) for t in ([types] if isinstance(types, str) else types))


def _comment(text: str, indent: str = "    ", width: int = 106) -> list[str]:
    import textwrap

    return [f"{indent}#: {line}" for line in textwrap.wrap(" ".join(text.split()), width - len(indent) - 3)]


def render_params_module(schema: dict[str, Any] | None = None) -> str:
    """The source of mmsae/params.py: one frozen dataclass per stage section of the schema."""
    schema = schema or load_schema()
    out = ['"""Typed stage params: one frozen dataclass per section of config/schema.yaml.', "",
           "GENERATED by `make params` (mmsae.config.render_params_module); do not edit. Defaults, ranges and",
           "descriptions live in the schema; `XParams.load(raw)` fills and validates a slice from it.", '"""', "",
           "from __future__ import annotations", "", "import dataclasses", "from typing import Any, ClassVar, Literal", "",
           "from mmsae.config import StageParams", ""]
    by_stage = []

    def emit(name: str, stage: str, section: dict[str, Any], path: tuple[str, ...]) -> None:
        nested = {}
        for key, prop in section.get("properties", {}).items():
            if prop.get("type") == "object" and "properties" in prop:
                nested[key] = _class_name(*path, key)
                emit(nested[key], "", prop, (*path, key))
        out.extend(["", "@dataclasses.dataclass(frozen=True)", f"class {name}(StageParams):"])
        if section.get("description"):
            out.extend(_comment(section["description"]))
        out.append(f'    STAGE: ClassVar[str] = "{stage}"')
        if nested:
            out.append(f"    NESTED: ClassVar[dict[str, type[StageParams]]] = {{{', '.join(f'{k!r}: {v}' for k, v in nested.items())}}}")
        for key, prop in section.get("properties", {}).items():
            if prop.get("description"):
                out.extend(_comment(prop["description"]))
            out.append(f"    {key}: {_annotation(prop, nested.get(key))}")
        out.append("")

    for stage, section in schema["properties"].items():
        # a mapping of user-named entries (pools) has no fixed keys, hence no class
        if section.get("type") == "object" and "properties" in section:
            by_stage.append((stage, _class_name(stage)))
            emit(_class_name(stage), stage, section, (stage,))
    out.extend(["", "BY_STAGE: dict[str, type[StageParams]] = {"])
    out.extend(f'    "{stage}": {name},' for stage, name in by_stage)
    out.extend(["}", ""])
    text = "\n".join(out)
    uses_any = any("Any" in line.split(":", 1)[-1] for line in out if line.startswith("    ") and "#:" not in line)
    return text if uses_any else text.replace("from typing import Any, ClassVar", "from typing import ClassVar", 1)


if __name__ == "__main__":  # `python -m mmsae.config params`: rewrite mmsae/params.py from the schema
    import sys

    if sys.argv[1:] != ["params"]:
        sys.exit("usage: python -m mmsae.config params")
    (Path(__file__).parent / "params.py").write_text(render_params_module())
