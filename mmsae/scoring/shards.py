"""Scoring in shards (config score.shards): the per-sample passes of mmsae.scoring run as parallel jobs
over contiguous sample ranges, then a gather finishes the scores; the result is identical to one job.

A shard takes a contiguous run of the samples in store order (their store rows [row0, row1); the
shards' row ranges partition the store) and computes, for its samples only:

- the code statistics of `ScoringContext.code_stats` (per-sample L0, L1, image L0, co-occurring
  features), reading only the codes.parquet batches that hold its rows - the same batches, cut at the
  same rows, that one job reads (`CodesRange`), so every per-sample sum is accumulated in the same order;
- with nosae_cosine: its samples' scores (a per-sample quantity);
- with offdist / consistency_gated: the per-sample image statistics of `ScoringContext.image_stats`
  (image-token count, sum of unit hidden states, SAE reconstruction error), from the store blocks that
  hold its rows, cut as in one job (`StoreRows`); the SAE sees each block's rows as in one job.

Everything that needs the whole pool runs in the gather, on a ScoringContext of all samples into which
the shards' statistics are put: random (seeded over all sample ids), model_loss (its fill value for
missing losses), offdist's robust z-scores (median / MAD over all samples), and the consistency scores,
whose concept-feature selection reads the codes of every sample (two passes over codes.parquet).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmsae.artifacts import Files
from mmsae.codes import CodesReader
from mmsae.errors import InputError
from mmsae.features import require_columns
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import METHODS, rank, score_samples, with_parts

IMAGE_UNIT = "image_unit.npy"  # per sample (stats.parquet order): sum of unit-norm image hidden states
CODE_METHODS = frozenset({"cosine", "l0", "l1", "cooc_l0", "offdist", "consistency_gated"})
IMAGE_METHODS = frozenset({"offdist", "consistency_gated"})
PER_SAMPLE_METHODS = frozenset({"nosae_cosine"})  # final in the shard: its score needs no other sample


def shard_folder(out: str | os.PathLike, shard: int) -> Path:
    """Where shard `shard` of the score artifact `out` is written (a sibling, temporary in the workflow)."""
    out = Path(out)
    return out.parent / f"{out.name}.shards" / f"{shard:04d}"


def shard_samples(tokens: pd.DataFrame, sample_ids: Sequence[str], n_shards: int) -> list[tuple[list[str], int, int]]:
    """(sample ids, row0, row1) of each shard: the scored samples in store order, cut into n_shards runs of
    (nearly) equal size; the row ranges partition [0, n_rows). Scored samples absent from the store (no
    tokens, so no statistics) go to the last shard."""
    require_columns(Files.TOKENS, list(tokens.columns), ("row", "sample_id"))
    tok = tokens.sort_values("row", kind="stable") if not tokens["row"].is_monotonic_increasing else tokens
    sid = tok["sample_id"].astype(str).to_numpy()
    n_rows = len(sid)
    new = np.r_[True, sid[1:] != sid[:-1]] if n_rows else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    order = sid[starts]
    if len(set(order)) != len(order):
        raise InputError(Files.TOKENS, "sample_id", "a sample's tokens are not contiguous in the store")
    wanted = {str(s) for s in sample_ids}
    keep = np.array([s in wanted for s in order], bool)
    order, starts = order[keep], starts[keep]
    missing = sorted(wanted - set(order))
    m = len(order)
    out = []
    for k in range(n_shards):
        a, b = k * m // n_shards, (k + 1) * m // n_shards
        row0 = 0 if k == 0 else (int(starts[a]) if a < m else n_rows)
        row1 = n_rows if k == n_shards - 1 else (int(starts[b]) if b < m else n_rows)
        out.append((order[a:b].tolist() + (missing if k == n_shards - 1 else []), row0, row1))
    return out


class CodesRange:
    """The code batches that hold store rows [row0, row1): `mmsae.features.iter_codes` yields them for this
    object. Batches are cut as one pass over all the codes cuts them (mmsae.codes.CodesReader: every
    batch_rows codes, across row groups and parts), so each is a batch one job reads too; only the parts
    and row groups that hold those batches are read. Codes must be ordered by row (encode writes them so;
    checked on the row groups' statistics)."""

    def __init__(self, path: str | os.PathLike, row0: int, row1: int) -> None:
        self.path, self.row0, self.row1 = Path(path), int(row0), int(row1)

    def iter_codes(self, columns: Sequence[str], batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
        yield from CodesReader(self.path).iter_codes(columns, batch_rows, rows=(self.row0, self.row1))


class StoreRows:
    """An ActivationStore read only through the blocks that hold rows [row0, row1): `iter_blocks` yields
    those blocks of the whole store's iteration (same starts, same rows); everything else is the store's."""

    def __init__(self, store, row0: int, row1: int) -> None:
        self.store, self.row0, self.row1 = store, int(row0), int(row1)

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def iter_blocks(self, layer: int, block_tokens: int) -> Iterator[tuple[int, np.ndarray]]:
        n = self.store.n_tokens
        if self.row0 >= self.row1:
            return
        for start in range((self.row0 // block_tokens) * block_tokens, min(self.row1, n), block_tokens):
            yield start, self.store.read(layer, start, min(n, start + block_tokens))


def shard_statistics(store, codes: str | os.PathLike, layer: int, sample_ids: Sequence[str], methods: Sequence[str],
                     shard: int, n_shards: int, *, delta: float = 0.0, text_modalities: Sequence[str] = ("text",),
                     sae=None, batch_rows: int = 1 << 20) -> dict:
    """The per-sample statistics of shard `shard` of `n_shards` (see the module docstring): a dict with
    `stats` (frame, one row per sample of the shard), `cooc` (frame), `image_unit` (array or None) and
    `modalities` (the modalities present in the codes it read)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("score.methods", "methods", f"unknown method {unknown[0]!r}; known: {sorted(METHODS)}")
    needed = with_parts(methods)  # a combined method needs what its parts need
    tokens = store.tokens
    ids, row0, row1 = shard_samples(tokens, sample_ids, n_shards)[shard]
    # the tokens let code_stats look up each code's sample / modality / position by row
    mine = ScoringContext(ids, codes=CodesRange(codes, row0, row1), tokens=tokens, delta=delta,
                          text_modalities=text_modalities, batch_rows=batch_rows)
    stats = pd.DataFrame({"sample_id": mine.ids.astype(str)})
    out: dict = {"stats": stats, "cooc": pd.DataFrame({"sample_id": pd.Series([], dtype=str),
                                                       "feature": pd.Series([], dtype=np.int64)}),
                 "image_unit": None, "modalities": [], "rows": [row0, row1]}
    if CODE_METHODS & needed:
        st = mine.code_stats
        for key in ("l0", "l1", "image_l0"):
            stats[key] = st[key]
        out["cooc"] = pd.DataFrame({"sample_id": mine.ids[st["cooc_sample"]].astype(str),
                                    "feature": st["cooc_feature"]})
        out["modalities"] = [str(m) for m in st["modalities"]]
    store_methods = (IMAGE_METHODS | PER_SAMPLE_METHODS) & needed
    if store_methods:
        # every sample id, so each block's rows (and the SAE batches) are exactly those of one job
        every = ScoringContext(sample_ids, store=StoreRows(store, row0, row1), layer=layer, tokens=tokens, sae=sae,
                               delta=delta, text_modalities=text_modalities, batch_rows=batch_rows)
        pos = every.index.get_indexer(mine.ids)
        if "nosae_cosine" in methods:
            stats["nosae_cosine"] = METHODS["nosae_cosine"](every)[pos]
        if IMAGE_METHODS & needed:
            im = every.image_stats
            stats["image_count"] = im["count"][pos]
            out["image_unit"] = np.ascontiguousarray(im["unit_sum"][pos])
            if "error" in im:
                stats["image_error"] = im["error"][pos]
    return out


def write_shard(folder: str | os.PathLike, result: dict, shard: int, n_shards: int) -> None:
    """Write a shard_statistics result (stats.parquet, cooc.parquet, image_unit.npy, shard.json)."""
    folder = Path(folder)
    result["stats"].to_parquet(folder / Files.SHARD_STATS, index=False)
    result["cooc"].to_parquet(folder / Files.SHARD_COOC, index=False)
    if result["image_unit"] is not None:
        np.save(folder / IMAGE_UNIT, result["image_unit"], allow_pickle=False)
    (folder / Files.SHARD_INFO).write_text(json.dumps({"modalities": result["modalities"], "rows": result["rows"],
                                                 "shard": shard, "n_shards": n_shards}))


def gather_context(shards: Sequence[str | os.PathLike], sample_ids: Sequence[str], **context) -> tuple[ScoringContext, dict]:
    """A ScoringContext of all samples (built from `context`, as one job builds it) holding the shards'
    statistics, and the per-sample scores the shards finished ({method: scores in ctx.ids order})."""
    ctx = ScoringContext(sample_ids, **context)
    frames, coocs, units, modalities = [], [], [], set()
    for k, d in enumerate(shards):
        d = Path(d)
        if not (d / Files.SHARD_INFO).exists():
            raise InputError(d / Files.SHARD_INFO, "path", "score shard missing or unfinished")
        info = json.loads((d / Files.SHARD_INFO).read_text())
        if (info["shard"], info["n_shards"]) != (k, len(shards)):
            raise InputError(d / Files.SHARD_INFO, "shard", f"shard {info['shard']} of {info['n_shards']}, "
                                                      f"expected {k} of {len(shards)}")
        frames.append(pd.read_parquet(d / Files.SHARD_STATS))
        coocs.append(pd.read_parquet(d / Files.SHARD_COOC))
        units.append(np.load(d / IMAGE_UNIT, allow_pickle=False) if (d / IMAGE_UNIT).exists() else None)
        modalities.update(info["modalities"])
    stats = pd.concat(frames, ignore_index=True)
    pos = ctx.index.get_indexer(stats["sample_id"].astype(str))
    if (pos < 0).any() or len(np.unique(pos)) != len(pos) or len(pos) != ctx.n:
        raise InputError(Path(shards[0]).parent, "sample_id", "the shards do not cover the scored samples once each")

    def spread(col: str) -> np.ndarray:
        out = np.zeros(ctx.n, np.float64)
        out[pos] = stats[col].to_numpy(np.float64)
        return out

    if "l0" in stats:
        cooc = pd.concat(coocs, ignore_index=True)
        s = ctx.index.get_indexer(cooc["sample_id"].astype(str)).astype(np.int64)
        keys = np.unique(s << 32 | cooc["feature"].to_numpy(np.int64))  # sorted, as one job's intersect1d
        ctx.__dict__["code_stats"] = {
            "l0": spread("l0"), "l1": spread("l1"), "image_l0": spread("image_l0"),
            "cooc_sample": (keys >> 32).astype(np.int64), "cooc_feature": (keys & 0xFFFFFFFF).astype(np.int64),
            "modalities": np.array(sorted(modalities)),
        }
    if "image_count" in stats:
        unit = np.zeros((ctx.n, ctx.store.d_model if ctx.store is not None else units[0].shape[1]), np.float64)
        unit[pos] = np.concatenate(units)
        image = {"count": spread("image_count"), "unit_sum": unit}
        if "image_error" in stats:
            image["error"] = spread("image_error")
        ctx.__dict__["image_stats"] = image
    done = {m: spread(m) for m in PER_SAMPLE_METHODS if m in stats}
    return ctx, done


def score_gathered(ctx: ScoringContext, methods: Sequence[str], done: dict[str, np.ndarray]) -> pd.DataFrame:
    """score_samples(ctx, methods), with the scores the shards finished taken as they are."""
    scores = score_samples(ctx, [m for m in methods if m not in done])
    for m in methods:
        if m in done:
            s = np.asarray(done[m], np.float64)
            if s.shape != (ctx.n,) or not np.isfinite(s).all():
                raise RuntimeError(f"method {m!r} returned invalid scores")
            scores[f"score_{m}"], scores[f"rank_{m}"] = s, rank(s)
    return scores[["sample_id", *[f"{p}_{m}" for m in methods for p in ("score", "rank")]]]
