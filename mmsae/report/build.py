"""The run report's content: `build_report` gathers everything into one JSON-safe dict (report.json)
plus base64 PNG figures; `write_report` writes report.json and index.html (mmsae.report.html) into a
folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmsae.artifacts import Files, write_json
from mmsae.evaluation.auroc import DIRECTION, auroc_table
from mmsae.features import CLASSES
from mmsae.report import plots
from mmsae.report.html import flatten, render
from mmsae.scoring.methods import methods_in

MODALITY_WORDS = {"overall": "overall", "all": "overall", "total": "overall",
                  "text": "text", "image": "image", "special": "special"}
FILLER = {"per_modality", "by_modality", "modality", "modalities"}


def _number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def metrics_by_modality(flat: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{"image.fvu": .1, "fvu": .2, "l0_text": 3} -> {"fvu": {"overall": .2, "image": .1}, "l0": {"text": 3}}.

    A key's modality is a dotted component (or an `_`-separated first/last word of one) among
    overall/all/total/text/image/special; keys without one count as overall. Non-numbers are skipped.
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if not _number(value):
            continue
        modality, parts = "overall", []
        for comp in key.split("."):
            words = comp.split("_")
            if comp in MODALITY_WORDS:
                modality = MODALITY_WORDS[comp]
                continue
            if len(words) > 1 and words[-1] in MODALITY_WORDS:
                modality, comp = MODALITY_WORDS[words[-1]], "_".join(words[:-1])
            elif len(words) > 1 and words[0] in MODALITY_WORDS:
                modality, comp = MODALITY_WORDS[words[0]], "_".join(words[1:])
            if comp not in FILLER:
                parts.append(comp)
        out.setdefault(".".join(parts) or key, {})[modality] = float(value)
    order = ["overall", "text", "image", "special"]
    return {m: {k: v[k] for k in order if k in v} for m, v in out.items()}


def _plotted_metrics(flat: Mapping[str, Any], limit: int = 16) -> dict[str, dict[str, float]]:
    """The metrics reported per modality (when there are any; else all numbers), at most `limit`."""
    grouped = metrics_by_modality(flat)
    per_modality = {m: v for m, v in grouped.items() if len(v) > 1}
    return dict(list((per_modality or grouped).items())[:limit])


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (report.json stays strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _groups(scores: pd.DataFrame, samples: pd.DataFrame) -> np.ndarray:
    if "corruption" not in samples.columns:
        return np.full(len(scores), "clean", dtype=object)
    kind = samples.set_index(samples["sample_id"].astype(str))["corruption"].reindex(scores["sample_id"].astype(str))
    return np.array(["clean" if pd.isna(k) else str(k) for k in kind], dtype=object)


def _examples(scores: pd.DataFrame, samples: pd.DataFrame, methods: list[str], n: int) -> dict[str, list[dict]]:
    by_id = samples.set_index(samples["sample_id"].astype(str))
    out = {}
    for m in methods:
        ranked = scores.sort_values(f"rank_{m}")
        pick = pd.concat([ranked.head(n), ranked.tail(n)]).drop_duplicates("sample_id")
        rows = []
        for sid, score, rk in zip(pick["sample_id"], pick[f"score_{m}"], pick[f"rank_{m}"], strict=True):
            rec = by_id.loc[str(sid)]
            responses = list(rec["responses"]) if rec.get("responses") is not None else []
            pref = int(rec["preferred"]) if "preferred" in rec and not pd.isna(rec["preferred"]) else 0
            corruption = rec.get("corruption")
            rows.append({"rank": int(rk), "score": float(score), "sample_id": str(sid),
                         "corruption": None if corruption is None or pd.isna(corruption) else str(corruption),
                         "question": str(rec["question"]),
                         "response": responses[pref] if 0 <= pref < len(responses) else ""})
        out[m] = rows
    return out


def build_report(title: str, samples: pd.DataFrame, scores: pd.DataFrame, features: pd.DataFrame | None,
                 sae_metrics: Mapping[str, Any], premise: Mapping[str, Any] | None = None,
                 toy_metrics: Mapping[str, Any] | None = None, subsets: Mapping[str, Any] | None = None,
                 artifacts: Mapping[str, str] | None = None, feature_rule: str = "",
                 n_examples: int = 3, sae_eval: Mapping[str, pd.DataFrame] | None = None,
                 layer_scores: Mapping[int, pd.DataFrame] | None = None,
                 curve: Mapping[str, Any] | None = None,
                 ) -> tuple[dict[str, Any], dict[str, str | None]]:
    """(report dict, figures {name: base64 PNG}). `premise` is premise.json's content; `sae_eval` holds
    evaluate_sae's tables (ce, reconstruction, summary); `layer_scores` the scores.parquet of an SAE
    trained at each layer (the AUROC-per-layer table); `curve` the curve stage's {"curve": DataFrame,
    "summary": DataFrame, "metric", "best_by_fraction"}."""
    methods = methods_in(scores)
    groups = _groups(scores, samples)
    table = auroc_table(scores, samples)
    by_layer = (pd.concat([auroc_table(sc, samples).assign(layer=int(layer)) for layer, sc in layer_scores.items()],
                          ignore_index=True) if layer_scores else pd.DataFrame())
    classes = ({c: int((features["class"] == c).sum()) for c in CLASSES} if features is not None else {})
    flat_sae = {k: v for k, v in flatten(sae_metrics).items() if _number(v) or isinstance(v, str | bool)}
    summary = {}
    for m in methods:
        s = scores[f"score_{m}"].to_numpy(np.float64)
        summary[m] = {g: {"n": int((groups == g).sum()), "mean": float(s[groups == g].mean()),
                          "median": float(np.median(s[groups == g]))} for g in sorted(set(groups))}
    counts: dict[str, Any] = {"samples": len(samples), "scored": len(scores)}
    counts["by_corruption"] = {g: int((groups == g).sum()) for g in sorted(set(groups))}
    if features is not None:
        counts["features"] = len(features)
    report = {
        "title": title,
        "counts": counts,
        "sae_metrics": flat_sae,
        "feature_rule": feature_rule,
        "feature_classes": classes,
        "methods": methods,
        "score_summary": summary,
        "direction": DIRECTION,
        "auroc": table.to_dict("records"),
        "premise": dict(premise) if premise else None,
        "toy_model": dict(toy_metrics) if toy_metrics else None,
        "subsets": dict(subsets or {}),
        "artifacts": dict(artifacts or {}),
        "examples": _examples(scores, samples, methods, n_examples) if n_examples else {},
        "sae_eval": {k: v.to_dict("records") for k, v in (sae_eval or {}).items()},
        "auroc_by_layer": by_layer.to_dict("records"),
        "curve": ({"metric": curve["metric"], "best_by_fraction": dict(curve["best_by_fraction"]),
                   "summary": curve["summary"].to_dict("records"), "arms": curve["curve"].to_dict("records")}
                  if curve else None),
    }
    figures = {
        "sae_metrics": plots.sae_metrics(_plotted_metrics(flat_sae)),
        "feature_classes": plots.class_counts(classes) if classes else None,
        "scores": plots.score_distributions(scores, groups, methods),
        "auroc": plots.auroc_heatmap(table),
        "sae_eval": plots.sae_comparison(sae_eval["ce"]) if sae_eval else None,
        "auroc_by_layer": plots.auroc_by_layer(by_layer) if len(by_layer) else None,
        "curve": plots.filtering_curve(curve["curve"], curve["metric"]) if curve else None,
    }
    return json_safe(report), figures


def write_report(out: str | os.PathLike, report: Mapping[str, Any], figures: Mapping[str, str | None]) -> None:
    out = Path(out)
    write_json(out / Files.REPORT, report)
    (out / Files.INDEX_HTML).write_text(render(report, figures), encoding="utf-8")
