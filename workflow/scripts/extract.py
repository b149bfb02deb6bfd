"""Extract the residual stream after chosen decoder layers for every token of the sampled records.

Reads SAMPLE_DIR/samples.parquet (mmsae record schema), runs the model (prompt from its chat template,
plus the preferred response when extract.include_response), and writes into --out:

  tokens.parquet        row, sample_id, position, modality (image|text|special), token_id, is_response, patch
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

import os
import shutil
import sys
from pathlib import Path

from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.cli import add_model_args, parser, run
from mmsae.config import stage_params
from mmsae.errors import InputError

STAGE = "extract"


def build_parser():
    p = parser(STAGE, __doc__)
    add_model_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shard", type=int, default=None, help="extract only shard K of extract.shards into OUT/shards/K")
    mode.add_argument("--gather", action="store_true", help="assemble the finished shards of OUT into the artifact")
    return p


def body(args, params: dict) -> None:
    if args.gather:
        return gather(args, params)
    # heavy imports here, so --help answers at once
    from mmsae.activations import (
        PARTS,
        LazyRecords,
        extract_shard,
        extraction_key,
        move_parts,
        partial_dir,
        shard_dir,
        summarize_counts,
        write_store_index,
    )
    from mmsae.data.schema import read_frame
    from mmsae.models import load_model

    n_shards = params["shards"] if args.shard is not None else 1
    shard = args.shard or 0
    if not 0 <= shard < n_shards:
        raise InputError("--shard", "shard", f"shard {shard} outside 0..{n_shards - 1} (extract.shards = {n_shards})")
    timer = Timer()
    model_params = stage_params("model", args.model_params, source="--model-params")
    with timer("read"):  # images are decoded part by part (LazyRecords); the sample stage checked them
        records = LazyRecords(read_frame(Path(args.samples) / Files.SAMPLES, check_images=False),
                              Path(args.samples) / Files.SAMPLES)
    with timer("load_model"):
        adapter = load_model(args.model, dtype=model_params["dtype"], device=model_params["device"],
                             trust_remote_code=model_params["trust_remote_code"])
    layers = adapter.check_layers(params["layers"], "extract.layers")
    out = shard_dir(args.out, shard) if args.shard is not None else Path(args.out)
    work = partial_dir(out)
    key = extraction_key(params, model_params, args.model)
    with timer("extract"):
        try:
            parts = extract_shard(adapter, records, layers, params, work, key, shard, n_shards)
        except InputError:
            shutil.rmtree(work, ignore_errors=True)  # bad input: nothing worth resuming
            raise
    with atomic_dir(out) as tmp:
        with timer("write"):
            counts = write_store_index(tmp, parts, [f"{PARTS}/{p.name}" for p in parts], layers, adapter.d_model, params)
        counts = summarize_counts(counts)
        counts.update(layers=layers, d_model=adapter.d_model, n_model_layers=adapter.n_layers, model_family=adapter.family,
                      image_grid=adapter.image_grid(), n_parts=len(parts), extraction_key=key)
        if args.shard is not None:
            counts.update(shard=shard, n_shards=n_shards)
        write_manifest(tmp, STAGE if args.shard is None else "extract_shard", {**params, "model": model_params},
                       inputs={"samples": args.samples, "model": args.model}, counts=counts, timings=timer.timings)
        move_parts(parts, tmp / PARTS)  # last: renames only, nothing left to fail
    shutil.rmtree(work, ignore_errors=True)


def gather(args, params: dict) -> None:
    """The artifact over its N finished shards: global tokens.parquet, acts.json, manifest."""
    from mmsae.activations import (
        SHARDS,
        extraction_key,
        shard_dir,
        store_parts,
        summarize_counts,
        write_store_index,
    )

    timer = Timer()
    n_shards = params["shards"]
    model_params = stage_params("model", args.model_params, source="--model-params")
    key = extraction_key(params, model_params, args.model)
    manifests = []
    for k in range(n_shards):
        m = read_manifest(shard_dir(args.out, k))  # InputError when the shard is missing or unfinished
        c = m["counts"]
        if (c.get("shard"), c.get("n_shards"), c.get("extraction_key")) != (k, n_shards, key):
            raise InputError(shard_dir(args.out, k) / Files.MANIFEST, "counts",
                             f"not shard {k} of {n_shards} of this extraction (params or model differ)")
        manifests.append(m)
    parts, names = [], []
    for k in range(n_shards):
        for name in store_parts(shard_dir(args.out, k)):
            parts.append(shard_dir(args.out, k) / name)
            names.append(f"{SHARDS}/{k:04d}/{name}")
    first = manifests[0]["counts"]
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        with timer("gather"):
            counts = write_store_index(tmp, parts, names, first["layers"], first["d_model"], params)
        counts = summarize_counts(counts)
        counts.update({k: first[k] for k in ("layers", "d_model", "n_model_layers", "model_family", "image_grid")},
                      n_parts=len(parts), n_shards=n_shards, extraction_key=key)
        timings = {**timer.timings, **{f"shards.{k}": sum(m["timings_s"].get(k, 0.0) for m in manifests)
                                       for k in ("read", "load_model", "extract", "write")}}
        write_manifest(tmp, STAGE, {**params, "model": model_params}, inputs=manifests[0]["inputs"], counts=counts,
                       timings=timings)
        os.replace(out / SHARDS, tmp / SHARDS)  # last: one rename


if __name__ == "__main__":
    sys.exit(run(STAGE, build_parser(), body))
