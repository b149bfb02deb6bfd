"""Stage curve: the filtering curve, benchmark score against kept fraction per selection method
(`filtering_curve(arms, samples)` / `curve_summary(curve)`; random over several seeds).

Collects every fine-tune arm (method, kept fraction, seed for random subsets) with its benchmark, the
whole-data arm and the starting model's benchmark; with toy-world ground truth also the share of
known-bad samples in each training subset (from the arm's train_ids.parquet). Writes, atomically:

  OUT/curve.parquet    one row per arm: method, fraction, seed, n_train, bad_share, bad_share.<kind>,
                       exact_match, exact_match.<task>, llava_bench.<category> (those measured)
  OUT/summary.parquet  per (method, fraction): mean / std / n over seeds of the metric and bad_share
  OUT/curve.json       the summary, the best selective method per fraction (not random, the whole
                       data set or the ground-truth oracle), the metric used
  OUT/curve.png        the plot (metric and bad share against kept fraction)
  OUT/manifest.json

Example:
  python workflow/scripts/curve.py --samples results/demo/sample-xxxx --start results/demo/benchmark-aaaa \\
      --arm cosine 0.3 - results/demo/finetune-bbbb results/demo/benchmark-cccc \\
      --arm random 0.3 1 results/demo/finetune-dddd results/demo/benchmark-eeee --out results/demo/curve-ffff
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.errors import InputError
from mmsae.params import CurveParams


def benchmark_metrics(results: Mapping) -> dict[str, float]:
    """The headline numbers of a benchmark stage's results.json: toy exact match, answer match and answer
    log-prob (overall and per task), LLaVA-Bench relative score (overall and per category) when judged."""
    out: dict[str, float] = {}
    toy = results.get("toy")
    if toy:
        out["exact_match"] = float(toy["exact_match"])
        out.update({f"exact_match.{t}": float(v) for t, v in toy.get("exact_match_by_task", {}).items()})
        for metric in ("answer_match", "answer_logprob"):  # answer_match: multi-word answers (alignment setting)
            if metric in toy:
                out[metric] = float(toy[metric])
                out.update({f"{metric}.{t}": float(v) for t, v in toy.get(f"{metric}_by_task", {}).items()})
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


# --------------------------------------------------------------------------------------------------
# the stage

STAGE = "curve"
# reference arms, not contenders for the best selective method (clean: every clean pool sample, one arm)
REFERENCES = ["all", "random", "oracle", "clean"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("sample artifact folder (samples.parquet, for ground truth)")
    start: Path = cli.arg("benchmark folder of the starting model")
    arm: tuple[tuple[str, ...], ...] = cli.arg(
        "one fine-tune arm: selection method, kept fraction, seed ('-' unless random), its finetune folder and "
        "benchmark folder; repeat per arm", default=(), nargs=5, action="append",
        metavar=("METHOD", "FRACTION", "SEED", "FINETUNE", "BENCHMARK"))


def _results(folder: str | Path) -> dict:
    path = Path(folder) / Files.RESULTS
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "results", f"unreadable benchmark results: {exc}") from None


def read_arms(inputs: Inputs) -> list[dict]:
    """The starting model's arm, then one per --arm: method, fraction, seed, train_ids, results."""
    arms = [{"method": "start", "fraction": 0.0, "seed": None, "train_ids": None, "results": _results(inputs.start)}]
    for method, fraction, seed, finetune, bench in inputs.arm:
        ids_path = Path(finetune) / Files.TRAIN_IDS
        if not ids_path.exists():
            raise InputError(ids_path, "sample_id", "missing: the finetune arm did not finish")
        arms.append({"method": method, "fraction": float(fraction), "seed": None if seed == "-" else int(seed),
                     "train_ids": pd.read_parquet(ids_path)["sample_id"].tolist(), "results": _results(bench)})
    return arms


def run(inputs: Inputs, params: CurveParams, out: Path) -> None:
    from mmsae.report import plots  # here: the curve tables alone need neither matplotlib nor the report

    if not inputs.arm:
        raise InputError("arguments", "--arm", "no fine-tune arm given")
    timer = Timer()
    samples = pd.read_parquet(Path(inputs.samples) / Files.SAMPLES, columns=None)
    arms = read_arms(inputs)
    with timer("curve"):
        curve = filtering_curve(arms, samples)
        metric = params.metric
        if metric not in curve.columns:
            raise InputError(inputs.start, "results", f"benchmark metric {metric!r} not measured; have "
                             f"{[c for c in curve.columns if c.startswith(('exact_match', 'llava_bench'))]}")
        summary = curve_summary(curve, metric)
        png = plots.filtering_curve(curve, metric)
    selective = summary[~summary["method"].isin(REFERENCES)]
    best = {str(f): g.sort_values(f"{metric}_mean", ascending=False)["method"].iloc[0]
            for f, g in selective.groupby("fraction")}
    with atomic_dir(out) as tmp:
        curve.to_parquet(tmp / Files.CURVE, index=False)
        summary.to_parquet(tmp / Files.SUMMARY, index=False)
        if png:
            (tmp / Files.CURVE_PLOT).write_bytes(base64.b64decode(png))
        write_json(tmp / Files.CURVE_JSON, {"metric": metric, "best_by_fraction": best,
                                            "summary": summary.to_dict(orient="records"),
                                            "start": curve.loc[curve["method"] == "start", metric].tolist()})
        manifest_inputs = {"samples": inputs.samples, "start": inputs.start,
                           **{f"{m}:{f}:{s}": b for m, f, s, _, b in inputs.arm}}
        write_manifest(tmp, STAGE, params.as_dict(), manifest_inputs,
                       {"n_arms": len(inputs.arm), "best_by_fraction": best}, timer.timings)
