"""Running the model over records: forward hooks that capture the residual stream, the extraction loop
that feeds an ActivationWriter, and extraction in shards and resumable parts (layout: mmsae.activations).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmsae.activations.store import MODALITIES, TOKEN_SCHEMA, ActivationWriter
from mmsae.artifacts import Files, atomic_dir, atomic_file, config_hash, write_json
from mmsae.config import result_keys
from mmsae.data.lazy import LazyRecords
from mmsae.errors import InputError
from mmsae.params import ExtractParams, ModelParams

PARTS = "parts"
SHARDS = "shards"
log = logging.getLogger("mmsae.extract")

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


def token_limit(adapter, max_length: int | None) -> int | None:
    """The longest sequence extracted: extract.max_length, capped by the model's context."""
    limits = [n for n in (max_length, adapter.context_length()) if n is not None]
    return min(limits) if limits else None


def extract(adapter, records: Sequence, layers: Sequence[int], batch_size: int, writer: ActivationWriter,
            max_length: int | None = None, include_response: bool = True, progress: bool = True,
            too_long: str = "error", batch_tokens: int | None = None) -> dict:
    """Run `records` through the model in batches and append the residual stream after each of `layers`
    at every real (non-padding) token to `writer`, batch by batch (the caller closes the writer).

    A sample longer than token_limit() stops the run naming it (too_long="error"), is left out and
    listed (too_long="skip"), or is cut on the right ("truncate"). A batch of more than `batch_tokens`
    padded tokens runs in halves. Returns counts: n_samples, n_tokens, n_{text,image,special} tokens,
    n_response tokens, the image tokens per sample (list, in record order) and too_long ([sample_id,
    tokens] of the skipped samples).
    """
    layers = adapter.check_layers(layers, "extract.layers")
    if sorted(layers) != sorted(writer.layers):
        raise ValueError(f"writer layers {writer.layers} != requested layers {layers}")
    limit = token_limit(adapter, max_length)
    counts = {"n_samples": 0, "n_tokens": 0, **{f"n_{m}": 0 for m in MODALITIES}, "n_response": 0}
    image_tokens: list[int] = []
    skipped: list[list] = []
    bar = tqdm(total=len(records), unit="sample", desc="extract", disable=not progress, file=sys.stderr, mininterval=1.0)

    def run(batch: Sequence, built: tuple | None = None) -> None:
        inputs, meta = built or adapter.build_batch(batch, include_response=include_response,
                                                    max_length=limit if too_long == "truncate" else None)
        if batch_tokens is not None and meta.attention_mask.size > batch_tokens and len(batch) > 1:
            half = len(batch) // 2  # padded to the longest of each half: bounded by tokens, not samples
            run(batch[:half])
            run(batch[half:])
            return
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

    with bar, LayerCapture(adapter.decoder_layers(), layers) as capture, torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            built = adapter.build_batch(batch, include_response=include_response,
                                        max_length=limit if too_long == "truncate" else None)
            if too_long != "truncate" and limit is not None:  # tokenized only: nothing ran yet
                lengths = built[1].attention_mask.sum(axis=1)
                if int(lengths.max()) > limit:
                    batch, built = _within_limit(batch, lengths, limit, too_long, skipped, adapter.path), None
            if batch:
                run(batch, built)
            bar.update(min(batch_size, len(records) - start))
    counts["image_tokens_per_sample"] = image_tokens
    counts["too_long"] = skipped
    return counts


def _within_limit(batch: Sequence, lengths: np.ndarray, limit: int, too_long: str, skipped: list[list],
                  model: str) -> list:
    """The records of `batch` no longer than `limit` tokens; a longer one raises (too_long="error") or is
    appended to `skipped` as [sample_id, tokens]."""
    kept = []
    for record, n in zip(batch, lengths.tolist(), strict=True):
        if n <= limit:
            kept.append(record)
        elif too_long == "error":
            raise InputError(model, "extract.too_long",
                             f"sample {record.sample_id!r}: {n} tokens, more than {limit} (extract.max_length or "
                             f"the model's context); set extract.too_long: skip or truncate")
        else:
            skipped.append([record.sample_id, int(n)])
            log.warning("extract: sample %s skipped: %d tokens > %d", record.sample_id, n, limit)
    return kept


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


def extraction_key(params: ExtractParams, model_params: ModelParams, model: str) -> str:
    """What makes two extractions interchangeable: the extract slice without the execution keys, the
    model slice and the model. A part made under another key is never reused."""
    return config_hash({"extract": result_keys("extract", params.as_dict()),
                        "model": result_keys("model", model_params.as_dict()), "model_path": str(model)}, length=16)


