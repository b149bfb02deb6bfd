"""The deterministic batch stream of SAE training (see mmsae.sae.training): store rows cut into groups of
zarr chunks, groups visited in a per-epoch order, tokens shuffled per (epoch, group), so that the batch
at step s is a pure function of (seed, s) and a resumed run sees the batches of an uninterrupted one."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from mmsae.activations import ActivationStore, storage_to_float
from mmsae.errors import InputError


class BatchSchedule:
    """Maps a step to its batch of store rows; see the module docstring."""

    def __init__(self, train_rows: np.ndarray, n_rows: int, chunk_tokens: int, buffer_chunks: int,
                 batch_size: int, seed: int) -> None:
        self.rows = np.asarray(train_rows, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed % 2**32
        n_chunks = math.ceil(n_rows / chunk_tokens)
        edges = np.searchsorted(self.rows, np.arange(n_chunks + 1, dtype=np.int64) * chunk_tokens)
        spans: list[tuple[int, int]] = []
        first = 0
        for c in range(1, n_chunks + 1):
            if c - first >= buffer_chunks and edges[c] - edges[first] >= batch_size:
                spans.append((first, c))
                first = c
        if first < n_chunks:
            if spans and edges[n_chunks] - edges[first] < batch_size:
                spans[-1] = (spans[-1][0], n_chunks)
            else:
                spans.append((first, n_chunks))
        # (index range into train rows, store row range) per group
        self.groups = [(int(edges[a]), int(edges[b]), a * chunk_tokens, min(b * chunk_tokens, n_rows)) for a, b in spans]
        self.counts = np.array([(i1 - i0) // batch_size for i0, i1, _, _ in self.groups], dtype=np.int64)
        self.per_epoch = int(self.counts.sum())
        if self.per_epoch == 0:
            raise InputError("--params", "batch_size", f"batch_size {batch_size} exceeds the {len(self.rows)} training tokens")
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))}
        return self._orders[epoch]

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, group, batch index within the group) of `step`."""
        epoch, k = divmod(step, self.per_epoch)
        order = self.order(epoch)
        cum = np.cumsum(self.counts[order])
        pos = int(np.searchsorted(cum, k, side="right"))
        return epoch, int(order[pos]), int(k - (cum[pos - 1] if pos else 0))

    def permutation(self, epoch: int, group: int) -> np.ndarray:
        i0, i1, _, _ = self.groups[group]
        return np.random.default_rng([self.seed, epoch, group]).permutation(i1 - i0)

    def batch_rows(self, step: int) -> np.ndarray:
        """Store rows of the batch at `step` (for tests and debugging)."""
        epoch, g, b = self.locate(step)
        perm = self.permutation(epoch, g)[b * self.batch_size : (b + 1) * self.batch_size]
        return self.rows[self.groups[g][0] + perm]

    def _load(self, store: ActivationStore, layer: int, group: int) -> np.ndarray:
        i0, i1, r0, r1 = self.groups[group]
        return store.read(layer, r0, r1)[self.rows[i0:i1] - r0]

    def _load_to(self, store: ActivationStore, layer: int, group: int, device: torch.device,
                 stream: Any = None) -> torch.Tensor:
        """The group's training rows as float32 on `device`. On CUDA the rows travel in the store's dtype
        (bf16: half the bytes) from pinned memory on a side stream and are converted on the GPU; this
        runs in the prefetch thread, so the copy overlaps the SAE steps on the current group."""
        if device.type != "cuda":
            return torch.from_numpy(self._load(store, layer, group)).to(device)
        i0, i1, r0, r1 = self.groups[group]
        raw = store.read_raw(layer, r0, r1)[self.rows[i0:i1] - r0]
        pinned = torch.from_numpy(np.ascontiguousarray(raw)).pin_memory()
        with torch.cuda.stream(stream):
            data = storage_to_float(pinned.to(device, non_blocking=True), store.dtype)
        stream.synchronize()  # in the prefetch thread: the consumer gets a finished tensor
        return data

    def iter_batches(self, store: ActivationStore, layer: int, start: int, stop: int,
                     device: torch.device | None = None) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        """(step, batch [batch_size, d]) for steps [start, stop): numpy arrays, or float32 tensors on
        `device` when given. The next group is read (and moved to the device) in a background thread
        while the current one is consumed; the batches are the same either way."""
        pool = ThreadPoolExecutor(max_workers=1)
        pending: dict[tuple[int, int], Future] = {}
        stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None

        def load(group: int) -> Future:
            if device is None:
                return pool.submit(self._load, store, layer, group)
            return pool.submit(self._load_to, store, layer, group, device, stream)

        try:
            step = start
            while step < stop:
                epoch, g, b = self.locate(step)
                fut = pending.pop((epoch, g), None) or load(g)
                data = fut.result()
                perm = self.permutation(epoch, g)
                if device is not None:
                    if stream is not None:  # made on the side stream, used on the current one
                        data.record_stream(torch.cuda.current_stream(device))
                    perm = torch.from_numpy(perm).to(device)
                end = min(stop, step + int(self.counts[g]) - b)
                if end < stop:
                    e2, g2, _ = self.locate(end)
                    pending[(e2, g2)] = load(g2)
                for s in range(step, end):
                    bb = b + s - step
                    yield s, data[perm[bb * self.batch_size : (bb + 1) * self.batch_size]]
                step = end
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

