"""Stage report: index.html (self-contained, figures inline) + report.json with the same numbers.

SAE metrics (metrics.json of train_sae, whatever its keys), feature class counts, score distributions
per method split by corruption kind, AUROC per method x corruption kind (P(score(clean) >
score(corrupted)); 1 = perfect filter, 0.5 = chance), the premise table and toy-model exact match
when given, subset sizes, best/worst samples per method, links to the artifacts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.errors import InputError
from mmsae.features import read_columns
from mmsae.report import build_report, write_report
from mmsae.scoring import rank, read_samples


def read_json(path: Path) -> dict:
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, "file", f"not valid JSON ({exc.msg})") from exc


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("report", __doc__)
    argp.add_argument("--samples", required=True, help="sample artifact folder (samples.parquet)")
    argp.add_argument("--train-sae", required=True, help="train_sae artifact folder (metrics.json)")
    argp.add_argument("--features", required=True, help="features artifact folder (features.parquet)")
    argp.add_argument("--score", required=True, help="score artifact folder (scores.parquet, subsets/)")
    argp.add_argument("--premise", default=None, help="premise artifact folder (premise.json), optional")
    argp.add_argument("--toy-model", default=None, help="toy_model artifact folder (metrics.json), optional")
    argp.add_argument("--sae-eval", default=None, help="evaluate_sae artifact folder, optional")
    argp.add_argument("--curve", default=None, help="curve artifact folder (the filtering curve), optional")
    argp.add_argument("--baseline-scores", default=None,
                      help="baseline_scores artifact folder: its IFD selection joins the AUROC table as 'ifd'")
    argp.add_argument("--layer-score", action="append", default=[], metavar="LAYER=FOLDER",
                      help="score artifact of an SAE at another layer (AUROC per layer); repeatable")

    def body(args, params):
        timer = Timer()
        with timer("read"):
            samples = read_samples(args.samples).drop_columns(["image"]).to_pandas()
            scores = read_columns(Path(args.score) / Files.SCORES, ("sample_id",), all_columns=True)
            features = read_columns(Path(args.features) / Files.FEATURES, ("feature", "class"))
            sae_metrics = read_json(Path(args.train_sae) / Files.METRICS)
            premise = read_json(Path(args.premise) / Files.PREMISE) if args.premise else None
            toy = read_json(Path(args.toy_model) / Files.METRICS) if args.toy_model else None
            score_manifest = read_manifest(args.score)
            layer_scores = {}
            for spec in args.layer_score:
                layer, sep, folder = spec.partition("=")
                if not sep or not layer.isdigit():
                    raise InputError("--layer-score", "layer", f"expected LAYER=FOLDER, got {spec!r}")
                layer_scores[int(layer)] = read_columns(Path(folder) / Files.SCORES, ("sample_id",), all_columns=True)
            sae_eval = ({name: pd.read_parquet(Path(args.sae_eval) / f"{name}.parquet")
                         for name in ("ce", "reconstruction", "summary")} if args.sae_eval else None)
            rule = read_manifest(args.features).get("params", {}).get("rule", "")
            if args.baseline_scores:
                ifd = read_columns(Path(args.baseline_scores) / Files.IFD, ("sample_id", "ifd_score"))
                scores = scores.merge(ifd[["sample_id", "ifd_score"]].rename(columns={"ifd_score": "score_ifd"}),
                                      on="sample_id", how="left", validate="one_to_one")
                if scores["score_ifd"].isna().any():
                    raise InputError(Path(args.baseline_scores) / Files.IFD, "sample_id",
                                     "a scored sample has no IFD score")
                scores["rank_ifd"] = rank(scores["score_ifd"].to_numpy())
            curve = None
            if args.curve:
                cj = read_json(Path(args.curve) / Files.CURVE_JSON)
                curve = {"curve": pd.read_parquet(Path(args.curve) / Files.CURVE),
                         "summary": pd.read_parquet(Path(args.curve) / Files.SUMMARY),
                         "metric": cj["metric"], "best_by_fraction": cj["best_by_fraction"]}

        inputs = {"samples": args.samples, "train_sae": args.train_sae, "features": args.features, "score": args.score}
        inputs.update({k: v for k, v in (("premise", args.premise), ("toy_model", args.toy_model),
                                         ("sae_eval", args.sae_eval), ("curve", args.curve),
                                         ("baseline_scores", args.baseline_scores)) if v})
        files = {"samples": Files.SAMPLES, "train_sae": Files.METRICS, "features": Files.FEATURES, "score": Files.SCORES,
                 "premise": Files.PREMISE, "toy_model": Files.METRICS, "sae_eval": Files.SUMMARY,
                 "curve": Files.CURVE, "baseline_scores": Files.IFD}
        out_parent = Path(args.out).resolve().parent
        links = {k: os.path.relpath(Path(v).resolve() / files[k], out_parent / Path(args.out).name)
                 for k, v in inputs.items()}
        with timer("build"):
            report, figures = build_report(
                params["title"], samples, scores, features, sae_metrics, premise=premise, toy_metrics=toy,
                subsets=score_manifest.get("counts", {}).get("subsets", {}), artifacts=links,
                feature_rule=f"feature rule: {rule}" if rule else "", n_examples=params["examples"], sae_eval=sae_eval,
                layer_scores=layer_scores, curve=curve,
            )
        with atomic_dir(args.out) as tmp:
            write_report(tmp, report, figures)
            write_manifest(tmp, "report", params, inputs,
                           {"samples": len(samples), "methods": len(report["methods"]), "auroc_rows": len(report["auroc"])},
                           timer.timings)

    return cli.run("report", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
