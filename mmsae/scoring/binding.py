"""The binding pass of consistency_binding: does the image show the concepts of neighbouring words
TOGETHER ("red square": one image token both red and square), not just somewhere? See
mmsae.scoring.methods for the definition; one small dense problem per sample (`binding_sample`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from mmsae.scoring.concepts import selected
from mmsae.scoring.streams import sample_groups, streamed

if TYPE_CHECKING:
    from mmsae.scoring.context import ScoringContext


def binding_stats(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """Per sample, over the XMc features (see `consistency_binding`): `coverage` (text coverage, the
    text side counted only on a feature's own word when `bind_own_word`), `deficit` (the binding
    deficit D) and `n_pairs` (neighbouring concept-token pairs checked). One pass over the codes,
    XMc features only, settled sample by sample (`sample_groups`; a whole-pool pass when the codes are
    out of order); one small dense problem per sample."""
    return streamed(lambda stream: binding_pass(ctx, stream))


def binding_pass(ctx: ScoringContext, stream: bool) -> dict[str, np.ndarray]:
    """binding_stats; with `stream`, settled sample by sample (Unsorted when the codes are out of order)."""
    cf, cfg = ctx.concept_features, ctx.consistency
    sel, pos = selected(ctx)
    n_sel = len(sel)
    top = cf["top_token"].to_numpy()[sel]
    norms = (cf["norm_text"].to_numpy()[sel], cf["norm_image"].to_numpy()[sel])
    out = {"coverage": np.zeros(ctx.n), "deficit": np.zeros(ctx.n), "n_pairs": np.zeros(ctx.n, np.int64)}
    parts: list[tuple[np.ndarray, ...]] = []
    bar = tqdm(total=ctx.n, desc="binding", disable=ctx.n < 10000, file=sys.stderr)

    def settle() -> None:
        """Solve the samples of `parts` (whole samples; each sample's rows keep their stream order)."""
        s, side, key, j, act = (np.concatenate([p[i] for p in parts] + [np.zeros(0, d)])
                                for i, d in enumerate((np.int64, np.int64, np.int64, np.int64, np.float64)))
        parts.clear()
        if ctx.consistency.per_modality_norm and n_sel:
            act = np.minimum(act / np.where(side == 0, norms[0][j], norms[1][j]), 1.0)
        order = np.lexsort((key, side, s))
        s, side, key, j, act = s[order], side[order], key[order], j[order], act[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
        for a, z in zip(starts, np.r_[starts[1:], len(s)] if len(s) else starts, strict=True):
            i = s[a]
            out["coverage"][i], out["deficit"][i], out["n_pairs"][i] = binding_sample(
                side[a:z], key[a:z], j[a:z], act[a:z], float(cfg.bind_min_text), int(cfg.bind_max_gap),
                str(cfg.bind_aggregate))
        bar.update(len(starts))

    for b, s, side, tid in sample_groups(ctx, ("position", "feature", "activation"), stream):
        j = pos[b["feature"].astype(np.int64)]
        act = b["activation"].astype(np.float64)
        m = (act > ctx.delta) & (s >= 0) & (side >= 0) & (j >= 0)
        if cfg.bind_own_word:  # a concept feature's text side counts on its own word only
            m &= (side == 1) | (tid == top[np.clip(j, 0, None)] if n_sel else False)
        # text tokens are keyed by position (their order), image tokens by store row
        key = np.where(side == 0, b["position"].astype(np.int64), b["row"].astype(np.int64))
        parts.append((s[m], side[m], key[m], j[m], act[m]))
        if stream:
            settle()
    settle()
    bar.close()
    return out


def binding_sample(side: np.ndarray, key: np.ndarray, j: np.ndarray, act: np.ndarray, min_text: float,
                   max_gap: int, aggregate: str) -> tuple[float, float, int]:
    """(coverage, deficit D, pairs checked) of one sample from its XMc codes: side 0 = text (key =
    position), 1 = image (key = store row); j = the feature's index among the XMc; act = normalised."""
    feats, jj = np.unique(j, return_inverse=True)
    text = side == 0
    if not text.any():
        return 0.0, 0.0, 0
    tpos, ti = np.unique(key[text], return_inverse=True)
    a = np.zeros((len(tpos), len(feats)))
    np.maximum.at(a, (ti, jj[text]), act[text])
    rows, ri = np.unique(key[~text], return_inverse=True)
    b = np.zeros((len(rows), len(feats)))
    np.maximum.at(b, (ri, jj[~text]), act[~text])
    a_f, b_f = a.max(0), b.max(0) if len(rows) else np.zeros(len(feats))
    coverage = float(np.minimum(a_f, b_f).sum() / a_f.sum()) if a_f.sum() > 0 else 0.0
    concept = a.max(1) >= min_text
    if concept.sum() < 2 or not len(rows):
        return coverage, 0.0, 0
    ac, pc = a[concept], tpos[concept]
    c = ac @ b.T / ac.sum(1, keepdims=True)  # [concept token, image token]: how much of its concept it shows
    g = c.max(1)
    best = np.full(len(pc), np.inf)  # per token: its smallest deficit over its neighbours
    n_pairs = 0
    for k in np.flatnonzero(np.diff(pc) <= max_gap):
        d = min(g[k], g[k + 1]) - float(np.minimum(c[k], c[k + 1]).max())  # present apart, not together
        best[k], best[k + 1] = min(best[k], d), min(best[k + 1], d)
        n_pairs += 1
    paired = np.isfinite(best)
    if not paired.any():
        return coverage, 0.0, 0
    d = best[paired].max() if aggregate == "max" else best[paired].mean()
    return coverage, float(np.clip(d, 0.0, 1.0)), n_pairs
