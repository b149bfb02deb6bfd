"""How well a score separates clean from corrupted samples, and whether the method's premise holds.

- `auroc(scores, labels)`: P(score(positive) > score(negative)) + 0.5 P(tie), from average ranks
  (Mann-Whitney U / (n_pos n_neg)).
- `auroc_table(scores, samples)`: per method and corruption kind, positives = clean samples, so
  AUROC = P(score(clean) > score(corrupted)): 1 = a perfect filter (clean data ranked first),
  0.5 = chance, < 0.5 = the score ranks bad data as good. "any" = all corrupted vs clean.
- `filtering_curve(arms, samples)` / `curve_summary(curve)`: the filtering curve (benchmark score
  against kept fraction, per selection method; random over several seeds), with the share of
  known-bad samples left in each training subset when the data carry ground truth.
- `premise_check(...)`: per toy-world concept word (colours, shapes), is there one SAE feature that
  fires on the word's text tokens AND on the image patches that show it?
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mmsae.data.sample import sample_frame
from mmsae.data.toyvocab import COLOURS, SHAPES
from mmsae.data.toyworld import patch_concepts
from mmsae.errors import InputError
from mmsae.features import Codes, iter_codes, require_columns
from mmsae.models.grid import token_grid
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
    require_columns("samples.parquet", list(samples.columns), ("sample_id",))
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


def concept_words() -> dict[str, str]:
    """Toy-world concept word -> 'colour' | 'shape'."""
    return {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}


def word_token_ids(tokenizer, words: Sequence[str]) -> dict[str, int]:
    """word -> its single token id under `tokenizer` (a word that is not one token is left out)."""
    out = {}
    for w in words:
        for text in (w, " " + w):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None):
                out[w] = int(ids[0])
                break
    return out


def patch_grid(tokens: pd.DataFrame) -> int:
    """Side of the square patch grid: image tokens per image (max patch index + 1) must be a square."""
    return token_grid(tokens).rows


def premise_check(codes: Codes, tokens: pd.DataFrame, samples: pd.DataFrame, grid: int,
                  word_ids: Mapping[str, int], d_sae: int, max_samples: int | None = 500,
                  seed: int = 0) -> pd.DataFrame:
    """Per concept word: the feature maximising min(text AUROC, image AUROC), both AUROCs, and the
    best text-only / image-only AUROCs over all features.

    Text side: the `text` tokens of the samples; label = token is the word (token_id ==
    word_ids[word]); score = the feature's activation (0 where not in codes). Image side: image
    tokens (patch index -> grid cell, row-major); label = the word is among patch_concepts of the
    sample's `objects`. Only clean samples (corruption null, when that column exists) with objects
    are used: a noise-image sample's objects do not describe its pixels. At most `max_samples` of
    them (seeded, deterministic), as dense token x feature matrices.
    """
    require_columns("samples.parquet", list(samples.columns), ("sample_id", "objects"))
    require_columns("tokens.parquet", list(tokens.columns), ("row", "sample_id", "modality", "token_id", "patch"))
    pool = samples[samples["objects"].notna()]
    if "corruption" in pool.columns:
        pool = pool[pool["corruption"].isna()]
    pool = sample_frame(pool, max_samples, seed)
    if len(pool) == 0:
        raise InputError("samples.parquet", "objects", "no clean sample with ground-truth objects")
    objects = dict(zip(pool["sample_id"].astype(str), pool["objects"], strict=True))
    tok = tokens[tokens["sample_id"].astype(str).isin(objects)]
    text = tok[tok["modality"] == "text"]
    image = tok[(tok["modality"] == "image") & (tok["patch"] >= 0)]
    if len(image) and image["patch"].max() >= grid * grid:
        raise InputError("tokens.parquet", "patch", f"patch index beyond a {grid}x{grid} grid")

    n_rows = int(tokens["row"].max()) + 1 if len(tokens) else 0
    where = np.full(n_rows, -1, np.int64)  # store row -> index into [text tokens, image tokens]
    where[text["row"].to_numpy()] = np.arange(len(text))
    where[image["row"].to_numpy()] = len(text) + np.arange(len(image))
    dense = np.zeros((len(text) + len(image), d_sae), np.float32)
    for b in iter_codes(codes, ("row", "feature", "activation")):
        r = b["row"].astype(np.int64)
        pos = np.full(len(r), -1, np.int64)
        ok = (r >= 0) & (r < n_rows)
        pos[ok] = where[r[ok]]
        m = pos >= 0
        dense[pos[m], b["feature"][m].astype(np.int64)] = b["activation"][m]

    words = concept_words()
    concepts = {sid: patch_concepts(obj, grid) for sid, obj in objects.items()}
    img_concepts = [concepts[s][p] for s, p in zip(image["sample_id"].astype(str), image["patch"], strict=True)]
    text_ids = text["token_id"].to_numpy()
    y_text = np.stack([text_ids == word_ids.get(w, -1) for w in words], 1)
    y_image = np.array([[w in c for w in words] for c in img_concepts], bool).reshape(len(image), len(words))
    a_text = _auroc_from_ranks(average_ranks(dense[: len(text)]), y_text)  # [words, d_sae]
    a_image = _auroc_from_ranks(average_ranks(dense[len(text) :]), y_image)

    rows = []
    for i, (w, kind) in enumerate(words.items()):
        at, ai = a_text[i], a_image[i]
        row = {"word": w, "kind": kind, "n_text_pos": int(y_text[:, i].sum()), "n_image_pos": int(y_image[:, i].sum()),
               "feature": None, "text_auroc": np.nan, "image_auroc": np.nan, "min_auroc": np.nan,
               "best_text_feature": None, "best_text_auroc": np.nan,
               "best_image_feature": None, "best_image_auroc": np.nan}
        if np.isfinite(at).all() and d_sae:
            row["best_text_feature"], row["best_text_auroc"] = int(np.argmax(at)), float(at.max())
        if np.isfinite(ai).all() and d_sae:
            row["best_image_feature"], row["best_image_auroc"] = int(np.argmax(ai)), float(ai.max())
        if np.isfinite(at).all() and np.isfinite(ai).all() and d_sae:
            both = np.minimum(at, ai)
            f = int(np.argmax(both))
            row.update(feature=f, text_auroc=float(at[f]), image_auroc=float(ai[f]), min_auroc=float(both[f]))
        rows.append(row)
    out = pd.DataFrame(rows)
    for col in ("feature", "best_text_feature", "best_image_feature"):
        out[col] = out[col].astype("Int64")
    out.attrs.update(n_samples=len(pool), n_text_tokens=len(text), n_image_tokens=len(image), grid=grid)
    return out


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
                    raise InputError("samples.parquet", "sample_id", f"arm {arm['method']} trained on unknown samples")
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
