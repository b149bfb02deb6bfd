"""Stage report: index.html (self-contained, figures inline) + report.json with the same numbers.

SAE metrics (metrics.json of train_sae, whatever its keys), feature class counts, score distributions
per method split by corruption kind, AUROC per method x corruption kind (P(score(clean) >
score(corrupted)); 1 = perfect filter, 0.5 = chance), the premise table and toy-model exact match
when given, subset sizes, best/worst samples per method, links to the artifacts.

The package: `build` (build_report: the report dict and its figures; write_report), `html` (the page;
escapes all data-set text), `plots` (the figures), `compare` (stage compare: the AUROC spread over
runs), `timings` (job times per stage).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.data.schema import IMAGE_COLUMNS
from mmsae.errors import InputError
from mmsae.features import read_columns
from mmsae.params import ReportParams
from mmsae.report.build import build_report, json_safe, metrics_by_modality, write_report
from mmsae.scoring import rank, read_samples

STAGE = "report"
# the file each input folder is linked by in the report
LINKED_FILE = {"samples": Files.SAMPLES, "train_sae": Files.METRICS, "features": Files.FEATURES,
               "score": Files.SCORES, "premise": Files.PREMISE, "toy_model": Files.METRICS,
               "sae_eval": Files.SUMMARY, "curve": Files.CURVE, "baseline_scores": Files.IFD}
SAE_EVAL_TABLES = {"ce": Files.CE, "reconstruction": Files.RECONSTRUCTION, "summary": Files.SUMMARY}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("sample artifact folder (samples.parquet)")
    train_sae: Path = cli.arg("train_sae artifact folder (metrics.json)")
    features: Path = cli.arg("features artifact folder (features.parquet)")
    score: Path = cli.arg("score artifact folder (scores.parquet, subsets/)")
    premise: Path | None = cli.arg("premise artifact folder (premise.json), optional", default=None)
    toy_model: Path | None = cli.arg("toy_model artifact folder (metrics.json), optional", default=None)
    sae_eval: Path | None = cli.arg("evaluate_sae artifact folder, optional", default=None)
    curve: Path | None = cli.arg("curve artifact folder (the filtering curve), optional", default=None)
    baseline_scores: Path | None = cli.arg(
        "baseline_scores artifact folder: its IFD selection joins the AUROC table as 'ifd'", default=None)
    layer_score: tuple[str, ...] = cli.arg(
        "score artifact of an SAE at another layer (AUROC per layer); repeatable", default=(), action="append",
        metavar="LAYER=FOLDER")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, "file", f"not valid JSON ({exc.msg})") from exc


def run(inputs: Inputs, params: ReportParams, out: Path) -> None:
    timer = Timer()
    with timer("read"):
        table = read_samples(inputs.samples)
        samples = table.drop_columns([c for c in IMAGE_COLUMNS if c in table.column_names]).to_pandas()
        scores = read_columns(Path(inputs.score) / Files.SCORES, ("sample_id",), all_columns=True)
        features = read_columns(Path(inputs.features) / Files.FEATURES, ("feature", "class"))
        sae_metrics = read_json(Path(inputs.train_sae) / Files.METRICS)
        premise = read_json(Path(inputs.premise) / Files.PREMISE) if inputs.premise else None
        toy = read_json(Path(inputs.toy_model) / Files.METRICS) if inputs.toy_model else None
        score_manifest = read_manifest(inputs.score)
        layer_scores = _layer_scores(inputs.layer_score)
        sae_eval = ({name: pd.read_parquet(Path(inputs.sae_eval) / file) for name, file in SAE_EVAL_TABLES.items()}
                    if inputs.sae_eval else None)
        rule = read_manifest(inputs.features).get("params", {}).get("rule", "")
        if inputs.baseline_scores:
            scores = _with_ifd(scores, Path(inputs.baseline_scores) / Files.IFD)
        curve = _read_curve(Path(inputs.curve)) if inputs.curve else None

    given = {"samples": inputs.samples, "train_sae": inputs.train_sae, "features": inputs.features,
             "score": inputs.score}
    given.update({k: v for k, v in (("premise", inputs.premise), ("toy_model", inputs.toy_model),
                                    ("sae_eval", inputs.sae_eval), ("curve", inputs.curve),
                                    ("baseline_scores", inputs.baseline_scores)) if v})
    out_parent = Path(out).resolve().parent
    links = {k: os.path.relpath(Path(v).resolve() / LINKED_FILE[k], out_parent / Path(out).name)
             for k, v in given.items()}
    with timer("build"):
        report, figures = build_report(
            params.title, samples, scores, features, sae_metrics, premise=premise, toy_metrics=toy,
            subsets=score_manifest.get("counts", {}).get("subsets", {}), artifacts=links,
            feature_rule=f"feature rule: {rule}" if rule else "", n_examples=params.examples, sae_eval=sae_eval,
            layer_scores=layer_scores, curve=curve,
        )
    with atomic_dir(out) as tmp:
        write_report(tmp, report, figures)
        write_manifest(tmp, STAGE, params.as_dict(), given,
                       {"samples": len(samples), "methods": len(report["methods"]), "auroc_rows": len(report["auroc"])},
                       timer.timings)


def _layer_scores(specs: tuple[str, ...]) -> dict[int, pd.DataFrame]:
    """{layer: scores.parquet} of the --layer-score LAYER=FOLDER options."""
    layer_scores = {}
    for spec in specs:
        layer, sep, folder = spec.partition("=")
        if not sep or not layer.isdigit():
            raise InputError("--layer-score", "layer", f"expected LAYER=FOLDER, got {spec!r}")
        layer_scores[int(layer)] = read_columns(Path(folder) / Files.SCORES, ("sample_id",), all_columns=True)
    return layer_scores


def _with_ifd(scores: pd.DataFrame, ifd_path: Path) -> pd.DataFrame:
    """The scores plus baseline_scores' IFD selection as method 'ifd' (score_ifd, rank_ifd)."""
    ifd = read_columns(ifd_path, ("sample_id", "ifd_score"))
    scores = scores.merge(ifd[["sample_id", "ifd_score"]].rename(columns={"ifd_score": "score_ifd"}),
                          on="sample_id", how="left", validate="one_to_one")
    if scores["score_ifd"].isna().any():
        raise InputError(ifd_path, "sample_id", "a scored sample has no IFD score")
    scores["rank_ifd"] = rank(scores["score_ifd"].to_numpy())
    return scores


def _read_curve(folder: Path) -> dict[str, Any]:
    """The curve stage's tables and choices, as build_report takes them."""
    cj = read_json(folder / Files.CURVE_JSON)
    return {"curve": pd.read_parquet(folder / Files.CURVE), "summary": pd.read_parquet(folder / Files.SUMMARY),
            "metric": cj["metric"], "best_by_fraction": cj["best_by_fraction"]}


__all__ = ["STAGE", "Inputs", "build_report", "json_safe", "metrics_by_modality", "read_json", "run", "write_report"]
