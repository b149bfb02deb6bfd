"""Captured hidden states on disk: zarr stores plus a parquet token index.

Layout of an extract artifact folder (either form is read by ActivationStore as one store):

    tokens.parquet        one row per token, row i describes row i of every layer array:
                          row, sample_id, position, modality (image|text|special), token_id,
                          is_response, patch (index among its image's tokens, -1 otherwise),
                          image_index (which image of the sample, -1 otherwise)
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

Modules: store (the token schema, ActivationWriter, ActivationStore), extraction (capture hooks, the
extraction loop, shards and parts), stage (the extract stage: STAGE, Inputs, run).
"""

from mmsae.activations.extraction import (
    PARTS,
    SHARDS,
    LayerCapture,
    LazyRecords,
    extract,
    extract_shard,
    extraction_key,
    move_parts,
    part_counts,
    part_ranges,
    partial_dir,
    shard_dir,
    shard_records,
    store_parts,
    summarize_counts,
    write_store_index,
)
from mmsae.activations.store import (
    MODALITIES,
    TOKEN_SCHEMA,
    ActivationStore,
    ActivationWriter,
    storage_to_float,
)

__all__ = [
    "MODALITIES", "PARTS", "SHARDS", "TOKEN_SCHEMA", "ActivationStore", "ActivationWriter", "LayerCapture",
    "LazyRecords", "extract", "extract_shard", "extraction_key", "move_parts", "part_counts", "part_ranges",
    "partial_dir", "shard_dir", "shard_records", "storage_to_float", "store_parts", "summarize_counts",
    "write_store_index",
]
