"""Data scoring: one score per sample per method, HIGHER = kept first (paper Algorithm 1 + ablations).

Methods (registered by name in METHODS; the names of config `score.methods`):

- `cosine`      Algorithm 1: sum of the cross-modal weights of the features that co-occur in the
                sample, i.e. whose activation exceeds `delta` on >= 1 text and >= 1 image token of it.
- `l0`          mean number of active features per token (position 0 excluded).
- `l1`          mean summed activation per token (position 0 excluded).
- `cooc_l0`     number of co-occurring features.
- `random`      seeded uniform scores (depend only on the seed and the set of sample ids).
- `nosae_cosine` cosine of the sample's mean image hidden state vs its mean text hidden state at the
                SAE's layer (the reviewers' no-SAE baseline; raw states from the extract store).
- `model_loss`  minus the model's loss on the preferred response (low loss = good data).

Cross-modal consistency (do the sample's text and image AGREE?), over the sample's concept features
XMc: features whose text side is one word and whose image side is substantial, chosen without labels
from features.parquet, the token ids and the codes (see `mmsae.scoring.concepts.concept_features`):

- `consistency`       text coverage: sum_f min(A_f, B_f) / sum_f A_f, the share of the text side's
                      concept activation that the image side also carries (0 where sum_f A_f = 0).
- `consistency_image` image coverage: sum_f min(A_f, B_f) / sum_f B_f (0 where sum_f B_f = 0).
- `consistency_cos`   cosine of the vectors A and B (0 where either is 0).
  A_f = the feature's largest activation over the sample's text tokens, B_f = over its image tokens,
  each divided by the feature's mean top-K activation in that modality and capped at 1 ("pm",
  `consistency.per_modality_norm`). All three: higher = the image carries what the text says.
- `offdist`           minus how far the sample's image lies outside the scored pool's own range: the
                      largest robust |z| (median / 1.4826 MAD over the samples with image tokens) of
                      three per-sample image statistics: the SAE's relative reconstruction error on its
                      image tokens (needs the SAE; left out without one), their L0 (from the codes), and
                      the distance of their mean unit-norm hidden state from the pool's coordinate-wise
                      median. Higher = more typical. 0 for a sample without image tokens.
- `consistency_gated` `consistency`, minus 2 where the offdist |z| exceeds `consistency.gate_z`:
                      every off-distribution image ranks below every other sample.
- `consistency_binding` text coverage x (1 - D), D = binding deficit: does the image show the concepts
                      of neighbouring words TOGETHER ("red square": one image token both red and
                      square), not just somewhere? A text token is a concept token if some XMc feature
                      reaches `bind_min_text` on it (text side on the feature's own word only,
                      `bind_own_word`; coverage likewise). Per concept token t and image token r,
                      C_t(r) = sum_f a_tf b_rf / sum_f a_tf (how much of t's concept r shows), g_t =
                      max_r C_t(r). Neighbouring concept tokens t, u (<= `bind_max_gap` positions
                      apart) have deficit min(g_t, g_u) - max_r min(C_t(r), C_u(r)): present apart but
                      not together. A token's deficit is its best neighbour's (a caption's "square
                      blue" spans two objects, "red square" binds), D = their mean (`bind_aggregate`);
                      0 without pairs. Higher = clean.
- `consistency_binding_gated` `consistency_binding` minus 2 where the offdist |z| exceeds `gate_z`.

The SAE for what the loss cannot see (combined with `model_loss`, whose low loss on the toy world means a
correct answer, but on real data also a short, generic or already-known one):

- `sae_loss_rank`     rank aggregation: the mean of the rank-normalised `consistency_gated` and
                      `model_loss` scores (`rank_unit`: average ranks mapped to [0, 1], 1 = best; tied
                      scores share their mean rank, so neither part's ties favour a sample).
- `sae_loss_gate`     a gate, then the loss: a sample FAILS the consistency gate when its image is off
                      the pool's distribution (offdist |z| > `gate_z`, as in consistency_gated) or its
                      `consistency` is below the `consistency.loss_gate_quantile` quantile of the pool's;
                      every failing sample ranks below every passing one, each group by `model_loss`.

`PARTS` names each combined method's parts: the score stage needs the model_loss artifact and the
concept features whenever a method or one of its parts does (`with_parts`).

"Text" is modality `text` (special tokens excluded) unless `text_modalities` says otherwise (the
score stage passes ("text", "special") for features built with the release rule, whose "text" is
every non-image token). "Per token" for l0 / l1 counts the sample's tokens at position > 0 of the
modalities that occur in codes.parquet (i.e. the ones the SAE encoded). A sample without any codes
(or without image tokens, ...) gets a defined score of 0, never NaN. Ranks: 1 = best, ordered by
(-score, sample_id), so ties are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import require_columns
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.offdist import store_block_tokens
from mmsae.scoring.streams import Unsorted, streamed

METHODS: dict[str, Callable[[ScoringContext], np.ndarray]] = {}
NOSAE_ROWS = 4096  # nosae_cosine adds a block's rows to its float64 sums this many at a time


def register(name: str) -> Callable:
    def deco(fn: Callable[[ScoringContext], np.ndarray]) -> Callable[[ScoringContext], np.ndarray]:
        METHODS[name] = fn
        return fn

    return deco


def _per_token(total: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    return np.divide(total, n_tokens, out=np.zeros_like(total), where=n_tokens > 0)


@register("cosine")
def score_cosine(ctx: ScoringContext) -> np.ndarray:
    w = np.asarray(ctx.need("weights", "cosine"), np.float64)
    st = ctx.code_stats
    feat = st["cooc_feature"]
    if len(feat) and feat.max() >= len(w):
        raise InputError(Files.FEATURES, "feature", f"codes use feature {feat.max()}, features has {len(w)}")
    return np.bincount(st["cooc_sample"], weights=w[feat], minlength=ctx.n).astype(np.float64)


@register("l0")
def score_l0(ctx: ScoringContext) -> np.ndarray:
    return _per_token(ctx.code_stats["l0"], ctx.tokens_per_sample)


@register("l1")
def score_l1(ctx: ScoringContext) -> np.ndarray:
    return _per_token(ctx.code_stats["l1"], ctx.tokens_per_sample)


@register("cooc_l0")
def score_cooc_l0(ctx: ScoringContext) -> np.ndarray:
    return np.bincount(ctx.code_stats["cooc_sample"], minlength=ctx.n).astype(np.float64)


@register("random")
def score_random(ctx: ScoringContext) -> np.ndarray:
    return np.random.default_rng(ctx.seed).random(ctx.n)  # ctx.ids are sorted: order-independent


@register("nosae_cosine")
def score_nosae_cosine(ctx: ScoringContext) -> np.ndarray:
    return streamed(lambda stream: {"score": nosae_pass(ctx, stream)})["score"]


def nosae_pass(ctx: ScoringContext, stream: bool) -> np.ndarray:
    """Per sample: cosine of its summed image and text hidden states. With `stream`, a sample is settled as
    soon as the store blocks move past it (a sample's tokens are contiguous in the store), so only the
    open sample's sums are carried, [2, d_model], not [2, n, d_model]; raises Unsorted if a settled sample
    comes back. Each sample's sums add the same rows in the same order either way."""
    store = ctx.need("store", "nosae_cosine")
    layer = ctx.need("layer", "nosae_cosine")
    sides = ctx.token_sides
    s_all, side_all = sides["sample"], sides["side"]
    n, block = ctx.n, store_block_tokens(store)

    def cosine(sums: torch.Tensor) -> np.ndarray:
        text, image = sums[0].numpy(), sums[1].numpy()
        denom = np.linalg.norm(text, axis=1) * np.linalg.norm(image, axis=1)
        dot = (text * image).sum(1)
        return np.divide(dot, denom, out=np.zeros(len(dot)), where=denom > 0)

    out, done = np.zeros(n), np.zeros(n, bool)
    keys = np.arange(n) if not stream else None
    sums = torch.zeros(2, n, store.d_model, dtype=torch.float64) if not stream else None
    carry: tuple[int, torch.Tensor] | None = None  # the open sample and its sums so far
    for start, x in store.iter_blocks(layer, block):
        s, side = s_all[start : start + len(x)], side_all[start : start + len(x)]
        m = (s >= 0) & (side >= 0)
        if stream:  # this block's samples (and the open one), in a buffer of their own
            present = np.unique(s[m])
            if done[present].any():
                raise Unsorted
            keys = np.union1d(present, [carry[0]]) if carry is not None else present
            sums = torch.zeros(2, len(keys), store.d_model, dtype=torch.float64)
            if carry is not None:
                sums[:, np.searchsorted(keys, carry[0])] = carry[1]
        if m.any():
            rows = np.flatnonzero(m)
            local = np.searchsorted(keys, s[rows]) if stream else s[rows]
            flat = torch.from_numpy(side[rows].astype(np.int64) * len(keys) + local)
            # in row order, NOSAE_ROWS at a time: no float64 copy of the whole block
            for a in range(0, len(rows), NOSAE_ROWS):
                piece = torch.from_numpy(np.ascontiguousarray(x[rows[a : a + NOSAE_ROWS]])).double()
                sums.view(2 * len(keys), -1).index_add_(0, flat[a : a + NOSAE_ROWS], piece)
        if stream:
            last = int(s_all[start + len(x) - 1]) if len(x) else -1
            open_ = keys == last  # the sample the block ends in may go on in the next one
            out[keys[~open_]] = cosine(sums[:, torch.from_numpy(~open_)])
            done[keys[~open_]] = True
            carry = (last, sums[:, torch.from_numpy(open_)][:, 0].clone()) if open_.any() else None
    if not stream:
        return cosine(sums)
    if carry is not None:
        out[carry[0]] = cosine(carry[1][:, None])[0]
    return out


@register("model_loss")
def score_model_loss(ctx: ScoringContext) -> np.ndarray:
    losses = ctx.need("losses", "model_loss")
    require_columns(Files.LOSS, list(losses.columns), ("sample_id", "loss"))
    loss = pd.Series(losses["loss"].astype("float64").to_numpy(), index=losses["sample_id"].astype(str).to_numpy())
    missing = ~ctx.index.isin(loss.index)
    if missing.any():
        raise InputError(Files.LOSS, "sample_id", f"no loss for sample {ctx.ids[missing][0]!r}")
    score = -loss.reindex(ctx.ids).to_numpy()
    bad = ~np.isfinite(score)  # no response tokens: rank last, not dropped
    if bad.any():
        score[bad] = (score[~bad].min() if (~bad).any() else 0.0) - 1.0
    return score


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@register("consistency")
def score_consistency(ctx: ScoringContext) -> np.ndarray:
    c = ctx.concept_sums
    return _ratio(c["min"], c["text"])


@register("consistency_image")
def score_consistency_image(ctx: ScoringContext) -> np.ndarray:
    c = ctx.concept_sums
    return _ratio(c["min"], c["image"])


@register("consistency_cos")
def score_consistency_cos(ctx: ScoringContext) -> np.ndarray:
    c = ctx.concept_sums
    return _ratio(c["dot"], np.sqrt(c["text_sq"] * c["image_sq"]))


@register("offdist")
def score_offdist(ctx: ScoringContext) -> np.ndarray:
    return -ctx.offdist_z


@register("consistency_gated")
def score_consistency_gated(ctx: ScoringContext) -> np.ndarray:
    return score_consistency(ctx) - 2.0 * (ctx.offdist_z > float(ctx.consistency.gate_z))


@register("consistency_binding")
def score_consistency_binding(ctx: ScoringContext) -> np.ndarray:
    bd = ctx.binding
    return bd["coverage"] * (1.0 - bd["deficit"])


@register("consistency_binding_gated")
def score_consistency_binding_gated(ctx: ScoringContext) -> np.ndarray:
    return score_consistency_binding(ctx) - 2.0 * (ctx.offdist_z > float(ctx.consistency.gate_z))


# Combined methods and the methods they are built from: what a method needs is what its parts need.
PARTS: dict[str, tuple[str, ...]] = {
    "sae_loss_rank": ("consistency_gated", "model_loss"),
    "sae_loss_gate": ("consistency_gated", "model_loss"),
}
# Methods that read no SAE output (the references an SAE-based selection is measured against).
NO_SAE = frozenset({"random", "nosae_cosine", "model_loss"})


def with_parts(methods: Sequence[str]) -> set[str]:
    """The methods and, for each combined one, its parts (what the score stage must provide for)."""
    return {p for m in methods for p in (m, *PARTS.get(m, ()))}


def uses_sae(method: str) -> bool:
    """A registered score method that reads the SAE's codes or features (alone or combined with others)."""
    return method in METHODS and method not in NO_SAE


def rank_unit(scores: np.ndarray) -> np.ndarray:
    """Scores as ranks in [0, 1] (1 = the highest score, 0 = the lowest; ties share their average rank;
    0.5 for a single sample), so that scores on different scales can be averaged."""
    scores = np.asarray(scores, np.float64)
    if len(scores) < 2:
        return np.full(len(scores), 0.5)
    avg = pd.Series(scores).rank(method="average").to_numpy()
    return (avg - 1.0) / (len(scores) - 1.0)


def rank_mean(*parts: np.ndarray) -> np.ndarray:
    """Rank aggregation: the mean of the parts' `rank_unit` ranks."""
    return np.mean([rank_unit(p) for p in parts], axis=0)


def gate_then(order_by: np.ndarray, fail: np.ndarray) -> np.ndarray:
    """Every sample with `fail` below every other one; within each group by `order_by` (higher first)."""
    return rank_unit(order_by) - 2.0 * np.asarray(fail, bool)


def consistency_gate_fails(consistency: np.ndarray, offdist_z: np.ndarray, gate_z: float, quantile: float) -> np.ndarray:
    """The samples failing sae_loss_gate's gate: an off-distribution image (|z| > gate_z) or a consistency
    below the pool's `quantile` quantile (0 = none fail on consistency; the lowest quantile fail)."""
    consistency = np.asarray(consistency, np.float64)
    low = consistency < np.quantile(consistency, quantile) if quantile > 0 and len(consistency) else False
    return (np.asarray(offdist_z, np.float64) > gate_z) | low


@register("sae_loss_rank")
def score_sae_loss_rank(ctx: ScoringContext) -> np.ndarray:
    return rank_mean(score_consistency_gated(ctx), score_model_loss(ctx))


@register("sae_loss_gate")
def score_sae_loss_gate(ctx: ScoringContext) -> np.ndarray:
    cfg = ctx.consistency
    fail = consistency_gate_fails(score_consistency(ctx), ctx.offdist_z, float(cfg.gate_z), float(cfg.loss_gate_quantile))
    return gate_then(score_model_loss(ctx), fail)


def rank(scores: np.ndarray) -> np.ndarray:
    """1 = best: by (-score, position), positions being sorted sample ids (deterministic ties)."""
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    out = np.empty(len(scores), np.int64)
    out[order] = np.arange(1, len(scores) + 1)
    return out


def score_samples(ctx: ScoringContext, methods: Sequence[str]) -> pd.DataFrame:
    """DataFrame(sample_id, score_<m>, rank_<m> for each method), sorted by sample_id."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("score.methods", "methods", f"unknown method {unknown[0]!r}; known: {sorted(METHODS)}")
    out = {"sample_id": ctx.ids.astype(str)}
    for m in methods:
        s = np.asarray(METHODS[m](ctx), np.float64)
        if s.shape != (ctx.n,) or not np.isfinite(s).all():
            raise RuntimeError(f"method {m!r} returned invalid scores")
        out[f"score_{m}"] = s
        out[f"rank_{m}"] = rank(s)
    return pd.DataFrame(out)


def methods_in(scores: pd.DataFrame) -> list[str]:
    return [c[len("score_"):] for c in scores.columns if c.startswith("score_")]
