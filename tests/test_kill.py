"""Jobs killed at random: each long stage's script is SIGKILLed at a random point of its run, at least 5
times, rerun each time, then left to finish. The final artifact must equal an uninterrupted run's
byte for byte, and the output folder must never exist without its manifest (what a reader would see
between the kills)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import records_frame, tiny_llava_next, tiny_records
from test_finetune import FAST, data, toy_model_dir  # noqa: F401  (fixtures)
from test_sae import synthetic_store
from test_scoring import build_artifacts

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
KILLS = 5
pytestmark = pytest.mark.slow


def _run(argv: list[str]) -> float:
    """Run to the end; its wall time."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return time.perf_counter() - t0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def kill_loop(argv: list[str], out: Path, full_s: float, seed: int) -> int:
    """SIGKILL the script at uniform random points of [0.1, 0.9] x an uninterrupted run's time until it
    has been killed KILLS times (a rerun that finishes first counts as no kill, and its own time becomes
    the run time: on a shared machine the first measurement can be several times too long), then run it
    to the end. Returns the number of kills."""
    rng, kills, attempts = random.Random(seed), 0, 0
    while kills < KILLS:
        attempts += 1
        assert attempts <= 4 * KILLS, f"only {kills} kills in {attempts - 1} attempts"
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=_env())
        time.sleep(rng.uniform(0.1, 0.9) * full_s)
        if p.poll() is None:
            p.kill()
            kills += 1
        else:
            full_s = time.perf_counter() - t0
        p.wait()
        assert not out.exists() or (out / "manifest.json").exists(), "a folder without its manifest"
    _run(argv)
    return kills


def _same_files(a: Path, b: Path, skip: tuple[str, ...] = ("manifest.json", "metrics.json")) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_extract_killed_resumes_to_the_same_store(tmp_path):
    model = tiny_llava_next(tmp_path)
    samples = tmp_path / "sample-abc"
    samples.mkdir()
    records_frame(tiny_records(24)).to_parquet(samples / "samples.parquet")
    params = json.dumps({"layers": [0, 1], "batch_size": 2, "chunk_tokens": 8, "shard_chunks": 2, "part_batches": 1})

    def argv(out: Path) -> list[str]:
        return [str(SCRIPTS / "extract.py"), "--samples", str(samples), "--model", str(model), "--out", str(out),
                "--params", params]

    full = _run(argv(tmp_path / "extract-00000000"))
    assert kill_loop(argv(tmp_path / "extract-11111111"), tmp_path / "extract-11111111", full, seed=1) == KILLS
    _same_files(tmp_path / "extract-00000000", tmp_path / "extract-11111111")


def _sae_setup(tmp_path: Path) -> tuple[Path, str]:
    store = synthetic_store(tmp_path / "extract-22222222", n_samples=200, layers=(1,))
    (store / "manifest.json").write_text(json.dumps({"stage": "extract"}))
    return store, json.dumps({"layer": 1, "steps": 300, "batch_size": 64, "checkpoint_every": 20, "expansion": 2})


def test_train_sae_killed_resumes_to_the_same_weights(tmp_path):
    store, params = _sae_setup(tmp_path)

    def argv(out: Path) -> list[str]:
        return [str(SCRIPTS / "train_sae.py"), "--extract", str(store), "--out", str(out),
                "--checkpoints", f"{out}.checkpoints", "--params", params]

    full = _run(argv(tmp_path / "train_sae-00000000"))
    assert kill_loop(argv(tmp_path / "train_sae-11111111"), tmp_path / "train_sae-11111111", full, seed=2) == KILLS
    _same_files(tmp_path / "train_sae-00000000", tmp_path / "train_sae-11111111")


def test_encode_killed_reruns_to_the_same_codes(tmp_path):
    store, params = _sae_setup(tmp_path)
    sae = tmp_path / "train_sae-33333333"
    _run([str(SCRIPTS / "train_sae.py"), "--extract", str(store), "--out", str(sae), "--checkpoints",
          f"{sae}.checkpoints", "--params", params])

    def argv(out: Path) -> list[str]:
        return [str(SCRIPTS / "encode.py"), "--extract", str(store), "--sae", str(sae), "--out", str(out)]

    full = _run(argv(tmp_path / "encode-00000000"))
    assert kill_loop(argv(tmp_path / "encode-11111111"), tmp_path / "encode-11111111", full, seed=3) == KILLS
    _same_files(tmp_path / "encode-00000000", tmp_path / "encode-11111111")


def test_score_killed_reruns_to_the_same_scores(tmp_path):
    a = build_artifacts(tmp_path)

    def argv(out: Path) -> list[str]:
        return [str(SCRIPTS / "score.py"), "--samples", str(a["samples"]), "--extract", str(a["extract"]),
                "--encode", str(a["encode"]), "--features", str(a["features"]), "--model-loss", str(a["model_loss"]),
                "--out", str(out), "--params", json.dumps({"fractions": [0.5, 1.0]})]

    full = _run(argv(tmp_path / "score-00000000"))
    assert kill_loop(argv(tmp_path / "score-11111111"), tmp_path / "score-11111111", full, seed=4) == KILLS
    _same_files(tmp_path / "score-00000000", tmp_path / "score-11111111")


def test_finetune_killed_reruns_to_the_same_model(tmp_path, data, toy_model_dir):  # noqa: F811
    parquet = tmp_path / "subset.parquet"
    data.to_parquet(parquet, index=False)

    def argv(out: Path) -> list[str]:
        return [str(SCRIPTS / "finetune.py"), "--model", str(toy_model_dir), "--data", str(parquet),
                "--out", str(out), "--params", json.dumps({**FAST, "max_steps": 6})]

    full = _run(argv(tmp_path / "finetune-00000000"))
    assert kill_loop(argv(tmp_path / "finetune-11111111"), tmp_path / "finetune-11111111", full, seed=5) == KILLS
    _same_files(tmp_path / "finetune-00000000", tmp_path / "finetune-11111111")
