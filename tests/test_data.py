"""Record schema validation, deterministic sampling, the toy world's ground truth, bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsae.data import read_records, sample_frame
from mmsae.data.toyvocab import UNHELPFUL
from mmsae.data.toyworld import CORRUPTION_KINDS, Scene, answer_for, generate, patch_concepts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return generate(seed=3, n_samples=200, corruption_rate=0.4, corruption_kinds=list(CORRUPTION_KINDS),
                    n_train=50, n_heldout=20)


def test_toyworld_is_deterministic_and_has_every_corruption_kind(world):
    again = generate(seed=3, n_samples=200, corruption_rate=0.4, corruption_kinds=list(CORRUPTION_KINDS),
                     n_train=50, n_heldout=20)
    pd.testing.assert_frame_equal(world["pool"], again["pool"])
    counts = world["pool"]["corruption"].value_counts()
    assert {k: counts[k] for k in CORRUPTION_KINDS} == dict.fromkeys(CORRUPTION_KINDS, 80 // len(CORRUPTION_KINDS))
    assert world["train"]["corruption"].isna().all() and world["heldout"]["corruption"].isna().all()
    assert not set(world["train"].sample_id) & set(world["pool"].sample_id)


def test_toyworld_ground_truth_is_consistent(world):
    pool = world["pool"]
    for row in pool.itertuples():
        scene = Scene(json.loads(row.objects))
        preferred = row.responses[row.preferred]
        truth = answer_for(row.question, scene)
        if pd.isna(row.corruption):
            assert preferred == truth, row.sample_id  # clean: the preferred response is right
        elif row.corruption == "wrong_answer":
            assert preferred != truth and truth in row.responses
        elif row.corruption == "mismatch":
            assert preferred != truth  # the text was written for another image
        elif row.corruption == "text_only":
            assert row.task == "text_only" and truth is None
        elif row.corruption == "unhelpful":  # a generic response is preferred over the right one
            assert preferred in UNHELPFUL and truth in row.responses


def test_patch_concepts_follow_the_boxes():
    objects = json.dumps([
        {"side": "left", "colour": "blue", "shape": "square", "bbox": [0, 0, 8, 8]},
        {"side": "right", "colour": "red", "shape": "circle", "bbox": [24, 24, 32, 32]},
    ])
    concepts = patch_concepts(objects, grid=4)
    assert concepts[0] == {"blue", "square"} and concepts[15] == {"red", "circle"}
    assert all(c == set() for i, c in enumerate(concepts) if i not in (0, 15))


def test_sampling_is_seeded_and_independent_of_row_order(world):
    pool = world["pool"]
    a = sample_frame(pool, 50, seed=7)
    b = sample_frame(pool.iloc[::-1], 50, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 50 and a.sample_id.is_unique
    assert not sample_frame(pool, 50, seed=8).sample_id.equals(a.sample_id)
    assert len(sample_frame(pool, None, seed=0)) == len(pool)


def test_records_decode_images(world, tmp_path):
    path = tmp_path / "pool.parquet"
    world["pool"].head(5).to_parquet(path)
    records = read_records(path)
    assert len(records) == 5 and records[0].image.size == (32, 32)
    assert records[0].preferred_response in records[0].responses


def _run_sample(data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "workflow/scripts/sample.py"), "--data", str(data),
                           "--out", str(out), "--params", '{"n": 5}'], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("break_it", "field"),
    [
        (lambda df: df.drop(columns=["question"]), "question"),
        (lambda df: df.assign(question=["", *df.question[1:]]), "question"),
        (lambda df: df.assign(image=[b"not an image", *df.image[1:]]), "image"),
        (lambda df: df.assign(responses=[[" "], *df.responses[1:]]), "responses"),
        (lambda df: df.assign(preferred=np.full(len(df), 5)), "preferred"),
        (lambda df: df.assign(sample_id=["same"] * len(df)), "sample_id"),
    ],
    ids=["missing-column", "empty-text", "broken-image", "empty-response", "bad-preferred", "duplicate-id"],
)
def test_bad_input_one_line_error_and_no_artifact(world, tmp_path, break_it, field):
    data = tmp_path / "bad.parquet"
    break_it(world["pool"].head(10).copy()).to_parquet(data)
    out = tmp_path / "sample-0123abcd"
    r = _run_sample(data, out)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(data) in last and f"field '{field}'" in last
    assert "Traceback" not in r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.parquet"]


def test_sample_script_writes_samples_and_manifest(world, tmp_path):
    data = tmp_path / "pool.parquet"
    world["pool"].to_parquet(data)
    r = _run_sample(data, tmp_path / "sample-0123abcd")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(tmp_path / "sample-0123abcd" / "samples.parquet")
    manifest = json.loads((tmp_path / "sample-0123abcd" / "manifest.json").read_text())
    assert len(df) == 5 and manifest["counts"]["n_samples"] == 5 and manifest["config_hash"] == "0123abcd"
