"""Extract the residual stream after chosen decoder layers for every token of the sampled records.

Reads SAMPLE_DIR/samples.parquet (mmsae record schema), runs the model (prompt from its chat template,
plus the preferred response when extract.include_response), and writes into --out:

  tokens.parquet        row, sample_id, position, modality (image|text|special), token_id, is_response, patch,
                        image_index
  acts.json, parts/     the hidden states after each decoder layer L, [n_tokens, d_model] (padding never
                        stored), in parts of extract.part_batches batches: a killed run's rerun keeps the
                        finished parts (mmsae.activations.ActivationStore reads them as one store)
  manifest.json         params (extract slice + model slice), inputs, counts, timings

Sharded (extract.shards = N > 1, one job per shard, then one gather):
  --shard K    extract the K-th of N contiguous slices of the records into OUT/shards/K (4 digits)
  --gather     once all N shards are done: write OUT/tokens.parquet, acts.json and manifest.json over them

Example:
  python workflow/scripts/extract.py --samples results/demo/sample-1234abcd --model llava-hf/llava-v1.6-mistral-7b-hf \\
      --model-params '{"dtype": "bfloat16"}' --params '{"layers": [16], "batch_size": 4}' --out results/demo/extract-x
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from mmsae import cli
from mmsae.activations.extraction import (
    PARTS,
    SHARDS,
    LazyRecords,
    extract_shard,
    extraction_key,
    move_parts,
    partial_dir,
    shard_dir,
    store_parts,
    summarize_counts,
    write_store_index,
)
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.data.schema import read_frame
from mmsae.errors import InputError
from mmsae.models import load_model_with
from mmsae.params import ExtractParams

STAGE = "extract"
SHARD_STAGE = "extract_shard"  # the manifest stage of one shard's folder (OUT/shards/K)
# copied from the first shard's manifest into the gathered one: the same in every shard
MODEL_COUNTS = ("layers", "d_model", "n_model_layers", "model_family", "image_grid")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs(cli.ModelInputs):
    shard: int | None = cli.arg("extract only shard K of extract.shards into OUT/shards/K", default=None, type=int)
    gather: bool = cli.arg("assemble the finished shards of OUT into the artifact", default=False)


def run(inputs: Inputs, params: ExtractParams, out: Path) -> None:
    if inputs.shard is not None and inputs.gather:
        raise InputError("--gather", "gather", "--shard and --gather exclude each other")
    if inputs.gather:
        gather(inputs, params, out)
    else:
        extract_records(inputs, params, out)


def extract_records(inputs: Inputs, params: ExtractParams, out: Path) -> None:
    """The whole extraction into `out`, or with --shard K its K-th shard into OUT/shards/K."""
    sharded = inputs.shard is not None
    n_shards = params.shards if sharded else 1
    shard = inputs.shard or 0
    if not 0 <= shard < n_shards:
        raise InputError("--shard", "shard", f"shard {shard} outside 0..{n_shards - 1} (extract.shards = {n_shards})")
    timer = Timer()
    samples = Path(inputs.samples) / Files.SAMPLES
    with timer("read"):  # images are decoded part by part (LazyRecords); the sample stage checked them
        records = LazyRecords(read_frame(samples, check_images=False), samples)
    with timer("load_model"):
        adapter = load_model_with(inputs.model, inputs.model_params)
    layers = adapter.check_layers(params.layers, "extract.layers")
    target = shard_dir(out, shard) if sharded else Path(out)
    work = partial_dir(target)
    key = extraction_key(params, inputs.model_params, inputs.model)
    with timer("extract"):
        try:
            parts = extract_shard(adapter, records, layers, params, work, key, shard, n_shards)
        except InputError:
            shutil.rmtree(work, ignore_errors=True)  # bad input: nothing worth resuming
            raise
    with atomic_dir(target) as tmp:
        with timer("write"):
            counts = write_store_index(tmp, parts, [f"{PARTS}/{p.name}" for p in parts], layers, adapter.d_model, params)
        counts = summarize_counts(counts)
        counts.update(layers=layers, d_model=adapter.d_model, n_model_layers=adapter.n_layers, model_family=adapter.family,
                      image_grid=adapter.image_grid(), n_parts=len(parts), extraction_key=key)
        if sharded:
            counts.update(shard=shard, n_shards=n_shards)
        write_manifest(tmp, SHARD_STAGE if sharded else STAGE, cli.manifest_params(params, inputs.model_params),
                       inputs={"samples": inputs.samples, "model": inputs.model}, counts=counts, timings=timer.timings)
        move_parts(parts, tmp / PARTS)  # last: renames only, nothing left to fail
    shutil.rmtree(work, ignore_errors=True)


def shard_manifests(out: Path, n_shards: int, key: str) -> list[dict]:
    """The manifests of the N finished shards of `out`; InputError when one is missing, unfinished or
    made by another extraction."""
    manifests = []
    for k in range(n_shards):
        m = read_manifest(shard_dir(out, k))  # InputError when the shard is missing or unfinished
        c = m["counts"]
        if (c.get("shard"), c.get("n_shards"), c.get("extraction_key")) != (k, n_shards, key):
            raise InputError(shard_dir(out, k) / Files.MANIFEST, "counts",
                             f"not shard {k} of {n_shards} of this extraction (params or model differ)")
        manifests.append(m)
    return manifests


def gather(inputs: Inputs, params: ExtractParams, out: Path) -> None:
    """The artifact over its N finished shards: global tokens.parquet, acts.json, manifest."""
    timer = Timer()
    n_shards = params.shards
    key = extraction_key(params, inputs.model_params, inputs.model)
    manifests = shard_manifests(out, n_shards, key)
    parts, names = [], []
    for k in range(n_shards):
        for name in store_parts(shard_dir(out, k)):
            parts.append(shard_dir(out, k) / name)
            names.append(f"{SHARDS}/{k:04d}/{name}")
    first = manifests[0]["counts"]
    out = Path(out)
    with atomic_dir(out) as tmp:
        with timer("gather"):
            counts = write_store_index(tmp, parts, names, first["layers"], first["d_model"], params)
        counts = summarize_counts(counts)
        counts.update({k: first[k] for k in MODEL_COUNTS}, n_parts=len(parts), n_shards=n_shards, extraction_key=key)
        timings = {**timer.timings, **{f"shards.{k}": sum(m["timings_s"].get(k, 0.0) for m in manifests)
                                       for k in ("read", "load_model", "extract", "write")}}
        write_manifest(tmp, STAGE, cli.manifest_params(params, inputs.model_params), inputs=manifests[0]["inputs"], counts=counts,
                       timings=timings)
        os.replace(out / SHARDS, tmp / SHARDS)  # last: one rename
