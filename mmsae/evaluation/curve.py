"""The filtering curve: `filtering_curve(arms, samples)` / `curve_summary(curve)` (benchmark score
against kept fraction, per selection method; random over several seeds), with the share of known-bad
samples left in each training subset when the data carry ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from mmsae.artifacts import Files
from mmsae.errors import InputError


def benchmark_metrics(results: Mapping) -> dict[str, float]:
    """The headline numbers of a benchmark stage's results.json: toy exact match and answer log-prob
    (overall and per task), LLaVA-Bench relative score (overall and per category) when judged."""
    out: dict[str, float] = {}
    toy = results.get("toy")
    if toy:
        out["exact_match"] = float(toy["exact_match"])
        out.update({f"exact_match.{t}": float(v) for t, v in toy.get("exact_match_by_task", {}).items()})
        if "answer_logprob" in toy:
            out["answer_logprob"] = float(toy["answer_logprob"])
            out.update({f"answer_logprob.{t}": float(v) for t, v in toy.get("answer_logprob_by_task", {}).items()})
    scores = (results.get("llava_bench") or {}).get("scores")
    if scores:
        out.update({f"llava_bench.{c}": float(v["relative"]) for c, v in scores.items()
                    if v.get("relative") is not None})
    return out


def filtering_curve(arms: Sequence[Mapping], samples: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: method, fraction, seed, n_train, bad_share (+ bad_share.<kind>) when `samples`
    has the `corruption` ground truth, and the benchmark metrics.

    Each arm: {"method", "fraction", "seed" (None unless random), "train_ids" (sample ids trained on;
    None for the starting model, method "start"), "results" (the benchmark's results.json)}."""
    truth = None
    if "corruption" in samples.columns:
        truth = pd.Series(samples["corruption"].to_numpy(), index=samples["sample_id"].astype(str))
    rows = []
    for arm in arms:
        row: dict = {"method": arm["method"], "fraction": float(arm["fraction"]), "seed": arm.get("seed"),
                     "n_train": 0}
        ids = arm.get("train_ids")
        if ids is not None:
            ids = pd.Index([str(i) for i in ids])
            row["n_train"] = len(ids)
            if truth is not None:
                if not ids.isin(truth.index).all():
                    raise InputError(Files.SAMPLES, "sample_id", f"arm {arm['method']} trained on unknown samples")
                kinds = truth.reindex(ids)
                row["bad_share"] = float(kinds.notna().mean()) if len(ids) else math.nan
                for kind in sorted(truth.dropna().unique()):
                    row[f"bad_share.{kind}"] = float((kinds == kind).mean()) if len(ids) else math.nan
        row.update(benchmark_metrics(arm["results"]))
        rows.append(row)
    curve = pd.DataFrame(rows)
    curve["seed"] = curve["seed"].astype("Int64")
    return curve.sort_values(["method", "fraction", "seed"], kind="stable").reset_index(drop=True)


def curve_summary(curve: pd.DataFrame, metric: str = "exact_match") -> pd.DataFrame:
    """Per (method, fraction): mean, std (over seeds; 0 for one run), n runs of `metric` and of
    bad_share; the starting model is left out (it is a reference line, not an arm)."""
    arms = curve[curve["method"] != "start"]
    cols = [c for c in (metric, "bad_share") if c in arms.columns]
    g = arms.groupby(["method", "fraction"], sort=True)[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).fillna(0.0).add_suffix("_std"))
    out["n_runs"] = g.size()
    return out.reset_index()

