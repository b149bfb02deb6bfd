"""The extract store on disk: the token table's schema, ActivationWriter (one zarr store) and
ActivationStore (reads a single store or one made of parts as one; see mmsae.activations).

bfloat16 has no numpy dtype: it is stored as its uint16 bit pattern and the array's attrs say so.
Writers buffer whole shards so memory stays bounded by one shard per layer, whatever the data size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from mmsae.artifacts import Files, require_finished
from mmsae.errors import InputError

MODALITIES = ("text", "image", "special")
TOKEN_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("sample_id", pa.string()),
        ("position", pa.int32()),
        ("modality", pa.string()),
        ("token_id", pa.int32()),
        ("is_response", pa.bool_()),
        ("patch", pa.int32()),  # index among its image's tokens (per image: mmsae.models.grid), -1 elsewhere
        ("image_index", pa.int16()),  # which image of the sample an image token belongs to, -1 elsewhere
    ]
)


def image_index(tokens: pd.DataFrame) -> np.ndarray:
    """int16 `image_index` of a token frame; a store written before the column existed (one image per
    sample) gives 0 to every image token and -1 elsewhere."""
    if "image_index" in tokens.columns:
        return tokens["image_index"].to_numpy(np.int16)
    return np.where(tokens["modality"].to_numpy() == "image", 0, -1).astype(np.int16)


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return x.to(getattr(torch, dtype)).cpu().numpy()


def _from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16).float().numpy()
    return a.astype(np.float32, copy=False)


def storage_to_float(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored rows (as read by ActivationStore.read_raw, on any device) as float32."""
    return t.view(torch.bfloat16).float() if dtype == "bfloat16" else t.float()


class ActivationWriter:
    """Append per-batch hidden states; flushes whole shards, so memory stays bounded."""

    def __init__(self, folder: str | os.PathLike, layers: Sequence[int], d_model: int, dtype: str = "float32",
                 chunk_tokens: int = 8192, shard_chunks: int = 8) -> None:
        self.folder = Path(folder)
        self.layers, self.d_model, self.dtype = list(layers), d_model, dtype
        self.shard_tokens = chunk_tokens * shard_chunks
        self.group = zarr.open_group(self.folder / Files.ACTS, mode="w")
        self.group.attrs.update({"layers": self.layers, "d_model": d_model, "dtype": dtype})
        store_dtype = "uint16" if dtype == "bfloat16" else dtype
        self.arrays = {
            layer: self.group.create_array(
                f"layer_{layer}", shape=(0, d_model), chunks=(chunk_tokens, d_model),
                shards=(self.shard_tokens, d_model), dtype=store_dtype,
            )
            for layer in self.layers
        }
        self.buffers: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        self.buffered = 0
        self.written = 0
        self.token_tables: list[pa.Table] = []

    def append(self, states: dict[int, torch.Tensor], tokens: pd.DataFrame) -> None:
        """states[layer]: [n, d_model] for n tokens described by `tokens` (without the `row` column; without
        `image_index`, every image token is of image 0)."""
        n = len(tokens)
        for layer in self.layers:
            if states[layer].shape != (n, self.d_model):
                raise ValueError(f"layer {layer}: got {tuple(states[layer].shape)}, expected {(n, self.d_model)}")
            self.buffers[layer].append(_to_storage(states[layer], self.dtype))
        start = self.written + self.buffered
        tokens = tokens.assign(row=np.arange(start, start + n, dtype=np.int64), image_index=image_index(tokens))
        self.token_tables.append(pa.Table.from_pandas(tokens[TOKEN_SCHEMA.names], schema=TOKEN_SCHEMA, preserve_index=False))
        self.buffered += n
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        for layer in self.layers:
            block = np.concatenate(self.buffers[layer])
            arr = self.arrays[layer]
            arr.resize((self.written + n, self.d_model))
            arr[self.written : self.written + n] = block[:n]
            self.buffers[layer] = [block[n:]] if len(block) > n else []
        self.written += n
        self.buffered -= n

    def close(self) -> int:
        if self.buffered:
            self._flush(self.buffered)
        table = pa.concat_tables(self.token_tables) if self.token_tables else TOKEN_SCHEMA.empty_table()
        pq.write_table(table, self.folder / Files.TOKENS)
        self.group.attrs["n_tokens"] = self.written
        return self.written


class _LayerRows:
    """One layer of a multi-part store as a read-only row range: shape, chunks, dtype and row slices
    (what callers of `ActivationStore.array` use), reading across parts."""

    def __init__(self, store: ActivationStore, layer: int) -> None:
        self.store, self.layer = store, layer
        self.shape = (store.n_tokens, store.d_model)
        self.chunks = (store.chunk_tokens, store.d_model)
        self.dtype = np.dtype("uint16" if store.dtype == "bfloat16" else store.dtype)

    def __getitem__(self, key: slice | tuple) -> np.ndarray:
        if isinstance(key, tuple):
            key, cols = key[0], key[1:]
            if any(c != slice(None) for c in cols):
                raise IndexError("only row slices are supported")
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise IndexError("only contiguous row slices are supported")
        return self.store._raw(self.layer, key.start, key.stop)


