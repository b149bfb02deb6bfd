"""Artifact naming, manifests, atomic writes and config validation."""

from __future__ import annotations

import json

import pytest

from mmsae.artifacts import atomic_dir, config_hash, read_manifest, stage_dirname, write_manifest
from mmsae.config import stage_params, validate
from mmsae.errors import InputError


def test_hash_is_stable_and_covers_params_and_parents():
    a = config_hash({"x": 1, "y": [1, 2]}, ["extract-00000000"])
    assert a == config_hash({"y": [1, 2], "x": 1}, ["extract-00000000"])  # key order does not matter
    assert a != config_hash({"x": 2, "y": [1, 2]}, ["extract-00000000"])
    assert a != config_hash({"x": 1, "y": [1, 2]}, ["extract-11111111"])  # upstream change moves it
    assert stage_dirname("train_sae", {"x": 1}).startswith("train_sae-")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "stage-0123abcd"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.parquet").write_text("x")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_stale_folder_and_manifest_carries_hash(tmp_path):
    final = tmp_path / "sample-0123abcd"
    final.mkdir()
    (final / "stale").write_text("old")
    with atomic_dir(final) as tmp:
        write_manifest(tmp, "sample", {"n": 3}, {"data": "x.parquet"}, {"n_samples": 3}, {"read": 0.1})
    assert not (final / "stale").exists()
    m = read_manifest(final)
    assert m["config_hash"] == "0123abcd" and m["counts"] == {"n_samples": 3} and m["stage"] == "sample"
    assert json.loads((final / "manifest.json").read_text())["inputs"] == {"data": "x.parquet"}


def test_missing_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        read_manifest(tmp_path)


def test_config_defaults_and_validation():
    cfg = validate({"train_sae": {"steps": 5}})
    assert cfg["train_sae"]["steps"] == 5 and cfg["train_sae"]["scope"] == "all"
    assert cfg["run"] == "demo" and cfg["score"]["methods"]
    with pytest.raises(InputError, match=r"train_sae\.scope"):
        validate({"train_sae": {"scope": "pixels"}}, "cfg.yaml")
    with pytest.raises(InputError, match=r"cfg\.yaml: field '<root>': Additional properties"):
        validate({"nonsense": 1}, "cfg.yaml")
    assert stage_params("encode", '{"delta": 0.5}')["delta"] == 0.5
    with pytest.raises(InputError, match=r"encode\.delta"):
        stage_params("encode", '{"delta": -1}')


def test_execution_keys_are_marked_in_the_schema():
    """Keys that only cut a stage's work into jobs stay out of its folder hash; the schema says which."""
    from mmsae.config import execution_keys

    assert execution_keys("extract") == ("shards", "part_batches")
    assert execution_keys("score") == ("shards",)
    assert execution_keys("finetune") == ("accelerate_config",)
    assert execution_keys("train_sae") == ("keep_checkpoints",)
