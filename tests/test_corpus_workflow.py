"""A separate SAE corpus (sae_data) and several pools (pools) in the Snakemake DAG, by dry runs: one SAE per
recipe trained on the corpus, every pool scored with it, and folder hashes that keep the SAE when pools
change and keep every folder name when the new keys are not used."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import REPO, _job_counts, smk

CORPUS = {"source": "toyworld:train", "n": 150}
POOLS = {"extra": {"source": "toyworld:heldout", "n": 30}, "again": {"source": "toyworld", "n": 60, "seed": 3}}


_DRY: dict[str, str] = {}


def _dry(tmp_path: Path, name: str, **sections) -> str:
    """The dry run's output for config/test.yaml updated by `sections`, written to tmp_path/{name}.yaml
    (memoised by name: each dry run takes seconds)."""
    cfg = yaml.safe_load((REPO / "config/test.yaml").read_text())
    cfg.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if name in _DRY:
        return _DRY[name]
    r: subprocess.CompletedProcess = smk("-n", "-p", "--directory", str(tmp_path), "--configfile", str(path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _DRY[name] = r.stdout + r.stderr
    return _DRY[name]


def _commands(text: str, script: str) -> list[dict[str, str]]:
    """The --option value pairs of every planned command of workflow/scripts/{script}.py."""
    lines = [line for line in text.splitlines() if f"scripts/{script}.py" in line]
    return [dict(re.findall(r"--([\w-]+) (results/\S+)", line)) for line in lines]


def _folders(text: str, stage: str) -> set[str]:
    return set(re.findall(rf"results/test/({stage}-[0-9a-f]{{8}})/manifest\.json", text))


def _sample_of(text: str, data_file: str) -> str:
    """The sample folder whose command reads the toy world's `data_file`."""
    return next(c["out"] for c in _commands(text, "sample") if c["data"].endswith(data_file)).rsplit("/", 1)[1]


def _extract_of(text: str, sample: str) -> str:
    return next(c["out"] for c in _commands(text, "extract") if c["samples"].endswith(sample)).rsplit("/", 1)[1]


def test_corpus_and_two_pools_build_one_sae_and_a_score_per_pool(tmp_path):
    base = _dry(tmp_path, "base")
    text = _dry(tmp_path, "two", sae_data=CORPUS, pools=POOLS)
    assert len(_folders(text, "train_sae")) == len(_folders(base, "train_sae"))
    samples = {f: _sample_of(text, f) for f in ("train.parquet", "pool.parquet", "heldout.parquet")}
    assert len(_commands(text, "sample")) == 4 and len(set(samples.values())) == 3  # + the pool's seed-3 sample
    extracts = {f: _extract_of(text, s) for f, s in samples.items()}
    corpus = extracts["train.parquet"]
    # every SAE (the configured one and its variants, as many as without pools) learns from the corpus
    train = _commands(text, "train_sae")
    assert len(train) == len(_commands(base, "train_sae")) and {c["extract"].rsplit("/", 1)[1] for c in train} == {corpus}
    # the pool `data` and each of the two pools is encoded, featured and scored from its own extraction
    scores = _commands(text, "score")
    assert len(scores) == len(_commands(base, "score")) + 2
    scored = {c["extract"].rsplit("/", 1)[1] for c in scores}
    assert corpus not in scored and {extracts["pool.parquet"], extracts["heldout.parquet"]} <= scored
    assert len(scored) == 3
    for c in scores:  # encode, features and score of one pool read the same extraction
        enc = next(e for e in _commands(text, "encode") if e["out"] == c["encode"])
        feat = next(f for f in _commands(text, "features") if f["out"] == c["features"])
        assert enc["extract"] == feat["extract"] == c["extract"] and enc["sae"] == c["sae"]
    # rule all asks for each pool's score
    all_inputs = text.split("rule all:")[1].split("\n\n")[0]
    assert len(_folders(all_inputs, "score")) == 2


def test_changing_or_adding_a_pool_keeps_the_sae(tmp_path):
    one = _dry(tmp_path, "one", sae_data=CORPUS, pools={"extra": POOLS["extra"]})
    changed = _dry(tmp_path, "changed", sae_data=CORPUS, pools={"extra": {**POOLS["extra"], "n": 20}})
    two = _dry(tmp_path, "two", sae_data=CORPUS, pools=POOLS)
    assert _folders(one, "train_sae") == _folders(changed, "train_sae") == _folders(two, "train_sae")
    # the changed pool's score moves; the others' stay
    assert len(_folders(changed, "score") - _folders(one, "score")) == 1
    assert len(_folders(one, "score") - _folders(changed, "score")) == 1
    assert _folders(one, "score") < _folders(two, "score")
    # a new corpus is a new SAE
    other = _dry(tmp_path, "other", sae_data={**CORPUS, "seed": 1}, pools=POOLS)
    assert not _folders(other, "train_sae") & _folders(two, "train_sae")


