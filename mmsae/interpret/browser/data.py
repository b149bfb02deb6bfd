"""The browser's data: the model's tokenizer and patch grid (no weights), which features are listed, the
token index, one streaming scan of the codes, and the text around a token."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mmsae.activations.store import image_index
from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import CLASSES, iter_codes, read_columns, require_columns
from mmsae.models.grid import Grid, adapter_grid

MODS = ("text", "image", "special")
TOKEN_COLUMNS = ("row", "sample_id", "position", "modality", "token_id", "patch")  # + image_index where stored
FEATURE_COLUMNS = ("feature", "n_text", "n_image", "n_special", "top_text_rows", "top_text_acts",
                   "top_image_rows", "top_image_acts", "weight", "class")


def model_view(path: str | os.PathLike, trust_remote_code: bool = False) -> tuple[Any, Grid | None]:
    """(tokenizer, patch grid or None) of the model at `path`, through its adapter's own rules."""
    from mmsae.models import load_config

    path = str(path)
    config, cls = load_config(path, trust_remote_code)
    try:
        processor = cls.load_processor(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(path, "model.path", f"cannot load the processor ({exc.__class__.__name__})") from exc
    # the adapter only reads model.config for the grid and the special ids: a config stand-in will do
    adapter = cls(SimpleNamespace(config=config), processor, path)
    return adapter.tokenizer, adapter_grid(adapter)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by incremental decoding (keeps the tokenizer's own spacing rules)."""
    out, prev = [], ""
    ids = [int(i) for i in ids]
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([ids[i]], skip_special_tokens=False))
        prev = cur
    return out


def modality_totals(tokens: pd.DataFrame) -> dict[str, int]:
    counts = tokens["modality"].value_counts()
    return {m: int(counts.get(m, 0)) for m in MODS}


def feature_stats(features: pd.DataFrame, totals: dict[str, int]) -> pd.DataFrame:
    """features plus density (overall and per modality) and max_act (top text or image activation)."""
    require_columns(Files.FEATURES, list(features.columns), FEATURE_COLUMNS)
    df = features.copy()
    n_all = sum(totals.values())
    df["density"] = (df["n_text"] + df["n_image"] + df["n_special"]) / max(n_all, 1)
    df["density_text"] = df["n_text"] / totals["text"] if totals["text"] else np.nan
    df["density_image"] = df["n_image"] / totals["image"] if totals["image"] else np.nan

    def first(v: Any) -> float:
        return float(v[0]) if v is not None and len(v) else np.nan

    df["max_act"] = np.fmax(df["top_text_acts"].map(first).to_numpy(np.float64),
                            df["top_image_acts"].map(first).to_numpy(np.float64))
    return df


def select_features(stats: pd.DataFrame, n_features: int, per_class: int) -> pd.DataFrame:
    """The listed features, in listing order: the `per_class` densest of each live class, then
    cross-modal by weight, then the rest by density; at most n_features, dead ones never."""
    live = stats[stats["class"] != "dead"]
    by_density = live.sort_values(["density", "feature"], ascending=[False, True])
    picked: list[int] = []
    for cls in CLASSES:
        picked += by_density.loc[by_density["class"] == cls, "feature"].head(per_class).tolist()
    cross = live[live["weight"].notna()].sort_values(["weight", "feature"], ascending=[False, True])
    picked += cross["feature"].tolist() + by_density["feature"].tolist()
    order = list(dict.fromkeys(picked))[:n_features]
    return stats.set_index("feature", drop=False).loc[order].reset_index(drop=True)


def read_tokens(path: str | os.PathLike) -> pd.DataFrame:
    """tokens.parquet indexed by store row (row i = position i of the frame): only the columns the site
    uses, sample_id and modality as categoricals (a code per token, not a Python string)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    stored = pq.read_schema(path).names
    require_columns(path, stored, TOKEN_COLUMNS)
    columns = [*TOKEN_COLUMNS, *(["image_index"] if "image_index" in stored else [])]
    tokens = pq.read_table(path, columns=columns, read_dictionary=["sample_id", "modality"]).to_pandas()
    if not tokens["row"].is_monotonic_increasing:
        tokens = tokens.sort_values("row", kind="stable")
    tokens = tokens.reset_index(drop=True)
    if "image_index" not in tokens.columns:  # a store from before multi-image records: one image each
        tokens["image_index"] = image_index(tokens)
    if not np.array_equal(tokens["row"].to_numpy(), np.arange(len(tokens))):
        raise InputError(path, "row", "rows are not 0..n-1")
    return tokens


def read_features(path: str | os.PathLike) -> pd.DataFrame:
    return read_columns(path, FEATURE_COLUMNS)


def top_samples(rows: Any, acts: Any, sample_of_row: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The first k distinct samples among top rows (already sorted by activation): (sample, row, act)."""
    out, seen = [], set()
    for r, a in zip(rows if rows is not None else [], acts if acts is not None else [], strict=True):
        s = int(sample_of_row[int(r)])
        if s not in seen:
            seen.add(s)
            out.append((s, int(r), float(a)))
            if len(out) == k:
                break
    return out


def scan_codes(codes: str | os.PathLike | pd.DataFrame, feats: np.ndarray, d_sae: int, sample_of_row: np.ndarray,
               pairs: set[tuple[int, int]], bins: int, batch_rows: int = 1 << 20
               ) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], dict[int, float]]]:
    """Two streaming passes over codes.parquet for the listed features `feats`:
    (histogram counts [n_feats, 3 modalities, bins], bin tops [n_feats] (the feature's largest
    activation), {(feature, sample): {row: activation}} for the wanted (feature, sample) pairs)."""
    slot = np.full(d_sae, -1, np.int64)
    slot[feats] = np.arange(len(feats))
    hi = np.zeros(len(feats), np.float64)
    for b in iter_codes(codes, ("feature", "activation"), batch_rows):
        s = slot[b["feature"].astype(np.int64)]
        m = s >= 0
        np.maximum.at(hi, s[m], b["activation"][m].astype(np.float64))
    hi[hi <= 0] = 1.0

    n_samples = int(sample_of_row.max()) + 1 if len(sample_of_row) else 0
    want = np.unique(np.array([s * d_sae + f for f, s in pairs], np.int64))
    hist = np.zeros(len(feats) * 3 * bins, np.int64)
    found: dict[tuple[int, int], dict[int, float]] = {}
    mod_index = {m: i for i, m in enumerate(MODS)}
    for b in iter_codes(codes, ("row", "modality", "feature", "activation"), batch_rows):
        feat = b["feature"].astype(np.int64)
        s = slot[feat]
        m = s >= 0
        act = b["activation"].astype(np.float64)
        mod = pd.Series(b["modality"][m]).map(mod_index).fillna(2).to_numpy(np.int64)  # unknown: special
        bin_ = np.clip((act[m] / hi[s[m]] * bins).astype(np.int64), 0, bins - 1)
        hist += np.bincount((s[m] * 3 + mod) * bins + bin_, minlength=len(hist))
        row = b["row"].astype(np.int64)
        key = sample_of_row[row] * d_sae + feat if n_samples else np.zeros(0, np.int64)
        hit = np.flatnonzero(np.isin(key, want))
        for i in hit:
            found.setdefault((int(feat[i]), int(sample_of_row[row[i]])), {})[int(row[i])] = float(act[i])
    return hist.reshape(len(feats), 3, bins), hi, found


