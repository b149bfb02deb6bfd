"""The score stage (workflow/scripts/score.py parses the arguments and calls `run`).

Reads the samples, extract, encode and features artifacts (and model_loss, the SAE), scores every sample
with each method of config score.methods and writes scores.parquet (sample_id, score_<m>, rank_<m>),
subsets/{method}/top{pct:03d}.parquet and the manifest. Sharded (score.shards = N > 1): `shard=K` writes
the per-sample statistics of the K-th of N sample ranges to OUT.shards/K; `gather=True` finishes the scores
from all N of them (same output as one job; mmsae.scoring.shards).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.config import stage_params
from mmsae.errors import InputError
from mmsae.features import encode_info, feature_weights, read_columns
from mmsae.scoring.concepts import CONCEPT_COLUMNS
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import score_samples
from mmsae.scoring.shards import gather_context, score_gathered, shard_folder, shard_statistics, write_shard
from mmsae.scoring.subsets import SUBSETS, read_samples, write_subsets

Folder = str | os.PathLike


def feature_rule(features: Folder) -> str:
    """The rule the features artifact was built with (its manifest's params.rule; per_modality if absent)."""
    return read_manifest(features).get("params", {}).get("rule", "per_modality")


def text_modalities(rule: str) -> tuple[str, ...]:
    """The modalities that count as text for features built with `rule`: the release rule's "text" is every
    non-image token (modalities text and special), per_modality's the modality `text` only."""
    return ("text", "special") if rule == "release" else ("text",)


def needs_concepts(methods: Sequence[str]) -> bool:
    """Whether a method reads the concept features (the consistency scores: features.parquet's top-K columns)."""
    return any(m.startswith("consistency") for m in methods)


def load_layer_sae(path: Folder, store: ActivationStore, extract: Folder, layer: int):
    """The SAE of `path` (train_sae artifact or SAELens folder), checked against the store's width and the
    codes' layer."""
    from mmsae.artifacts import Files
    from mmsae.sae.io import check_d_in, load_sae

    sae = load_sae(path)
    check_d_in(sae, store.d_model, extract)
    if sae.cfg.metadata.get("hook_layer") != layer:
        raise InputError(sae.source / Files.SAE_CFG, "metadata.hook_layer",
                         f"SAE is for layer {sae.cfg.metadata.get('hook_layer')}, the codes for layer {layer}")
    return sae


def run(*, samples: Folder, extract: Folder, encode: Folder, features: Folder, out: Folder,
        params: dict[str, Any] | str | None = None, model_loss: Folder | None = None, sae: Folder | None = None,
        shard: int | None = None, gather: bool = False) -> None:
    """Run the score stage into `out` (written atomically). `params`: the score config slice (defaults filled
    from config/schema.yaml). `shard` (one shard's statistics) and `gather` (finish from every shard) exclude
    each other; neither = one job. Bad input raises InputError."""
    params = stage_params("score", params)
    timer = Timer()
    methods = params["methods"]
    if "model_loss" in methods and not model_loss:
        raise InputError("score.methods", "model_loss", "method 'model_loss' needs --model-loss")
    table = read_samples(samples)
    layer, d_sae = encode_info(encode)
    concept = needs_concepts(methods)
    feats = read_columns(Path(features) / Files.FEATURES, CONCEPT_COLUMNS if concept else ("feature", "weight"))
    store = ActivationStore(extract)
    model = load_layer_sae(sae, store, extract, layer) if sae else None
    rule = feature_rule(features)
    text = text_modalities(rule)
    ids = table.column("sample_id").to_pylist()
    if shard is not None:
        return run_shard(shard, params, ids, store, layer, model, text, timer, extract=extract, encode=encode, out=out)
    losses = read_columns(Path(model_loss) / Files.LOSS, ("sample_id", "loss")) if model_loss else None
    context = dict(
        codes=Path(encode) / Files.CODES, weights=feature_weights(feats, d_sae), store=store, layer=layer, losses=losses,
        delta=params["delta"], seed=params["seed"], text_modalities=text, features=feats if concept else None,
        sae=model, consistency=params["consistency"],
    )
    with timer("score"):
        ctx, scores = score_all(ids, methods, context, out, params["shards"] if gather else None)
    counts: dict[str, Any] = {"n_samples": len(scores), "feature_rule": rule}
    if gather:
        counts["n_shards"] = params["shards"]
    if concept:
        counts["n_concept_features"] = int(ctx.concept_features["selected"].sum())
    inputs = {"samples": samples, "extract": extract, "encode": encode, "features": features}
    inputs.update({k: v for k, v in (("model_loss", model_loss), ("sae", sae)) if v})
    write_scores(out, table, scores, params, {k: os.fspath(v) for k, v in inputs.items()}, counts, timer)


def score_all(ids: Sequence[str], methods: Sequence[str], context: dict[str, Any], out: Folder,
              n_shards: int | None) -> tuple[ScoringContext, Any]:
    """(the context, the scores frame) of every sample: one job, or with `n_shards` the gather of the
    shards of `out`."""
    if n_shards is None:
        ctx = ScoringContext(ids, **context)
        return ctx, score_samples(ctx, methods)
    ctx, done = gather_context([shard_folder(out, k) for k in range(n_shards)], ids, **context)
    return ctx, score_gathered(ctx, methods, done)


def write_scores(out: Folder, samples: pa.Table, scores, params: dict[str, Any], inputs: dict[str, str],
                 counts: dict[str, Any], timer: Timer) -> None:
    """scores.parquet, the subsets and the manifest, into `out` atomically."""
    with atomic_dir(out) as tmp:
        scores.to_parquet(tmp / Files.SCORES, index=False)
        with timer("subsets"):
            written = write_subsets(samples, scores, params["methods"], params["fractions"], tmp / SUBSETS)
        write_manifest(tmp, "score", params, inputs, {**counts, "subsets": written}, timer.timings)


def run_shard(shard: int, params: dict[str, Any], ids: Sequence[str], store: ActivationStore, layer: int, sae,
              text: Sequence[str], timer: Timer, *, extract: Folder, encode: Folder, out: Folder) -> None:
    """The per-sample statistics of the `shard`-th sample range, into OUT.shards/K (mmsae.scoring.shards)."""
    n_shards = params["shards"]
    if not 0 <= shard < n_shards:
        raise InputError("--shard", "shard", f"shard {shard} outside 0..{n_shards - 1} (score.shards = {n_shards})")
    with timer("shard"):
        result = shard_statistics(store, Path(encode) / Files.CODES, layer, ids, params["methods"], shard, n_shards,
                                  delta=params["delta"], text_modalities=text, sae=sae)
    with atomic_dir(shard_folder(out, shard)) as tmp:
        write_shard(tmp, result, shard, n_shards)
        write_manifest(tmp, "score_shard", params, {"extract": os.fspath(extract), "encode": os.fspath(encode)},
                       {"shard": shard, "n_shards": n_shards, "n_samples": len(result["stats"]),
                        "rows": result["rows"]}, timer.timings)
