"""`train_sae.modality_mix`: the modality make-up of every training batch.

natural: the store's own mix, the plain BatchSchedule over all training rows (today's batches, bit for bit).
balanced / explicit shares: one BatchSchedule per modality over that modality's training rows, each with
its fixed number of rows per batch (the shares rounded by largest remainder) and its own seed, zipped
step by step. Every sub-schedule is a pure function of (seed, step), so the mixed batch is too and a
resumed run sees the batches of an uninterrupted one. A modality that is short cycles through its own
epochs faster, i.e. it is drawn again (with replacement across epochs); one with fewer rows than its
per-batch count is tiled first, so a batch may hold one token twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mmsae.activations import ActivationStore
from mmsae.errors import InputError
from mmsae.sae.training.batches import BatchSchedule
from mmsae.sae.training.tokens import SCOPES


def trained_modalities(scope: str, include_special: bool) -> tuple[str, ...]:
    return SCOPES[scope] + (("special",) if include_special else ())


def mix_shares(mix: str | dict[str, Any], scope: str, include_special: bool) -> dict[str, float] | None:
    """{modality: share} summing to 1 for a balanced / explicit mix; None for `natural`. InputError when the
    mix names a modality the SAE does not train on or leaves every share at 0."""
    if mix == "natural":
        return None
    mods = trained_modalities(scope, include_special)
    if len(SCOPES[scope]) < 2:
        raise InputError("--params", "modality_mix", f"{mix!r} needs scope 'all' (image + text); scope is {scope!r}")
    if mix == "balanced":
        return {m: 1.0 / len(mods) for m in mods}
    if not isinstance(mix, dict):
        raise InputError("--params", "modality_mix", f"expected natural, balanced or {{modality: share}}, got {mix!r}")
    extra = sorted(set(mix) - set(mods))
    if extra:
        raise InputError("--params", "modality_mix", f"shares for {extra} but the SAE trains on {list(mods)}")
    total = float(sum(mix.values()))
    if not total > 0:
        raise InputError("--params", "modality_mix", f"shares {mix} sum to {total}; need > 0")
    return {m: float(mix.get(m, 0.0)) / total for m in mods}


def batch_counts(shares: dict[str, float], batch_size: int) -> dict[str, int]:
    """Rows per batch per modality: the shares x batch_size rounded by largest remainder (sum = batch_size)."""
    raw = {m: s * batch_size for m, s in shares.items()}
    counts = {m: math.floor(v) for m, v in raw.items()}
    for m in sorted(raw, key=lambda m: (counts[m] - raw[m], m))[: batch_size - sum(counts.values())]:
        counts[m] += 1
    return counts


def sub_seed(seed: int, index: int) -> int:
    """An independent seed per modality stream (SeedSequence: no overlap with the natural schedule's)."""
    return int(np.random.SeedSequence([seed % 2**32, 1 + index]).generate_state(1)[0])


class MixedSchedule:
    """The batch stream of a balanced / shared mix: the BatchSchedule interface (per_epoch, batch_rows,
    iter_batches), each batch = the modalities' rows in a fixed order (see the module docstring)."""

    def __init__(self, rows_by_modality: dict[str, np.ndarray], n_rows: int, chunk_tokens: int, buffer_chunks: int,
                 batch_size: int, shares: dict[str, float], seed: int) -> None:
        self.counts = batch_counts(shares, batch_size)
        self.batch_size = batch_size
        self.parts: list[tuple[str, BatchSchedule]] = []
        for i, (m, count) in enumerate(self.counts.items()):
            if count == 0:
                continue
            rows = np.asarray(rows_by_modality.get(m, np.zeros(0, np.int64)), dtype=np.int64)
            if len(rows) == 0:
                raise InputError("--params", "modality_mix", f"share {shares[m]:.3g} of {m!r} tokens, but the "
                                                             f"training split has none")
            if len(rows) < count:  # fewer rows than one batch needs: tile (sorted, so groups stay contiguous)
                rows = np.repeat(rows, math.ceil(count / len(rows)))
            self.parts.append((m, BatchSchedule(rows, n_rows, chunk_tokens, buffer_chunks, count, sub_seed(seed, i))))
        # steps until the most plentiful modality has been seen once (the estimate of the input scale reads
        # min(16, per_epoch) batches)
        self.per_epoch = max(s.per_epoch for _, s in self.parts)

    def batch_rows(self, step: int) -> np.ndarray:
        return np.concatenate([s.batch_rows(step) for _, s in self.parts])

    def batch_modality(self) -> np.ndarray:
        """The modality of each position of a batch (the same for every step)."""
        return np.concatenate([np.full(self.counts[m], m, dtype=object) for m, _ in self.parts])

    def iter_batches(self, store: ActivationStore, layer: int, start: int, stop: int,
                     device: torch.device | None = None) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        streams = [s.iter_batches(store, layer, start, stop, device=device) for _, s in self.parts]
        try:
            for parts in zip(*streams, strict=True):
                step = parts[0][0]
                xs = [x for _, x in parts]
                yield step, (torch.cat(xs) if isinstance(xs[0], torch.Tensor) else np.concatenate(xs))
        finally:
            for it in streams:
                it.close()


def make_schedule(train_rows: np.ndarray, rows_by_modality: dict[str, np.ndarray] | None, n_rows: int,
                  chunk_tokens: int, buffer_chunks: int, batch_size: int, seed: int,
                  shares: dict[str, float] | None) -> BatchSchedule | MixedSchedule:
    """The natural BatchSchedule (shares None) or the MixedSchedule of `shares`."""
    if shares is None:
        return BatchSchedule(train_rows, n_rows, chunk_tokens, buffer_chunks, batch_size, seed)
    assert rows_by_modality is not None
    return MixedSchedule(rows_by_modality, n_rows, chunk_tokens, buffer_chunks, batch_size, shares, seed)
