"""Captured hidden states on disk: zarr stores plus a parquet token index.

Layout of an extract artifact folder (either form is read by ActivationStore as one store):

    tokens.parquet        one row per token, row i describes row i of every layer array:
                          row, sample_id, position, modality (image|text|special), token_id,
                          is_response, patch (index among the sample's image tokens, -1 otherwise)
    acts.zarr/layer_{L}   a single store: float array [n_tokens, d_model], chunked along tokens,
                          shards of chunks (ActivationWriter; small stores, tests)
  or
    acts.json             the parts of the store in row order, with layers, d_model, dtype, n_tokens
    parts/{j}/            (one extraction job) or shards/{k}/parts/{j}/ (extract.shards jobs): each part
                          a few batches of records: acts.zarr, tokens.parquet (part rows), part.json

Extraction writes parts: each part is written atomically, so a killed job's rerun keeps the finished
parts and extracts only the rest. Shards and parts are cut at batch boundaries, so every padded
forward pass is the one an unsharded, uninterrupted run makes and the stored arrays are identical.
bfloat16 has no numpy dtype: it is stored as its uint16 bit pattern and the array's attrs say so.
Writers buffer whole shards so memory stays bounded by one shard per layer, whatever the data size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from mmsae.artifacts import Files
from mmsae.errors import InputError

PARTS = "parts"
SHARDS = "shards"
MODALITIES = ("text", "image", "special")
TOKEN_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("sample_id", pa.string()),
        ("position", pa.int32()),
        ("modality", pa.string()),
        ("token_id", pa.int32()),
        ("is_response", pa.bool_()),
        ("patch", pa.int32()),
    ]
)


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
        """states[layer]: [n, d_model] for n tokens described by `tokens` (without the `row` column)."""
        n = len(tokens)
        for layer in self.layers:
            if states[layer].shape != (n, self.d_model):
                raise ValueError(f"layer {layer}: got {tuple(states[layer].shape)}, expected {(n, self.d_model)}")
            self.buffers[layer].append(_to_storage(states[layer], self.dtype))
        start = self.written + self.buffered
        tokens = tokens.assign(row=np.arange(start, start + n, dtype=np.int64))
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
        """Arbitrary rows as float32, in the order given (reads only the chunks that hold them)."""
        self._check_layer(layer)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.d_model), np.float32)
        if rows.min() < 0 or rows.max() >= self.n_tokens:
            raise IndexError(f"rows outside the store's {self.n_tokens} rows")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        name = f"layer_{layer}"
        out = np.empty((len(rows), self.d_model), np.float32)
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
                out[order[a + j0 : a + j1]] = _from_storage(block[local[j0:j1] - c0], self.dtype)
        return out

    def iter_blocks(self, layer: int, block_tokens: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, block) over the whole store, block_tokens rows at a time."""
        n = self.n_tokens
        for start in range(0, n, block_tokens):
            yield start, self.read(layer, start, min(n, start + block_tokens))


# --------------------------------------------------------------------------------------------------
# Capture: forward hooks on decoder layers, and the extraction loop that feeds an ActivationWriter.
# --------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the deepest hook: the layers after it are not needed."""


