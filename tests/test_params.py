"""Typed stage params (mmsae.params, generated from config/schema.yaml) and the stage command line."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from mmsae import cli
from mmsae.config import config_error, load_schema, render_params_module, stage_params
from mmsae.errors import InputError
from mmsae.params import BY_STAGE, ModelParams, ScoreConsistencyParams, ScoreParams, TrainSaeParams

ROOT = Path(__file__).resolve().parents[1]


def test_params_module_is_generated_from_the_schema():
    """Edit config/schema.yaml, then `make params`: this fails until the two agree."""
    assert (ROOT / "mmsae" / "params.py").read_text() == render_params_module()


def test_every_stage_section_has_a_class_with_exactly_its_keys():
    schema = load_schema()["properties"]
    stages = {k for k, v in schema.items() if v.get("type") == "object" and "properties" in v}  # not pools (named entries)
    assert set(BY_STAGE) == stages
    for stage, cls in BY_STAGE.items():
        assert stage == cls.STAGE
        assert [f.name for f in dataclasses.fields(cls)] == list(schema[stage]["properties"]), stage


@pytest.mark.parametrize("stage", sorted(BY_STAGE))
def test_defaults_come_from_the_schema_and_round_trip(stage):
    filled = stage_params(stage, {})
    params = BY_STAGE[stage].load({})
    assert params.as_dict() == filled
    assert json.dumps(params.as_dict(), sort_keys=True) == json.dumps(filled, sort_keys=True)


def test_nested_sections_are_typed_and_validated():
    params = ScoreParams.load({"consistency": {"gate_z": 1.5}})
    assert isinstance(params.consistency, ScoreConsistencyParams)
    assert params.consistency.gate_z == 1.5
    assert params.consistency.bind_aggregate == load_schema()["properties"]["score"]["properties"]["consistency"][
        "properties"]["bind_aggregate"]["default"]
    with pytest.raises(InputError, match="consistency"):
        ScoreParams.load({"consistency": {"no_such_key": 1}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 3  # type: ignore[misc]


def test_types_follow_the_schema():
    hints = typing.get_type_hints(TrainSaeParams)
    schema = load_schema()["properties"]["train_sae"]["properties"]
    for key, prop in schema.items():
        if prop.get("type") == "integer" and "enum" not in prop:
            assert hints[key] is int, key
        if prop.get("type") == "boolean":
            assert hints[key] is bool, key
    assert typing.get_origin(hints["architecture"]) is typing.Literal


def test_load_reads_json_strings_and_rejects_bad_values():
    assert ModelParams.load('{"dtype": "float32"}').dtype == "float32"
    with pytest.raises(InputError, match="dtype"):
        ModelParams.load({"dtype": "float8"}, source="--model-params")
    changed = ModelParams.load({}).replace(device="cpu")
    assert changed.device == "cpu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inputs(cli.ModelInputs):
    folder: Path = cli.arg("a folder")
    shard: int | None = cli.arg("a shard", default=None, type=int)
    gather: bool = cli.arg("a flag", default=False)
    pair: tuple[str, ...] = cli.arg("NAME=PATH", default=(), action="append")


def test_stage_main_builds_options_from_the_inputs(tmp_path):
    seen = {}

    def run(inputs, params, out):
        seen.update(inputs=inputs, params=params, out=out)

    argv = ["--samples", "s", "--model", "m", "--folder", "f", "--shard", "2", "--pair", "a=1", "--pair", "b=2",
            "--model-params", '{"device": "cpu"}', "--params", '{"k": 7}', "--out", str(tmp_path / "o")]
    assert cli.main("train_sae", run, _Inputs, None, argv) == 0
    inputs = seen["inputs"]
    assert inputs.samples == Path("s") and inputs.folder == Path("f") and inputs.model == "m"
    assert inputs.shard == 2 and inputs.gather is False and inputs.pair == ("a=1", "b=2")
    assert isinstance(inputs.model_params, ModelParams) and inputs.model_params.device == "cpu"
    assert isinstance(seen["params"], TrainSaeParams) and seen["params"].k == 7
    assert seen["out"] == tmp_path / "o"
    # left out: the model slice's defaults, from the schema
    assert cli.main("train_sae", run, _Inputs, None, ["--samples", "s", "--model", "m", "--folder", "f", "--out", "o"]) == 0
    assert seen["inputs"].model_params == ModelParams.load({})


def test_stage_main_bad_params_exit_2_with_one_line(capsys):
    argv = ["--samples", "s", "--model", "m", "--folder", "f", "--out", "o", "--params", '{"k": "wide"}']
    assert cli.main("train_sae", lambda *a: None, _Inputs, None, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "wide" in err[0]


@pytest.mark.parametrize("config,line", [
    ({"train_sae": {"steps": -5}}, "config: train_sae.steps = -5: must be >= 1"),
    ({"train_sae": {"scope": "pixels"}}, 'config: train_sae.scope = "pixels": must be one of "all", "text"'),
    ({"extract": {"batch_size": "8"}}, 'config: extract.batch_size = "8": must be of type integer'),
    ({"extract": {"nope": 1}}, "config: extract: unknown key ('nope' was unexpected)"),
    ({"train_sae": {"steps": 10}}, None),
])
def test_config_error_is_one_line_naming_field_and_value(config, line):
    assert config_error(config) == line