class ActivationStore:
    """Read side of an extract artifact: one store over a single acts.zarr or over the parts of
    acts.json (see the module docstring), rows in sample order either way."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        require_finished(self.folder)
        single, index = self.folder / Files.ACTS, self.folder / Files.ACTS_INDEX
        if not (single.exists() or index.exists()) or not (self.folder / Files.TOKENS).exists():
            raise InputError(self.folder, Files.ACTS, "not an extract artifact (acts.zarr or acts.json / tokens.parquet missing)")
        if single.exists():
            self.group = zarr.open_group(single, mode="r")
            attrs, groups = dict(self.group.attrs), [self.group]
        else:
            attrs = json.loads(index.read_text())
            groups = [zarr.open_group(self.folder / part / Files.ACTS, mode="r") for part in attrs["parts"]]
            self.group = groups[0] if len(groups) == 1 else None
        self.layers: list[int] = list(attrs["layers"])
        self.d_model: int = int(attrs["d_model"])
        self.dtype: str = str(attrs["dtype"])
        for g in groups:
            if list(g.attrs["layers"]) != self.layers or int(g.attrs["d_model"]) != self.d_model \
                    or str(g.attrs["dtype"]) != self.dtype:
                raise InputError(index, "parts", f"part {g.store} differs in layers, d_model or dtype")
        self._groups = groups
        first = f"layer_{self.layers[0]}"
        self._starts = np.cumsum([0, *(int(g[first].shape[0]) for g in groups)]).astype(np.int64)
        self._chunk_tokens = int(groups[0][first].chunks[0]) if groups else int(attrs.get("chunk_tokens", 1))
        self._tokens: pd.DataFrame | None = None

    @property
    def tokens(self) -> pd.DataFrame:
        if self._tokens is None:
            self._tokens = pd.read_parquet(self.folder / Files.TOKENS)
        return self._tokens

    def token_columns(self, columns: Sequence[str]) -> pd.DataFrame:
        """Only these columns of tokens.parquet, string columns as categoricals (arrow dictionaries): an
        int32 code per token instead of a Python string (sample_id and modality as objects cost ~120 B per
        token, 12 GB at 1e8 tokens). The whole frame (`tokens`) only where a stage needs every column."""
        if self._tokens is not None:
            return self._tokens[list(columns)]
        path = self.folder / Files.TOKENS
        names = pq.read_schema(path).names
        for c in columns:
            if c not in names:
                raise InputError(path, c, "missing column")
        strings = [c for c in columns if c in TOKEN_SCHEMA.names and pa.types.is_string(TOKEN_SCHEMA.field(c).type)]
        return pq.read_table(path, columns=list(columns), read_dictionary=strings).to_pandas()

    @property
    def n_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def n_parts(self) -> int:
        return len(self._groups)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise InputError(self.folder / Files.ACTS, "layer", f"layer {layer} was not extracted (have {self.layers})")

    def array(self, layer: int) -> zarr.Array | _LayerRows:
        """The layer's array (a row-sliceable view when the store has several parts)."""
        self._check_layer(layer)
        if len(self._groups) == 1:
            return self._groups[0][f"layer_{layer}"]
        return _LayerRows(self, layer)

    @property
    def chunk_tokens(self) -> int:
        return self._chunk_tokens

    def _raw(self, layer: int, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) in the storage dtype, concatenated across parts."""
        self._check_layer(layer)
        start, stop, _ = slice(start, stop).indices(self.n_tokens)
        stop = max(start, stop)
        name = f"layer_{layer}"
        if len(self._groups) == 1:
            return self._groups[0][name][start:stop]
        pieces = []
        first = max(0, int(np.searchsorted(self._starts, start, side="right")) - 1)
        for i in range(first, len(self._groups)):
            p0, p1 = int(self._starts[i]), int(self._starts[i + 1])
            if p0 >= stop:
                break
            lo, hi = max(start, p0), min(stop, p1)
            if lo < hi:
                pieces.append(self._groups[i][name][lo - p0 : hi - p0])
        if not pieces:
            return np.zeros((0, self.d_model), np.uint16 if self.dtype == "bfloat16" else self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def read_raw(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) in the storage dtype (bfloat16 as uint16; see storage_to_float)."""
        return self._raw(layer, start, stop)

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32."""
        return _from_storage(self._raw(layer, start, stop), self.dtype)

    def read_rows(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """Arbitrary rows as float32, in the order given (reads only the chunks that hold them, once each)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d_model), np.float32)
        for where, states in self.iter_rows(layer, rows):
            out[where] = states
        return out

    def iter_rows(self, layer: int, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in `rows`, their float32 states) chunk by chunk, in store order: each store chunk that
        holds any of the rows is read once, whatever the number of rows asked for in it (a caller that
        reduces the rows, like the features' cosine sums, never holds more than one chunk)."""
        self._check_layer(layer)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.n_tokens:
            raise IndexError(f"rows outside the store's {self.n_tokens} rows")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        name = f"layer_{layer}"
        cuts = np.searchsorted(srt, self._starts)
        # One store chunk at a time, copying its rows out: zarr's orthogonal selection of scattered rows
        # holds about every shard it touches at once, so its memory grew with the number of rows asked for.
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            if b == a:
                continue
            arr = self._groups[i][name]
            local = srt[a:b] - self._starts[i]
            ct = int(arr.chunks[0])
            chunk = local // ct
            bounds = np.r_[0, np.flatnonzero(np.diff(chunk)) + 1, len(chunk)]
            for j0, j1 in zip(bounds[:-1], bounds[1:], strict=True):
                c0 = int(chunk[j0]) * ct
                block = arr[c0 : min(c0 + ct, int(arr.shape[0]))]
                yield order[a + j0 : a + j1], _from_storage(block[local[j0:j1] - c0], self.dtype)

    def iter_blocks(self, layer: int, block_tokens: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, block) over the whole store, block_tokens rows at a time."""
        n = self.n_tokens
        for start in range(0, n, block_tokens):
            yield start, self.read(layer, start, min(n, start + block_tokens))

