"""How well a score separates clean from corrupted samples.

- `auroc(scores, labels)`: P(score(positive) > score(negative)) + 0.5 P(tie), from average ranks
  (Mann-Whitney U / (n_pos n_neg)).
- `auroc_table(scores, samples)`: per method and corruption kind, positives = clean samples, so
  AUROC = P(score(clean) > score(corrupted)): 1 = a perfect filter (clean data ranked first),
  0.5 = chance, < 0.5 = the score ranks bad data as good. "any" = all corrupted vs clean.
- `auroc_spread(reports)`: the spread of that table over runs (e.g. toy-world seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import require_columns
from mmsae.scoring.methods import methods_in

DIRECTION = (
    "AUROC = P(score(clean) > score(corrupted)), ties count 1/2: 1 = the score ranks clean data first "
    "(a perfect filter), 0.5 = chance, below 0.5 = the score ranks bad data as good."
)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along axis 0 (column-wise for 2-D input), ties given their average rank."""
    x = np.asarray(x, np.float64)
    flat = x.ndim == 1
    x = x[:, None] if flat else x
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    s = np.take_along_axis(x, order, axis=0)
    idx = np.arange(n)[:, None]
    new = np.ones_like(s, bool)
    new[1:] = s[1:] != s[:-1]
    last = np.ones_like(s, bool)
    last[:-1] = s[1:] != s[:-1]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=0)
    end = n - 1 - np.maximum.accumulate(np.where(last, n - 1 - idx, 0)[::-1], axis=0)[::-1]
    ranks = np.empty_like(s)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    return ranks[:, 0] if flat else ranks


def _auroc_from_ranks(ranks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC per (label column, score column): labels [n, L] bool, ranks [n, d] -> [L, d]."""
    y = labels.astype(np.float64)
    p = y.sum(0)
    q = len(y) - p
    u = y.T @ ranks - (p * (p + 1) / 2)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (p * q)[:, None]


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties 1/2; NaN when a class is empty."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ")
    if labels.all() or not labels.any():
        return float("nan")
    return float(_auroc_from_ranks(average_ranks(scores)[:, None], labels[:, None])[0, 0])


def auroc_table(scores: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Rows (method, kind, auroc, n_clean, n_corrupted) for every score_<method> column and every
    corruption kind present, plus kind "any". Empty when the samples carry no `corruption` column."""
    cols = ["method", "kind", "auroc", "n_clean", "n_corrupted"]
    if "corruption" not in samples.columns:
        return pd.DataFrame(columns=cols)
    require_columns(Files.SAMPLES, list(samples.columns), ("sample_id",))
    kind = samples.set_index(samples["sample_id"].astype(str))["corruption"]
    kind = kind.reindex(scores["sample_id"].astype(str)).to_numpy(dtype=object)
    kind = np.array([None if pd.isna(k) else str(k) for k in kind], dtype=object)
    clean = np.array([k is None for k in kind])
    kinds = sorted({k for k in kind if k is not None})
    rows = []
    for m in methods_in(scores):
        s = scores[f"score_{m}"].to_numpy(np.float64)
        for k in [*kinds, "any"]:
            bad = ~clean if k == "any" else kind == k
            m_sel = clean | bad
            rows.append({"method": m, "kind": k, "auroc": auroc(s[m_sel], clean[m_sel]),
                         "n_clean": int(clean.sum()), "n_corrupted": int(bad.sum())})
    return pd.DataFrame(rows, columns=cols)


def auroc_spread(reports: Mapping[str, Mapping]) -> pd.DataFrame:
    """Spread of the AUROC table over runs (e.g. toy-world seeds), from each run's report.json dict.

    One row per (method, kind, layer) found in any run: `layer` is <NA> for the report's main table
    (`auroc`, the configured SAE) and the layer for its per-layer table (`auroc_by_layer`). Columns
    n_runs (runs with a finite AUROC there), mean, sd (sample s.d., 0 for one run), min, max, and one
    column `run:<name>` per run (NaN where that run lacks the row)."""
    if not reports:
        raise InputError("compare.runs", "runs", "no runs to compare")
    values: dict[tuple, dict[str, float]] = {}
    for run, report in reports.items():
        for key, layered in (("auroc", False), ("auroc_by_layer", True)):
            for r in report.get(key) or []:
                missing = [c for c in ("method", "kind", "auroc", *(["layer"] if layered else [])) if c not in r]
                if missing:
                    raise InputError(f"{run}: report.json", f"{key}.{missing[0]}", "missing")
                layer = int(r["layer"]) if layered else None
                a = r["auroc"]
                values.setdefault((str(r["method"]), str(r["kind"]), layer), {})[run] = (
                    float(a) if a is not None else math.nan)
    cols = ["method", "kind", "layer", "n_runs", "mean", "sd", "min", "max", *[f"run:{r}" for r in reports]]
    rows = []
    for (method, kind, layer), per_run in values.items():
        v = np.array([per_run.get(r, math.nan) for r in reports], np.float64)
        ok = v[np.isfinite(v)]
        rows.append({"method": method, "kind": kind, "layer": layer, "n_runs": len(ok),
                     "mean": ok.mean() if len(ok) else math.nan,
                     "sd": ok.std(ddof=1) if len(ok) > 1 else (0.0 if len(ok) else math.nan),
                     "min": ok.min() if len(ok) else math.nan, "max": ok.max() if len(ok) else math.nan,
                     **{f"run:{r}": x for r, x in zip(reports, v, strict=True)}})
    out = pd.DataFrame(rows, columns=cols)
    out["layer"] = out["layer"].astype("Int64")
    return out.sort_values(["layer", "method", "kind"], na_position="first", kind="stable").reset_index(drop=True)