class LayerCapture:
    """Forward hooks that keep the residual stream AFTER each chosen decoder layer (its output hidden
    states), at the real tokens only: `select` is a bool mask [B, T] set before each forward.

    With `stop_after_last=True` the forward is cut short after the deepest hooked layer.
    """

    def __init__(self, layers_module: torch.nn.ModuleList, layers: Sequence[int], stop_after_last: bool = True) -> None:
        self.layers = list(layers)
        self.states: dict[int, torch.Tensor] = {}
        self.select: torch.Tensor | None = None
        self.stop_at = max(self.layers) if stop_after_last else None
        self.handles = [layers_module[layer].register_forward_hook(self._hook(layer)) for layer in self.layers]

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            h = output[0] if isinstance(output, tuple) else output
            h = h.detach()
            self.states[layer] = h[self.select.to(h.device)] if self.select is not None else h
            if layer == self.stop_at:
                raise _StopForward

        return hook

    def run(self, forward, select: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Call `forward()` and return {layer: states}; states are [n_selected, d] (or [B, T, d])."""
        self.states, self.select = {}, select
        with contextlib.suppress(_StopForward):
            forward()
        missing = [layer for layer in self.layers if layer not in self.states]
        if missing:
            raise RuntimeError(f"hooks on layers {missing} did not fire")
        out, self.states = self.states, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def extract(adapter, records: Sequence, layers: Sequence[int], batch_size: int, writer: ActivationWriter,
            max_length: int | None = None, include_response: bool = True, progress: bool = True) -> dict:
    """Run `records` through the model in batches and append the residual stream after each of `layers`
    at every real (non-padding) token to `writer`, batch by batch (the caller closes the writer).

    Returns counts: n_samples, n_tokens, n_{text,image,special} tokens, n_response tokens and the
    image tokens per sample (list, in record order).
    """
    import sys

    from tqdm import tqdm

    layers = adapter.check_layers(layers, "extract.layers")
    if sorted(layers) != sorted(writer.layers):
        raise ValueError(f"writer layers {writer.layers} != requested layers {layers}")
    counts = {"n_samples": 0, "n_tokens": 0, **{f"n_{m}": 0 for m in MODALITIES}, "n_response": 0}
    image_tokens: list[int] = []
    bar = tqdm(total=len(records), unit="sample", desc="extract", disable=not progress, file=sys.stderr, mininterval=1.0)
    with LayerCapture(adapter.decoder_layers(), layers) as capture, torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            inputs, meta = adapter.build_batch(batch, include_response=include_response, max_length=max_length)
            select = torch.from_numpy(meta.attention_mask)
            states = capture.run(lambda inputs=inputs: adapter.forward(inputs), select)
            tokens = meta.tokens_frame()
            writer.append({layer: states[layer] for layer in writer.layers}, tokens)
            counts["n_samples"] += len(batch)
            counts["n_tokens"] += len(tokens)
            for m in MODALITIES:
                counts[f"n_{m}"] += int((tokens["modality"] == m).sum())
            counts["n_response"] += int(tokens["is_response"].sum())
            image_tokens.extend(int(n) for n in meta.n_image_tokens)
            bar.update(len(batch))
    bar.close()
    counts["image_tokens_per_sample"] = image_tokens
    return counts


# --------------------------------------------------------------------------------------------------
# Extraction in shards and resumable parts (see the module docstring for the layout).
# --------------------------------------------------------------------------------------------------


def shard_records(n_records: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) record range of each of `n_shards` contiguous shards, cut at batch boundaries (so
    each batch, padded as one, is a batch of the unsharded run); a shard may be empty."""
    n_batches = math.ceil(n_records / batch_size)
    cuts = [min(n_records, (k * n_batches // n_shards) * batch_size) for k in range(n_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def part_ranges(start: int, stop: int, batch_size: int, part_batches: int) -> list[tuple[int, int]]:
    """The parts of a shard's records [start, stop): part_batches batches each (start is a batch boundary)."""
    step = batch_size * part_batches
    return [(a, min(stop, a + step)) for a in range(start, stop, step)]


def extraction_key(params: dict, model_params: dict, model: str) -> str:
    """What makes two extractions interchangeable: the extract slice without the execution keys, the
    model slice and the model. A part made under another key is never reused."""
    from mmsae.artifacts import config_hash
    from mmsae.config import execution_keys

    p = {k: v for k, v in params.items() if k not in execution_keys("extract")}
    return config_hash({"extract": p, "model": model_params, "model_path": str(model)}, length=16)


class LazyRecords(Sequence):
    """The records of a samples frame, decoded when sliced: an extraction job holds the images of one
    part at a time, not those of the whole data set (nor of the other shards)."""

    def __init__(self, frame: pd.DataFrame, path: str | os.PathLike = "<memory>") -> None:
        self.frame, self.path = frame.reset_index(drop=True), path
        self.sample_ids = self.frame["sample_id"].astype(str).tolist()

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i):
        from mmsae.data.schema import records_from_frame

        if isinstance(i, slice):
            return records_from_frame(self.frame.iloc[i], self.path)
        return records_from_frame(self.frame.iloc[[i]], self.path)[0]


def _part_ok(folder: Path, key: str, records: tuple[int, int], sample_ids: list[str]) -> bool:
    try:
        info = json.loads((folder / Files.PART_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("key") == key and tuple(info.get("records", ())) == records and info.get("sample_ids") == sample_ids


def _write_part(adapter, records: Sequence, layers: Sequence[int], params: dict, folder: Path, key: str,
                span: tuple[int, int]) -> None:
    """Extract one part (its records) into `folder`, atomically: a part folder is always complete."""
    from mmsae.artifacts import atomic_dir, write_json

    with atomic_dir(folder) as tmp:
        writer = ActivationWriter(tmp, layers, adapter.d_model, dtype=params["dtype"],
                                  chunk_tokens=params["chunk_tokens"], shard_chunks=params["shard_chunks"])
        counts = extract(adapter, records, layers, params["batch_size"], writer, max_length=params["max_length"],
                         include_response=params["include_response"], progress=False)
        if writer.close() != counts["n_tokens"]:
            raise RuntimeError(f"part {folder}: rows written differ from tokens extracted")
        write_json(tmp / Files.PART_INFO, {"key": key, "records": list(span), "sample_ids": [r.sample_id for r in records],
                                     "counts": counts})


def extract_shard(adapter, records: Sequence, layers: Sequence[int], params: dict, work: str | os.PathLike,
                  key: str, shard: int = 0, n_shards: int = 1, progress: bool = True) -> list[Path]:
    """Extract shard `shard` of `n_shards` of `records` (a list, or LazyRecords: images decoded one part at a
    time) into part folders under `work`/parts; parts already there from a killed run (same key, same
    records) are kept. Returns the shard's part folders in order.

    Shards and parts are cut at batch boundaries (params batch_size, part_batches), so the stored rows
    are identical to those of one uninterrupted job."""
    import logging
    import sys

    from tqdm import tqdm

    log = logging.getLogger("mmsae.extract")
    layers = adapter.check_layers(layers, "extract.layers")
    a, b = shard_records(len(records), params["batch_size"], n_shards)[shard]
    spans = part_ranges(a, b, params["batch_size"], params["part_batches"])
    parts_dir = Path(work) / PARTS
    if parts_dir.exists():
        for stale in parts_dir.glob(".*.tmp-*"):  # a part being written when the job was killed
            shutil.rmtree(stale, ignore_errors=True)
    folders, reused = [], 0
    bar = tqdm(total=b - a, unit="sample", desc=f"extract {shard + 1}/{n_shards}", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    ids = records.sample_ids if isinstance(records, LazyRecords) else [r.sample_id for r in records]
    for j, span in enumerate(spans):
        folder = parts_dir / f"{j:05d}"
        if _part_ok(folder, key, span, ids[span[0] : span[1]]):
            reused += 1
        else:
            if folder.exists():
                shutil.rmtree(folder)
            _write_part(adapter, records[span[0] : span[1]], layers, params, folder, key, span)
        folders.append(folder)
        bar.update(span[1] - span[0])
    bar.close()
    log.info("extract: shard %d/%d, records [%d, %d): %d parts, %d reused from a previous run",
             shard + 1, n_shards, a, b, len(spans), reused)
    return folders


def part_counts(parts: Sequence[Path]) -> dict:
    """Token counts of a store's parts (in order): n_samples, n_tokens, n_{text,image,special}, n_response,
    image_tokens_per_sample (list, in record order)."""
    total = {"n_samples": 0, "n_tokens": 0, **{f"n_{m}": 0 for m in MODALITIES}, "n_response": 0}
    per_sample: list[int] = []
    for part in parts:
        c = json.loads((Path(part) / Files.PART_INFO).read_text())["counts"]
        for k in total:
            total[k] += int(c[k])
        per_sample.extend(c["image_tokens_per_sample"])
    return {**total, "image_tokens_per_sample": per_sample}


def write_store_index(folder: str | os.PathLike, parts: Sequence[Path], names: Sequence[str], layers: Sequence[int],
                      d_model: int, params: dict) -> dict:
    """Write `folder`/tokens.parquet (the parts' tokens with store rows) and acts.json (the parts, to be
    found at `folder`/name); the part folders are not moved. Returns part_counts(parts)."""
    from mmsae.artifacts import atomic_file, write_json

    folder = Path(folder)
    tables, offset = [], 0
    for part in parts:
        t = pq.read_table(Path(part) / Files.TOKENS)
        tables.append(t.set_column(t.schema.get_field_index("row"), "row",
                                   pa.array(np.arange(offset, offset + len(t), dtype=np.int64))))
        offset += len(t)
    table = pa.concat_tables(tables) if tables else TOKEN_SCHEMA.empty_table()
    with atomic_file(folder / Files.TOKENS) as tmp:
        pq.write_table(table, tmp)
    write_json(folder / Files.ACTS_INDEX, {"layers": list(layers), "d_model": int(d_model), "dtype": params["dtype"],
                                     "chunk_tokens": int(params["chunk_tokens"]), "n_tokens": offset,
                                     "parts": list(names)})
    counts = part_counts(parts)
    if counts["n_tokens"] != offset:
        raise RuntimeError(f"{folder}: the parts' token files hold {offset} rows, their counts {counts['n_tokens']}")
    return counts


def store_parts(folder: str | os.PathLike) -> list[str]:
    """The part folders (relative names) of a store written by extraction, in row order."""
    return list(json.loads((Path(folder) / Files.ACTS_INDEX).read_text())["parts"])


def summarize_counts(counts: dict) -> dict:
    """The manifest form of part_counts: the per-sample image-token list becomes min / max / mean."""
    counts = dict(counts)
    per_sample = np.asarray(counts.pop("image_tokens_per_sample"), dtype=np.int64)
    counts["image_tokens_per_sample"] = {
        "min": int(per_sample.min()), "max": int(per_sample.max()), "mean": float(per_sample.mean()),
        "n_without_image": int((per_sample == 0).sum()),
    } if len(per_sample) else {}
    return counts


def shard_dir(out: str | os.PathLike, shard: int) -> Path:
    """Where shard `shard` of the extract artifact `out` is written (extract.shards > 1)."""
    return Path(out) / SHARDS / f"{shard:04d}"


def partial_dir(out: str | os.PathLike) -> Path:
    """The finished parts of an unfinished extraction into `out`: a hidden sibling, kept when the job is
    killed (atomic_dir's temporary folder is not) and removed once `out` is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def move_parts(parts: Sequence[Path], dest: str | os.PathLike) -> None:
    """Rename the part folders into `dest` (same file system: no data is copied)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        os.replace(part, dest / Path(part).name)