def test_unused_keys_keep_every_folder_name(tmp_path):
    """No corpus, no pools and the whole pool's weights, spelled out or not, and a corpus equal to the pool:
    the same folders as the config without them (the default demo keeps its folders)."""
    base = _dry(tmp_path, "base")
    explicit = _dry(tmp_path, "explicit", sae_data={"source": None}, pools={},
                    features={**yaml.safe_load((REPO / "config/test.yaml").read_text())["features"],
                              "weights_on": "pool", "weights_samples": None})
    same = _dry(tmp_path, "same", sae_data={"source": "toyworld"})
    everything = re.compile(r"results/test/(\w+-[0-9a-f]{8})/")
    assert set(everything.findall(base)) == set(everything.findall(explicit)) == set(everything.findall(same))


def test_weights_subset_moves_features_and_score_only(tmp_path):
    base = _dry(tmp_path, "base")
    feats = {**yaml.safe_load((REPO / "config/test.yaml").read_text())["features"], "weights_samples": 50}
    sub = _dry(tmp_path, "sub", features=feats)
    for stage in ("sample", "extract", "train_sae", "encode"):
        assert _folders(sub, stage) == _folders(base, stage), stage
    for stage in ("features", "score"):
        assert not _folders(sub, stage) & _folders(base, stage), stage


def test_weights_on_corpus_encodes_the_corpus(tmp_path):
    feats = {**yaml.safe_load((REPO / "config/test.yaml").read_text())["features"], "weights_on": "corpus"}
    text = _dry(tmp_path, "corpus", sae_data=CORPUS, features=feats)
    corpus = _extract_of(text, _sample_of(text, "train.parquet"))
    for c in _commands(text, "features"):
        assert c["corpus-extract"].endswith(corpus) and not c["extract"].endswith(corpus)
        enc = next(e for e in _commands(text, "encode") if e["out"] == c["corpus-encode"])
        own = next(e for e in _commands(text, "encode") if e["out"] == c["encode"])
        assert enc["extract"].endswith(corpus) and enc["sae"] == own["sae"]


def test_weights_on_corpus_without_a_corpus_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"features": {"weights_on": "corpus"}}))
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(REPO / "config/test.yaml"), str(path))
    assert r.returncode != 0 and "features.weights_on" in r.stdout + r.stderr


@pytest.mark.slow
def test_run_scores_a_pool_with_the_corpus_sae_and_a_new_pool_reuses_it(tmp_path):
    """A real run on two toy sources: the SAE learns from the toy world's train split, the held-out split is
    scored with it (weights from the corpus's first 100 samples); then a second pool needs only its own jobs."""
    feats = {**yaml.safe_load((REPO / "config/test.yaml").read_text())["features"], "weights_on": "corpus",
             "weights_samples": 100}
    one = {"sae_data": CORPUS, "pools": {"extra": POOLS["extra"]}, "features": feats,
           "score": {"methods": ["cosine", "l0"], "fractions": [0.5, 1.0], "layers": [0]}}
    text = _dry(tmp_path, "run-one", **one)
    pool_sample = _sample_of(text, "heldout.parquet")
    pool_score = next(c["out"] for c in _commands(text, "score") if c["samples"].endswith(pool_sample))
    r = smk(f"{pool_score}/manifest.json", "--cores", "2", "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "run-one.yaml"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = tmp_path / "results" / "test"
    corpus_extract = _extract_of(text, _sample_of(text, "train.parquet"))
    (sae,) = results.glob("train_sae-*")
    assert json.loads((sae / "manifest.json").read_text())["inputs"]["extract"].endswith(corpus_extract)
    scores = pd.read_parquet(tmp_path / pool_score / "scores.parquet")
    assert len(scores) == POOLS["extra"]["n"] and scores["sample_id"].str.startswith("heldout-").all()
    manifest = json.loads((results / Path(pool_score).name / "manifest.json").read_text())
    features = Path(manifest["inputs"]["features"]).name
    weights = json.loads((results / features / "manifest.json").read_text())["counts"]["weights"]
    assert weights["on"] == "corpus" and weights["n_samples"] == 100
    # a second pool: its own sample, extract, encode, features and score; the SAE and the corpus stay
    two = {**one, "pools": POOLS}
    text2 = _dry(tmp_path, "run-two", **two)
    new_score = (_folders(text2, "score") - _folders(text, "score")).pop()
    r = smk("-n", f"results/test/{new_score}/manifest.json", "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "run-two.yaml"))
    assert _job_counts(r) == {"sample": 1, "extract": 1, "encode": 1, "features": 1, "score": 1, "total": 5}
