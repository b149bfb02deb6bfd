"""Cross-modal concept features (XMc) and the per-sample concept sums behind the consistency scores.

XMc: features whose text side is one word and whose image side is substantial, chosen without labels
from features.parquet, the token ids and the codes (`concept_features`, config score.consistency).
`concept_sums` gives, per sample, the sums over XMc of A_f (the feature's largest activation over the
sample's text tokens) and B_f (over its image tokens), each divided by the feature's mean top-K
activation in that modality and capped at 1 ("pm", `consistency.per_modality_norm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import iter_codes, require_columns
from mmsae.scoring.streams import sample_groups, streamed

if TYPE_CHECKING:
    from mmsae.scoring.context import ScoringContext

CONCEPT_COLUMNS = ("feature", "n_text", "n_image", "top_text_rows", "top_text_acts", "top_image_acts", "weight")


def concept_features(ctx: ScoringContext) -> pd.DataFrame:
    """Label-free statistics of every feature of features.parquet and the concept-feature set XMc.

    Columns: feature; top_token = the token id carrying most activation mass among its top-K text
    tokens (-1 if none; ties to the smaller id); norm_text / norm_image = mean of its top-K
    activations in each modality (the "pm" divisors); balance = min / max of the two; doc_freq =
    share of the scored samples whose text holds top_token; selectivity = share of its whole text
    activation mass (over the scored samples' text tokens, one pass over the codes) that lies on
    top_token; selected = XMc: active on >= min_per_modality text and image tokens, cross-modal
    weight > 0, balance >= min_balance, selectivity >= min_selectivity, doc_freq <= max_doc_freq
    (config score.consistency). XMc = cross-modal features whose text side is one word (selectivity),
    not a template word present in most samples (doc_freq), with an image side of comparable size.
    """
    feats = ctx.need("features", "consistency")
    require_columns(Files.FEATURES, list(feats.columns), CONCEPT_COLUMNS)
    cfg, ti = ctx.consistency, ctx.token_index
    feature = feats["feature"].to_numpy(np.int64)
    d = int(feature.max()) + 1 if len(feature) else 0
    lens = feats["top_text_rows"].map(len).to_numpy()
    rows = np.concatenate([np.asarray(r, np.int64) for r in feats["top_text_rows"]] + [np.zeros(0, np.int64)])
    acts = np.concatenate([np.asarray(a, np.float64) for a in feats["top_text_acts"]] + [np.zeros(0)])
    if len(rows) and (rows.min() < 0 or rows.max() >= len(ti["token_id"])):
        raise InputError(Files.FEATURES, "top_text_rows", "row outside tokens.parquet")
    mass = (pd.DataFrame({"f": np.repeat(feature, lens), "t": ti["token_id"][rows], "a": acts})
            .groupby(["f", "t"], as_index=False)["a"].sum()
            .sort_values(["f", "a", "t"], ascending=[True, False, True], kind="stable")
            .drop_duplicates("f"))
    top = np.full(d, -1, np.int64)
    top[mass["f"].to_numpy()] = mass["t"].to_numpy()

    def mean_top(col: str) -> np.ndarray:
        out = np.zeros(d)
        out[feature] = feats[col].map(lambda a: float(np.mean(a)) if len(a) else 0.0).to_numpy(np.float64)
        return out

    norm_t, norm_i = mean_top("top_text_acts"), mean_top("top_image_acts")
    hi = np.maximum(norm_t, norm_i)
    balance = np.divide(np.minimum(norm_t, norm_i), hi, out=np.zeros(d), where=hi > 0)
    is_text = (ti["side"] == 0) & (ti["sample"] >= 0)
    n_ids = int(ti["token_id"].max(initial=0)) + 1
    # (sample, token id) once each
    pairs = np.unique(ti["sample"][is_text].astype(np.int64) * n_ids + ti["token_id"][is_text])
    df_token = np.bincount(pairs % n_ids, minlength=n_ids) / max(ctx.n, 1)
    doc_freq = np.where(top >= 0, df_token[np.clip(top, 0, None)], 0.0)
    total, on_top = np.zeros(d), np.zeros(d)
    for b in iter_codes(ctx.need("codes", "consistency"), ("row", "feature", "activation"), ctx.batch_rows):
        s, side, tid = ctx.code_tokens(b)
        f = b["feature"].astype(np.int64)
        if len(f) and (f.min() < 0 or f.max() >= d):
            raise InputError(Files.FEATURES, "feature", f"codes use feature {f.max()}, features has {d}")
        act = b["activation"].astype(np.float64)
        m = (act > ctx.delta) & (s >= 0) & (side == 0)
        f, act, tid = f[m], act[m], tid[m]
        total += np.bincount(f, weights=act, minlength=d)
        on_top += np.bincount(f, weights=act * (tid == top[f]), minlength=d)
    selectivity = np.divide(on_top, total, out=np.zeros(d), where=total > 0)
    n_text, n_image, weight = (np.zeros(d) for _ in range(3))
    n_text[feature] = feats["n_text"].to_numpy(np.float64)
    n_image[feature] = feats["n_image"].to_numpy(np.float64)
    weight[feature] = feats["weight"].astype("float64").fillna(0.0).to_numpy()
    m = int(cfg.min_per_modality)
    selected = ((n_text >= m) & (n_image >= m) & (weight > 0) & (top >= 0) & (balance >= cfg.min_balance)
                & (selectivity >= cfg.min_selectivity) & (doc_freq <= cfg.max_doc_freq))
    return pd.DataFrame({"feature": np.arange(d), "top_token": top, "norm_text": norm_t, "norm_image": norm_i,
                         "balance": balance, "doc_freq": doc_freq, "selectivity": selectivity,
                         "selected": selected})


def selected(ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray]:
    """(XMc feature ids, each feature's index among them or -1)."""
    cf = ctx.concept_features
    sel = cf["feature"].to_numpy()[cf["selected"].to_numpy()]
    pos = np.full(len(cf), -1, np.int64)
    pos[sel] = np.arange(len(sel))
    return sel, pos


def max_by_key(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, the largest value per key)."""
    if not len(keys):
        return keys.astype(np.int64), vals.astype(np.float64)
    order = np.lexsort((-vals, keys))
    keys, vals = keys[order], vals[order]
    first = np.r_[True, keys[1:] != keys[:-1]]
    return keys[first].astype(np.int64), vals[first].astype(np.float64)


def concept_sums(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """Per sample: sum_f A, sum_f B, sum_f min(A, B), A.B, |A|^2, |B|^2 over the XMc features, where
    A / B = per (sample, selected feature) the largest activation over the sample's text / image tokens,
    divided by the feature's norm_text / norm_image and capped at 1 when `per_modality_norm` (absent =
    0). A second pass over the codes, XMc features only, settled sample by sample (`sample_groups`;
    a whole-pool pass when the codes are out of order)."""
    return streamed(lambda stream: concept_pass(ctx, stream))


def concept_pass(ctx: ScoringContext, stream: bool) -> dict[str, np.ndarray]:
    """concept_sums; with `stream`, settled sample by sample (Unsorted when the codes are out of order)."""
    cf, n = ctx.concept_features, ctx.n
    sel, pos = selected(ctx)
    n_sel = len(sel)
    norms = {0: cf["norm_text"].to_numpy()[sel], 1: cf["norm_image"].to_numpy()[sel]}
    names = ("text", "image", "min", "dot", "text_sq", "image_sq")
    out = {k: np.zeros(n) for k in names}
    keys: dict[int, list[np.ndarray]] = {0: [], 1: []}
    vals: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def settle() -> None:
        """Add the samples of keys / vals (whole samples: each sample's sums start from 0 and run in
        key order, so the result does not depend on how the samples were grouped)."""
        kv = {}
        for sd in (0, 1):
            k, v = max_by_key(np.concatenate(keys[sd] + [np.zeros(0, np.int64)]),
                              np.concatenate(vals[sd] + [np.zeros(0)]))
            if ctx.consistency.per_modality_norm and n_sel:
                v = np.minimum(v / norms[sd][k % n_sel], 1.0)
            kv[sd] = (k, v)
            keys[sd].clear()
            vals[sd].clear()
        (tk, tv), (ik, iv) = kv[0], kv[1]
        d = max(n_sel, 1)
        common, it, ii = np.intersect1d(tk, ik, assume_unique=True, return_indices=True)
        sc = common // d
        bc = lambda s, w: np.bincount(s, weights=w, minlength=n).astype(np.float64)  # noqa: E731
        for name, part in (("text", bc(tk // d, tv)), ("image", bc(ik // d, iv)),
                           ("min", bc(sc, np.minimum(tv[it], iv[ii]))), ("dot", bc(sc, tv[it] * iv[ii])),
                           ("text_sq", bc(tk // d, tv * tv)), ("image_sq", bc(ik // d, iv * iv))):
            out[name] += part

    for b, s, side, _ in sample_groups(ctx, ("feature", "activation"), stream):
        j = pos[b["feature"].astype(np.int64)]
        act = b["activation"].astype(np.float64)
        m = (act > ctx.delta) & (s >= 0) & (side >= 0) & (j >= 0)
        for sd in (0, 1):
            k, v = max_by_key(s[m & (side == sd)] * n_sel + j[m & (side == sd)], act[m & (side == sd)])
            keys[sd].append(k)
            vals[sd].append(v)
        if stream:
            settle()
    settle()
    return out
