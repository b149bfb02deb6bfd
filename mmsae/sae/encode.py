"""Stage encode: SAE codes of every token (all modalities) of an extract artifact.

Reads the SAE from a train_sae artifact (--sae, its sae/ folder; a bare SAELens folder works too) and
encodes the store's layer the SAE was trained on (cfg.json metadata.hook_layer). Writes into --out:

  codes.parquet/   row, sample_id, position, modality, feature, activation (only activations > delta), as
                  parquet parts of whole samples (about encode.part_tokens tokens each) plus _index.json
                  (mmsae.codes: each part's store-row and sample range; features and score read only the
                  parts they need); pandas / pyarrow open the folder as one table
  manifest.json   counts: n_tokens, nnz, n_parts, codes_dropped, tokens_capped, layer, d_sae

codes.parquet has one row per (token, latent) with activation > delta, ordered by row then feature:
    row (int64, the store row = tokens.parquet row), sample_id (string), position (int32),
    modality (string), feature (int32), activation (float32)
Memory is bounded by one store block (encode.batch_tokens x d_model) plus one dense block of codes of at
most mmsae.sae.blocks.DENSE_BYTES (256 MB: 1,024 tokens at d_sae 65,536): the SAE runs on row slices.

Code size guard (encode.max_codes_per_token, default 512, 0 = off): a ReLU SAE early in training fires
on about half its latents (32K codes per token at d_sae 65,536, ~400 GB of codes per 1M tokens). A token
with more codes above delta keeps its largest max_codes_per_token; the dropped count and the number of
tokens capped are logged and in the manifest (codes_dropped, tokens_capped). A TopK SAE with k <= the cap
is never affected.

An SAE whose d_in differs from the store's d_model is refused (exit 2, no output folder).

Example:
  python workflow/scripts/encode.py --extract results/demo/extract-1234abcd --sae results/demo/train_sae-x \\
      --out results/demo/encode-y --params '{"delta": 0.0}'
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.codes import CODES_SCHEMA, ROW_GROUP, CodesWriter
from mmsae.device import resolve_device
from mmsae.errors import InputError
from mmsae.params import EncodeParams
from mmsae.sae.blocks import row_slices
from mmsae.sae.io import check_d_in, load_sae
from mmsae.sae.model import SAE


@torch.no_grad()
def _block_codes(sae: SAE, x: torch.Tensor, delta: float, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(token, feature, activation) of the codes > delta of x, at most `cap` per token (its largest; 0 = all),
    how many codes the cap dropped and from how many tokens. Dense codes only in row slices of blocks.DENSE_BYTES."""
    ts, fs, acts, dropped, capped = [], [], [], 0, 0
    sparse = hasattr(sae, "encode_sparse") and not (cap and sae.k > cap)
    for s in row_slices(len(x), sae.cfg.d_sae):
        if sparse:  # TopK: (values, indices) [rows, k], latents ascending; no dense codes, no nonzero scan
            xs = x[s]
            values, idx, _ = sae.encode_sparse(xs * sae.input_factor(xs))
            keep = values > delta
            ts.append(np.repeat(np.arange(s.start, s.stop), values.shape[-1])[keep.cpu().numpy().ravel()])
            fs.append(idx[keep].cpu().numpy())
            acts.append(values[keep].float().cpu().numpy())
            continue
        f = sae.encode(x[s])
        keep = f > delta
        count = keep.sum(-1)
        if cap and int(count.max()) > cap:
            # keep each token's `cap` largest codes above delta, listed by feature as the nonzero scan lists them
            values, idx = f.topk(cap, dim=-1, sorted=False)
            idx, order = idx.sort(dim=-1)
            values = values.gather(-1, order)
            dropped += int((count - cap).clamp_min(0).sum())
            capped += int((count > cap).sum())
            keep = torch.zeros_like(keep).scatter_(-1, idx, values > delta)
        t, i = torch.nonzero(keep, as_tuple=True)
        ts.append(t.cpu().numpy() + s.start)
        fs.append(i.cpu().numpy())
        acts.append(f[t, i].float().cpu().numpy())
    if not ts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), 0, 0
    return np.concatenate(ts), np.concatenate(fs), np.concatenate(acts), dropped, capped


