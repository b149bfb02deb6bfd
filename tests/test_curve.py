"""The filtering curve: subset selection for fine-tune arms, the curve table, its summary and the stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsae.errors import InputError
from mmsae.evaluation.curve import benchmark_metrics, curve_summary, filtering_curve
from mmsae.report import plots
from mmsae.scoring.methods import rank
from mmsae.scoring.subsets import keep_top

REPO = Path(__file__).resolve().parents[1]


def _frame(n: int = 10) -> pd.DataFrame:
    ids = [f"s{i:02d}" for i in range(n)]
    return pd.DataFrame({"sample_id": ids[::-1], "x": range(n)})  # not in id order on purpose


def test_keep_top_random_matches_the_random_method_subset():
    df = _frame(10)
    kept = keep_top(df, 0.3, "random:7")
    # the `random` score method: seeded uniform scores over the sorted ids, best first
    scores = np.random.default_rng(7).random(10)
    expected = [f"s{i:02d}" for i in np.argsort(rank(scores))[:3]]
    assert kept["sample_id"].tolist() == expected
    assert keep_top(df, 0.3, "random:7").equals(kept)  # deterministic
    assert keep_top(df, 0.3, "random:8")["sample_id"].tolist() != expected


def test_keep_top_by_score_column_best_first_ties_by_id(tmp_path):
    df = _frame(5)
    path = tmp_path / "ifd.parquet"
    pd.DataFrame({"sample_id": ["s00", "s01", "s02", "s03", "s04"], "ifd_score": [0.1, 0.9, 0.5, 0.9, 0.2]}).to_parquet(path)
    kept = keep_top(df, 0.6, f"{path}:ifd_score")  # ceil(0.6 * 5) = 3
    assert kept["sample_id"].tolist() == ["s01", "s03", "s02"]
    assert kept["x"].tolist() == [3, 1, 2]  # whole rows come along


def test_keep_top_errors_name_the_file_and_field(tmp_path):
    df = _frame(3)
    path = tmp_path / "s.parquet"
    pd.DataFrame({"sample_id": ["s00", "s01"], "v": [1.0, 2.0]}).to_parquet(path)
    with pytest.raises(InputError, match="v.*s02"):
        keep_top(df, 0.5, f"{path}:v")
    with pytest.raises(InputError, match="missing"):
        keep_top(df, 0.5, f"{path}:nope")
    with pytest.raises(InputError, match="random seed"):
        keep_top(df, 0.5, "random:x")
    with pytest.raises(InputError, match="PATH:COLUMN"):
        keep_top(df, 0.5, "nocolon")


def _results(em: float) -> dict:
    return {"toy": {"exact_match": em, "exact_match_by_task": {"a": em / 2}, "answer_logprob": em - 1.0,
                    "answer_logprob_by_task": {"a": em - 2.0}}}


def test_filtering_curve_bad_share_and_summary_over_seeds():
    samples = pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "corruption": [None, "mismatch", None, "noise_image"]})
    arms = [
        {"method": "start", "fraction": 0.0, "seed": None, "train_ids": None, "results": _results(0.9)},
        {"method": "cosine", "fraction": 0.5, "seed": None, "train_ids": ["a", "c"], "results": _results(0.8)},
        {"method": "random", "fraction": 0.5, "seed": 0, "train_ids": ["a", "b"], "results": _results(0.6)},
        {"method": "random", "fraction": 0.5, "seed": 1, "train_ids": ["b", "d"], "results": _results(0.4)},
        {"method": "all", "fraction": 1.0, "seed": None, "train_ids": list("abcd"), "results": _results(0.5)},
    ]
    curve = filtering_curve(arms, samples)
    row = curve.set_index(["method", "seed"], drop=False)
    assert row.loc[("cosine", pd.NA), "bad_share"] == 0.0
    assert row.loc[("random", 1), "bad_share"] == 1.0 and row.loc[("random", 1), "bad_share.noise_image"] == 0.5
    assert row.loc[("all", pd.NA), "bad_share.mismatch"] == 0.25 and row.loc[("all", pd.NA), "n_train"] == 4
    assert row.loc[("cosine", pd.NA), "exact_match.a"] == 0.4
    assert row.loc[("cosine", pd.NA), "answer_logprob.a"] == pytest.approx(-1.2)
    summary = curve_summary(curve).set_index("method")
    assert "start" not in summary.index
    assert summary.loc["random", "exact_match_mean"] == pytest.approx(0.5)
    assert summary.loc["random", "exact_match_std"] == pytest.approx(np.std([0.6, 0.4], ddof=1))
    assert summary.loc["random", "n_runs"] == 2 and summary.loc["cosine", "exact_match_std"] == 0.0
    assert summary.loc["random", "bad_share_mean"] == pytest.approx(0.75)
    png = plots.filtering_curve(curve)
    assert png and len(png) > 1000


def test_filtering_curve_rejects_unknown_training_ids():
    samples = pd.DataFrame({"sample_id": ["a"], "corruption": [None]})
    with pytest.raises(InputError, match="unknown samples"):
        filtering_curve([{"method": "x", "fraction": 1.0, "train_ids": ["zz"], "results": _results(1.0)}], samples)


def test_benchmark_metrics_reads_toy_and_judged_llava_bench():
    res = {"toy": {"exact_match": 0.5, "exact_match_by_task": {}},
           "llava_bench": {"scores": {"overall": {"relative": 81.5}, "conv": {"relative": None}}}}
    assert benchmark_metrics(res) == {"exact_match": 0.5, "llava_bench.overall": 81.5}


def test_benchmark_metrics_reads_answer_match_per_task():
    res = {"toy": {"exact_match": 0.5, "exact_match_by_task": {}, "answer_match": 0.75,
                   "answer_match_by_task": {"describe_side": 0.5, "object_of_colour": 1.0}}}
    assert benchmark_metrics(res) == {"exact_match": 0.5, "answer_match": 0.75, "answer_match.describe_side": 0.5,
                                      "answer_match.object_of_colour": 1.0}


def test_curve_stage_writes_table_plot_and_best_method(tmp_path):
    samples = tmp_path / "sample"
    samples.mkdir()
    pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "corruption": [None, "mismatch", None, None]}).to_parquet(
        samples / "samples.parquet")
    args = [sys.executable, str(REPO / "workflow/scripts/curve.py"), "--samples", str(samples)]
    for name, em, ids, seed in (("start", 0.9, None, "-"), ("cosine", 0.8, ["a", "c"], "-"),
                                ("nosae_cosine", 0.7, ["a", "b"], "-"), ("random", 0.6, ["b", "d"], "3"),
                                ("all", 0.5, list("abcd"), "-")):
        bench = tmp_path / f"bench_{name}"
        bench.mkdir()
        (bench / "results.json").write_text(json.dumps(_results(em)))
        if ids is None:
            args += ["--start", str(bench)]
            continue
        ft = tmp_path / f"ft_{name}"
        ft.mkdir()
        pd.DataFrame({"sample_id": ids}).to_parquet(ft / "train_ids.parquet")
        args += ["--arm", name, "1.0" if name == "all" else "0.5", seed, str(ft), str(bench)]
    out = tmp_path / "curve"
    r = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cj = json.loads((out / "curve.json").read_text())
    assert cj["metric"] == "answer_logprob" and cj["best_by_fraction"] == {"0.5": "cosine"}
    assert cj["start"] == [pytest.approx(-0.1)]
    assert (out / "curve.png").stat().st_size > 1000 and (out / "manifest.json").exists()
    # a missing arm output is a one-line error naming the file; nothing is written
    (tmp_path / "ft_cosine" / "train_ids.parquet").unlink()
    r = subprocess.run([*args, "--out", str(tmp_path / "curve2")], capture_output=True, text=True)
    assert r.returncode == 2 and "train_ids.parquet" in r.stderr and not (tmp_path / "curve2").exists()


def test_keep_top_oracle_keeps_clean_samples_first():
    df = pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "corruption": ["mismatch", None, "noise_image", None]})
    assert keep_top(df, 0.5, "oracle")["sample_id"].tolist() == ["b", "d"]
    assert keep_top(df, 0.75, "oracle")["sample_id"].tolist() == ["b", "d", "a"]  # then by id
    with pytest.raises(InputError, match="corruption"):
        keep_top(df.drop(columns="corruption"), 0.5, "oracle")
