"""Stage curve: the filtering curve — benchmark score against kept fraction, per selection method.

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
import json
import sys
from pathlib import Path

from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.cli import parser, run
from mmsae.errors import InputError

STAGE = "curve"


def build_parser():
    p = parser(STAGE, __doc__)
    p.add_argument("--samples", required=True, help="sample artifact folder (samples.parquet, for ground truth)")
    p.add_argument("--start", required=True, help="benchmark folder of the starting model")
    p.add_argument("--arm", nargs=5, action="append", default=[],
                   metavar=("METHOD", "FRACTION", "SEED", "FINETUNE", "BENCHMARK"),
                   help="one fine-tune arm: selection method, kept fraction, seed ('-' unless random), its "
                        "finetune folder and benchmark folder; repeat per arm")
    return p


def _results(folder: str) -> dict:
    path = Path(folder) / Files.RESULTS
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "results", f"unreadable benchmark results: {exc}") from None


def body(args, params: dict) -> None:
    import pandas as pd

    from mmsae.evaluation.curve import curve_summary, filtering_curve
    from mmsae.report import plots

    if not args.arm:
        raise InputError("arguments", "--arm", "no fine-tune arm given")
    timer = Timer()
    samples = pd.read_parquet(Path(args.samples) / Files.SAMPLES, columns=None)
    arms = [{"method": "start", "fraction": 0.0, "seed": None, "train_ids": None, "results": _results(args.start)}]
    for method, fraction, seed, finetune, bench in args.arm:
        ids_path = Path(finetune) / Files.TRAIN_IDS
        if not ids_path.exists():
            raise InputError(ids_path, "sample_id", "missing: the finetune arm did not finish")
        arms.append({"method": method, "fraction": float(fraction), "seed": None if seed == "-" else int(seed),
                     "train_ids": pd.read_parquet(ids_path)["sample_id"].tolist(), "results": _results(bench)})
    with timer("curve"):
        curve = filtering_curve(arms, samples)
        metric = params["metric"]
        if metric not in curve.columns:
            raise InputError(args.start, "results", f"benchmark metric {metric!r} not measured; have "
                             f"{[c for c in curve.columns if c.startswith(('exact_match', 'llava_bench'))]}")
        summary = curve_summary(curve, metric)
        png = plots.filtering_curve(curve, metric)
    selective = summary[~summary["method"].isin(["all", "random", "oracle"])]  # references, not contenders
    best = {str(f): g.sort_values(f"{metric}_mean", ascending=False)["method"].iloc[0]
            for f, g in selective.groupby("fraction")}
    with atomic_dir(args.out) as tmp:
        curve.to_parquet(tmp / Files.CURVE, index=False)
        summary.to_parquet(tmp / Files.SUMMARY, index=False)
        if png:
            (tmp / Files.CURVE_PLOT).write_bytes(base64.b64decode(png))
        write_json(tmp / Files.CURVE_JSON, {"metric": metric, "best_by_fraction": best,
                                        "summary": summary.to_dict(orient="records"),
                                        "start": curve.loc[curve["method"] == "start", metric].tolist()})
        inputs = {"samples": args.samples, "start": args.start,
                  **{f"{m}:{f}:{s}": b for m, f, s, _, b in args.arm}}
        write_manifest(tmp, STAGE, params, inputs, {"n_arms": len(args.arm), "best_by_fraction": best},
                       timer.timings)


if __name__ == "__main__":
    sys.exit(run(STAGE, build_parser(), body))
