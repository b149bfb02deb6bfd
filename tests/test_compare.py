"""The spread of AUROC over runs: mmsae.evaluation.auroc.auroc_spread, the compare_runs script and rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsae import cli
from mmsae.errors import InputError
from mmsae.evaluation.auroc import auroc_spread
from mmsae.report import compare

REPO = Path(__file__).resolve().parents[1]


def report(cons_mismatch: float, cons_noise: float | None, layers: dict[int, float] | None = None,
           extra: bool = False) -> dict:
    """A report.json as the report stage writes it (only the keys auroc_spread reads, plus noise)."""
    rows = [{"method": "consistency", "kind": "mismatch", "auroc": cons_mismatch, "n_clean": 10, "n_corrupted": 5},
            {"method": "consistency", "kind": "noise_image", "auroc": cons_noise, "n_clean": 10, "n_corrupted": 5}]
    if extra:
        rows.append({"method": "<b>x</b>", "kind": "mismatch", "auroc": 0.5, "n_clean": 10, "n_corrupted": 5})
    by_layer = [{"method": "consistency", "kind": "mismatch", "auroc": a, "layer": layer, "n_clean": 10,
                 "n_corrupted": 5} for layer, a in (layers or {}).items()]
    return {"title": "t", "auroc": rows, "auroc_by_layer": by_layer, "counts": {"samples": 15}}


RUNS = {"s0": report(0.8, 0.9, {0: 0.8, 1: 0.6}), "s1": report(0.9, None, {0: 0.7}),
        "s2": report(0.7, 1.0, {0: 0.9, 1: 0.4}, extra=True)}


def test_auroc_spread_numbers():
    out = auroc_spread(RUNS)
    assert list(out.columns) == ["method", "kind", "layer", "n_runs", "mean", "sd", "min", "max",
                                 "run:s0", "run:s1", "run:s2"]
    row = lambda m, k, layer=None: out[(out["method"] == m) & (out["kind"] == k)  # noqa: E731
                                       & (out["layer"].isna() if layer is None else out["layer"] == layer)].iloc[0]
    r = row("consistency", "mismatch")
    assert (r["n_runs"], r["mean"], r["min"], r["max"]) == (3, pytest.approx(0.8), 0.7, 0.9)
    assert r["sd"] == pytest.approx(0.1)  # sample s.d. of 0.8, 0.9, 0.7
    assert [r["run:s0"], r["run:s1"], r["run:s2"]] == [0.8, 0.9, 0.7]
    # a null AUROC (an empty class in that run) is left out, not counted as 0
    r = row("consistency", "noise_image")
    assert (r["n_runs"], r["mean"], r["sd"]) == (2, pytest.approx(0.95), pytest.approx(math.sqrt(0.005)))
    assert math.isnan(r["run:s1"])
    # a method only one run has: n_runs 1, sd 0
    r = row("<b>x</b>", "mismatch")
    assert (r["n_runs"], r["mean"], r["sd"]) == (1, 0.5, 0.0) and math.isnan(r["run:s0"])
    # per layer: layer 1 is missing from s1
    assert row("consistency", "mismatch", 0)["mean"] == pytest.approx(0.8)
    r = row("consistency", "mismatch", 1)
    assert (r["n_runs"], r["mean"], r["min"], r["max"]) == (2, pytest.approx(0.5), 0.4, 0.6)
    # the main table first (layer <NA>), then by layer
    assert out["layer"].isna().tolist() == [True] * 3 + [False] * 2
    with pytest.raises(InputError, match="no runs"):
        auroc_spread({})
    with pytest.raises(InputError, match="auroc_by_layer.layer"):
        auroc_spread({"a": {"auroc_by_layer": [{"method": "m", "kind": "k", "auroc": 0.5}]}})


def write_reports(root: Path) -> None:
    for name, rep in RUNS.items():
        path = root / "results" / name / "report" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rep))


def test_compare_script(tmp_path, capsys):
    write_reports(tmp_path)
    args = [a for n in RUNS for a in ("--report", f"{n}={tmp_path}/results/{n}/report/report.json")]
    out = tmp_path / "compare"
    assert cli.stage_main(compare, [*args, "--out", str(out)]) == 0
    spread = pd.read_parquet(out / "auroc_spread.parquet")
    pd.testing.assert_frame_equal(spread, auroc_spread(RUNS), check_dtype=False)
    page = (out / "auroc_spread.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # data text is escaped
    assert "0.800 ± 0.100 (0.70-0.90, n=3)" in page and "layer 1" in page
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"n_runs": 3, "rows": 5} and set(manifest["inputs"]) == {f"report:{n}" for n in RUNS}
    # bad input: one line naming the file / field, exit 2, nothing written
    assert cli.stage_main(compare, ["--report", "s9=/nonexistent.json", "--out", str(tmp_path / "x")]) == 2
    assert "error: /nonexistent.json: field 'path'" in capsys.readouterr().err
    assert cli.stage_main(compare, ["--report", "no-equals-sign", "--out", str(tmp_path / "x")]) == 2
    assert cli.stage_main(compare, ["--out", str(tmp_path / "x")]) == 2
    assert "no runs" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compare_target_runs_the_rule(tmp_path):
    write_reports(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(REPO / "config/config.yaml"), "--cores", "1", "compare",
                        "--config", 'compare={"runs": ["s0", "s2"]}'],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spread = pd.read_parquet(tmp_path / "results" / "compare" / "auroc_spread.parquet")
    assert [c for c in spread.columns if c.startswith("run:")] == ["run:s0", "run:s2"]
    r = spread[(spread["method"] == "consistency") & (spread["kind"] == "mismatch") & spread["layer"].isna()].iloc[0]
    assert r["mean"] == pytest.approx(0.75) and r["n_runs"] == 2
    assert np.isfinite(spread["mean"]).all()
    assert (tmp_path / "results" / "logs" / "compare_runs.log").exists()
