"""Stage encode: SAE codes of every token (all modalities) of an extract artifact.

Reads the SAE from a train_sae artifact (--sae, its sae/ folder; a bare SAELens folder works too) and
encodes the store's layer the SAE was trained on (cfg.json metadata.hook_layer). Writes into --out:

  codes.parquet   row, sample_id, position, modality, feature, activation (only activations > delta)
  manifest.json   counts: n_tokens, nnz, layer, d_sae

codes.parquet has one row per (token, latent) with activation > delta, ordered by row then feature:
    row (int64, the store row = tokens.parquet row), sample_id (string), position (int32),
    modality (string), feature (int32), activation (float32)
It is written block by block (one parquet row group per block), so memory is bounded by one block.

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
from mmsae.device import resolve_device
from mmsae.errors import InputError
from mmsae.params import EncodeParams
from mmsae.sae.io import check_d_in, load_sae
from mmsae.sae.model import SAE

CODES_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("sample_id", pa.string()),
        ("position", pa.int32()),
        ("modality", pa.string()),
        ("feature", pa.int32()),
        ("activation", pa.float32()),
    ]
)


@torch.no_grad()
def encode_store(sae: SAE, store: ActivationStore, layer: int, delta: float, batch_tokens: int,
                 out_path: str | os.PathLike, *, progress: bool = True) -> dict[str, int]:
    """Write the codes (> delta) of all tokens of `layer` (every modality) to `out_path`.

    The SAE runs on the device its weights are on. Returns {"n_tokens", "nnz"}.
    """
    check_d_in(sae, store.d_model, store.folder)
    tokens = pq.read_table(store.folder / Files.TOKENS, columns=["row", "sample_id", "position", "modality"])
    n = store.n_tokens
    if len(tokens) != n or (n and not np.array_equal(tokens["row"].to_numpy(), np.arange(n))):
        raise InputError(store.folder / Files.TOKENS, "row", f"does not list the {n} rows of the store in order")
    # arrow columns: compact strings, and take() per block keeps the per-block work small
    sample_id, position, modality = (tokens[c].combine_chunks() for c in ("sample_id", "position", "modality"))
    device = sae.W_enc.device
    nnz = 0
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(str(out_path), CODES_SCHEMA) as writer:
        bar = tqdm(total=n, file=sys.stderr, disable=not progress, desc="encode", unit="tok", mininterval=2.0)
        for start, block in store.iter_blocks(layer, batch_tokens):
            f = sae.encode(torch.from_numpy(block).to(device=device, dtype=sae.W_enc.dtype))
            t, i = torch.nonzero(f > delta, as_tuple=True)
            act = f[t, i].float().cpu().numpy()
            t, i = t.cpu().numpy(), i.cpu().numpy()
            rows = start + t.astype(np.int64)
            take = pa.array(rows)
            writer.write_table(pa.table(
                {
                    "row": rows,
                    "sample_id": sample_id.take(take).cast(pa.string()),
                    "position": position.take(take).cast(pa.int32()),
                    "modality": modality.take(take).cast(pa.string()),
                    "feature": i.astype(np.int32),
                    "activation": act.astype(np.float32),
                },
                schema=CODES_SCHEMA,
            ))
            nnz += len(rows)
            bar.update(len(block))
        bar.close()
    return {"n_tokens": n, "nnz": nnz}


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
            counts = encode_store(sae, store, layer, params.delta, params.batch_tokens, tmp / Files.CODES)
        counts.update(layer=layer, d_sae=sae.cfg.d_sae, hook_name=sae.cfg.metadata.get("hook_name"))
        write_manifest(tmp, STAGE, params.as_dict(), {"extract": inputs.extract, "sae": inputs.sae}, counts,
                       timer.timings)