@torch.no_grad()
def encode_store(sae: SAE, store: ActivationStore, layer: int, delta: float, batch_tokens: int,
                 out_path: str | os.PathLike, *, progress: bool = True, max_codes_per_token: int = 0,
                 part_tokens: int = 1 << 20, row_group: int = ROW_GROUP) -> dict[str, int]:
    """Write the codes (> delta) of all tokens of `layer` (every modality) to the codes folder `out_path`
    (mmsae.codes layout: parts of whole samples, about part_tokens tokens each).

    The SAE runs on the device its weights are on. Returns {"n_tokens", "nnz", "n_parts", "codes_dropped",
    "tokens_capped"}.
    """
    check_d_in(sae, store.d_model, store.folder)
    path = store.folder / Files.TOKENS
    n = store.n_tokens
    # the token index column by column: row is checked, then dropped before the string columns are read
    row = pq.read_table(path, columns=["row"])["row"].to_numpy()
    if len(row) != n or (n and not np.array_equal(row, np.arange(n))):
        raise InputError(path, "row", f"does not list the {n} rows of the store in order")
    del row
    cols = pq.read_table(path, columns=["sample_id", "position", "modality"])
    # arrow columns: compact strings (dictionary-encoded), and take() per block keeps the per-block work small
    sample_id, position, modality = (cols[c].combine_chunks() for c in ("sample_id", "position", "modality"))
    del cols
    sid = sample_id.dictionary_encode().indices.to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]]) if n else np.zeros(0, np.int64)
    del sid
    # parts: runs of whole samples, a new one at the first sample start >= part_tokens into the current one
    bounds = [0]
    for s in starts[1:]:
        if s - bounds[-1] >= part_tokens:
            bounds.append(int(s))
    bounds = np.array([*bounds, n], np.int64)
    device = sae.W_enc.device
    nnz = dropped = capped = 0
    writer = CodesWriter(out_path, part_tokens, row_group)
    part = -1
    bar = tqdm(total=n, file=sys.stderr, disable=not progress, desc="encode", unit="tok", mininterval=2.0)
    for start, block in store.iter_blocks(layer, batch_tokens):
        stop = start + len(block)
        inner = bounds[(bounds > start) & (bounds < stop)]
        for a, b in zip([start, *inner.tolist()], [*inner.tolist(), stop], strict=True):
            while part + 1 < len(bounds) - 1 and bounds[part + 1] <= a:
                part += 1
                writer.start_part(a, int(np.searchsorted(starts, a, side="left")))
            x = torch.from_numpy(block[a - start : b - start]).to(device=device, dtype=sae.W_enc.dtype)
            t, i, act, d, c = _block_codes(sae, x, delta, max_codes_per_token)
            dropped, capped = dropped + d, capped + c
            rows = a + t.astype(np.int64)
            take = pa.array(rows)
            table = pa.table(
                {
                    "row": rows,
                    "sample_id": sample_id.take(take).cast(pa.string()),
                    "position": position.take(take).cast(pa.int32()),
                    "modality": modality.take(take).cast(pa.string()),
                    "feature": i.astype(np.int32),
                    "activation": act.astype(np.float32),
                },
                schema=CODES_SCHEMA,
            )
            writer.write(table, b, int(np.searchsorted(starts, b, side="left")))
            nnz += len(rows)
        bar.update(len(block))
    bar.close()
    parts = writer.close()
    if dropped:
        cli.log.warning("encode: %d codes above delta of %d tokens dropped by encode.max_codes_per_token = %d",
                    dropped, capped, max_codes_per_token)
    return {"n_tokens": n, "nnz": nnz, "n_parts": len(parts), "codes_dropped": dropped, "tokens_capped": capped}


STAGE = "encode"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    extract: Path = cli.arg("extract artifact folder (acts.zarr + tokens.parquet)")
    sae: Path = cli.arg("train_sae artifact folder (or an SAELens SAE folder)")


def run(inputs: Inputs, params: EncodeParams, out: Path) -> None:
    timer = Timer()
    store = ActivationStore(inputs.extract)
    with timer("load"):
        sae = load_sae(inputs.sae, device=resolve_device(params.device))
    check_d_in(sae, store.d_model, inputs.extract)
    layer = sae.cfg.metadata.get("hook_layer")
    if not isinstance(layer, int):
        raise InputError(sae.source / Files.SAE_CFG, "metadata.hook_layer", "missing: cannot tell which layer to encode")
    store.array(layer)  # InputError if that layer was not extracted
    with atomic_dir(out) as tmp:
        with timer("encode"):
            counts = encode_store(sae, store, layer, params.delta, params.batch_tokens, tmp / Files.CODES,
                                  max_codes_per_token=params.max_codes_per_token, part_tokens=params.part_tokens)
        counts.update(layer=layer, d_sae=sae.cfg.d_sae, hook_name=sae.cfg.metadata.get("hook_name"))
        write_manifest(tmp, STAGE, params.as_dict(), {"extract": inputs.extract, "sae": inputs.sae}, counts,
                       timer.timings)