def text_context(tokenizer, tok: dict[str, np.ndarray], rows: np.ndarray, top_row: int, acts: dict[int, float],
             width: int) -> tuple[list[tuple[str, str, float | None]], list[int]]:
    """The items around the top token: `width` items either side, a run of image tokens as one item."""
    rows = rows[np.argsort(tok["position"][rows], kind="stable")]
    is_image = tok["modality"][rows] == "image"
    # item boundaries: every non-image token starts one, an image run starts one at its first token
    starts = np.flatnonzero(~is_image | np.r_[True, ~is_image[:-1]])
    item_of = np.cumsum(np.isin(np.arange(len(rows)), starts)) - 1
    at = int(item_of[int(np.flatnonzero(rows == top_row)[0])])
    lo, hi = max(0, at - width), min(len(starts), at + width + 1)
    ends = np.r_[starts[1:], len(rows)]
    ids = [int(tok["token_id"][rows[starts[i]]]) for i in range(lo, hi) if not is_image[starts[i]]]
    strings = iter(token_strings(tokenizer, ids))
    pieces, positions = [], []
    for i in range(lo, hi):
        first = int(rows[starts[i]])
        if is_image[starts[i]]:
            run = rows[starts[i]:ends[i]]
            best = max((acts.get(int(r), 0.0) for r in run), default=0.0)
            label = f"image \u00d7{len(run)}" + (f" max {best:.3g}" if best > 0 else "")
            pieces.append(("image", label, None))
        else:
            kind = "special" if tok["modality"][first] == "special" else "text"
            pieces.append((kind, next(strings), acts.get(first)))
        positions.append(int(tok["position"][first]))
    return pieces, positions


def text_previews(tokenizer, listed: pd.DataFrame, tokens: pd.DataFrame, n: int = 4) -> dict[int, str]:
    """Per feature: its distinct top text tokens, for the index."""
    token_id = tokens["token_id"].to_numpy()
    out = {}
    for r in listed.itertuples(index=False):
        rows = r.top_text_rows if r.top_text_rows is not None else []
        words = [tokenizer.decode([int(token_id[int(x)])], skip_special_tokens=False).strip() for x in rows]
        out[int(r.feature)] = " \u00b7 ".join(list(dict.fromkeys(w for w in words if w))[:n])
    return out