def _part_ok(folder: Path, key: str, records: tuple[int, int], sample_ids: list[str]) -> bool:
    try:
        info = json.loads((folder / Files.PART_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("key") == key and tuple(info.get("records", ())) == records and info.get("sample_ids") == sample_ids


def _write_part(adapter, records: Sequence, layers: Sequence[int], params: ExtractParams, folder: Path, key: str,
                span: tuple[int, int]) -> None:
    """Extract one part (its records) into `folder`, atomically: a part folder is always complete."""
    with atomic_dir(folder) as tmp:
        writer = ActivationWriter(tmp, layers, adapter.d_model, dtype=params.dtype,
                                  chunk_tokens=params.chunk_tokens, shard_chunks=params.shard_chunks)
        counts = extract(adapter, records, layers, params.batch_size, writer, max_length=params.max_length,
                         include_response=params.include_response, progress=False, too_long=params.too_long,
                         batch_tokens=params.batch_tokens)
        if writer.close() != counts["n_tokens"]:
            raise RuntimeError(f"part {folder}: rows written differ from tokens extracted")
        write_json(tmp / Files.PART_INFO, {"key": key, "records": list(span), "sample_ids": [r.sample_id for r in records],
                                     "counts": counts})


def extract_shard(adapter, records: Sequence, layers: Sequence[int], params: ExtractParams, work: str | os.PathLike,
                  key: str, shard: int = 0, n_shards: int = 1, progress: bool = True) -> list[Path]:
    """Extract shard `shard` of `n_shards` of `records` (a list, or LazyRecords: images decoded one part at a
    time) into part folders under `work`/parts; parts already there from a killed run (same key, same
    records) are kept. Returns the shard's part folders in order.

    Shards and parts are cut at batch boundaries (params batch_size, part_batches), so the stored rows
    are identical to those of one uninterrupted job."""
    layers = adapter.check_layers(layers, "extract.layers")
    a, b = shard_records(len(records), params.batch_size, n_shards)[shard]
    spans = part_ranges(a, b, params.batch_size, params.part_batches)
    parts_dir = Path(work) / PARTS
    if parts_dir.exists():
        for stale in parts_dir.glob(".*.tmp-*"):  # a part being written when the job was killed
            shutil.rmtree(stale, ignore_errors=True)
    folders, reused = [], 0
    bar = tqdm(total=b - a, unit="sample", desc=f"extract {shard + 1}/{n_shards}", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    ids = records.sample_ids if isinstance(records, LazyRecords) else [r.sample_id for r in records]
    with bar:  # closed on errors too, so an error message starts on its own line
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
    log.info("extract: shard %d/%d, records [%d, %d): %d parts, %d reused from a previous run",
             shard + 1, n_shards, a, b, len(spans), reused)
    return folders


def part_counts(parts: Sequence[Path]) -> dict:
    """Token counts of a store's parts (in order): n_samples, n_tokens, n_{text,image,special}, n_response,
    image_tokens_per_sample (list, in record order)."""
    total = {"n_samples": 0, "n_tokens": 0, **{f"n_{m}": 0 for m in MODALITIES}, "n_response": 0}
    per_sample: list[int] = []
    too_long: list[list] = []
    for part in parts:
        c = json.loads((Path(part) / Files.PART_INFO).read_text())["counts"]
        for k in total:
            total[k] += int(c[k])
        per_sample.extend(c["image_tokens_per_sample"])
        too_long.extend(c.get("too_long", []))
    return {**total, "image_tokens_per_sample": per_sample, "too_long": too_long}


def write_store_index(folder: str | os.PathLike, parts: Sequence[Path], names: Sequence[str], layers: Sequence[int],
                      d_model: int, params: ExtractParams) -> dict:
    """Write `folder`/tokens.parquet (the parts' tokens with store rows) and acts.json (the parts, to be
    found at `folder`/name); the part folders are not moved. Returns part_counts(parts)."""
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
    write_json(folder / Files.ACTS_INDEX, {"layers": list(layers), "d_model": int(d_model), "dtype": params.dtype,
                                     "chunk_tokens": int(params.chunk_tokens), "n_tokens": offset,
                                     "parts": list(names)})
    counts = part_counts(parts)
    bad = pd.DataFrame([{"sample_id": sid, "field": "tokens", "message": f"{n} tokens: too long (extract.too_long: skip)"}
                        for sid, n in counts["too_long"]], columns=["sample_id", "field", "message"])
    bad.to_parquet(folder / Files.BAD_ROWS, index=False)
    if counts["n_tokens"] != offset:
        raise RuntimeError(f"{folder}: the parts' token files hold {offset} rows, their counts {counts['n_tokens']}")
    return counts


def store_parts(folder: str | os.PathLike) -> list[str]:
    """The part folders (relative names) of a store written by extraction, in row order."""
    return list(json.loads((Path(folder) / Files.ACTS_INDEX).read_text())["parts"])


def summarize_counts(counts: dict) -> dict:
    """The manifest form of part_counts: the per-sample image-token list becomes min / max / mean."""
    counts = dict(counts)
    counts["n_too_long"] = len(counts.get("too_long", []))
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
