"""Stage score: one score per sample per method (higher = kept first), ranks, and the top subsets.

Methods (config score.methods): cosine (SAE-V Algorithm 1), l0, l1, cooc_l0, random, nosae_cosine,
model_loss (needs --model-loss), and the cross-modal consistency scores consistency, consistency_image,
consistency_cos (concept features of features.parquet, config score.consistency), offdist and
consistency_gated (off-distribution images; with --sae, the SAE's reconstruction error on image tokens
is one of offdist's statistics). Writes scores.parquet (sample_id, score_<m>, rank_<m>; rank 1 =
best, ties by sample_id) and subsets/{method}/top{pct:03d}.parquet: the ids (sample_id, rank) of the best ceil(f*N)
samples for every fraction f, best first (the finetune stage reads their records from samples.parquet).
samples.parquet is read without its image bytes. See mmsae.scoring.

Sharded (score.shards = N > 1): `--shard K` writes the per-sample statistics of the K-th of N sample
ranges to OUT.shards/K (4 digits); `--gather` finishes the scores from all N of them (same output as
one job). See mmsae.scoring.shards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.errors import InputError
from mmsae.features import encode_info, feature_rule, feature_weights, read_columns, text_modalities
from mmsae.params import ScoreParams
from mmsae.scoring.concepts import CONCEPT_COLUMNS
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import score_samples, with_parts
from mmsae.scoring.shards import gather_context, score_gathered, shard_folder, shard_statistics, write_shard
from mmsae.scoring.subsets import SUBSETS, read_samples, write_subsets

Folder = str | os.PathLike


def needs_concepts(methods: Sequence[str]) -> bool:
    """Whether a method reads the concept features (the consistency scores: features.parquet's top-K columns)."""
    return any(m.startswith("consistency") for m in with_parts(methods))


def load_layer_sae(path: Folder, store: ActivationStore, extract: Folder, layer: int, device: str = "auto"):
    """The SAE of `path` (train_sae artifact or SAELens folder) on `device` (score.device; 'auto' = CUDA when
    there is one: at d_sae 65,536 the SAE pass is ~0.5 GFLOP per image token), checked against the store's
    width and the codes' layer."""
    from mmsae.device import resolve_device
    from mmsae.sae.io import check_d_in, load_sae

    sae = load_sae(path, device=resolve_device(device, "score.device", "device")).eval()
    check_d_in(sae, store.d_model, extract)
    if sae.cfg.metadata.get("hook_layer") != layer:
        raise InputError(sae.source / Files.SAE_CFG, "metadata.hook_layer",
                         f"SAE is for layer {sae.cfg.metadata.get('hook_layer')}, the codes for layer {layer}")
    return sae


STAGE = "score"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("sample artifact folder (samples.parquet)")
    extract: Path = cli.arg("extract artifact folder")
    encode: Path = cli.arg("encode artifact folder (codes.parquet)")
    features: Path = cli.arg("features artifact folder (features.parquet)")
    model_loss: Path | None = cli.arg("model_loss artifact folder (loss.parquet)", default=None)
    sae: Path | None = cli.arg("train_sae artifact folder (or SAELens folder) of the SAE behind --encode: adds its "
                               "image reconstruction error to offdist / consistency_gated (optional)", default=None)
    shard: int | None = cli.arg("only the per-sample statistics of shard K of score.shards, into OUT.shards/K",
                                default=None, type=int)
    gather: bool = cli.arg("finish the scores from the score.shards shards of OUT", default=False)


def run(inputs: Inputs, params: ScoreParams, out: Path) -> None:
    """Run the score stage into `out` (written atomically). `shard` (one shard's statistics) and `gather`
    (finish from every shard) exclude each other; neither = one job. Bad input raises InputError."""
    if inputs.shard is not None and inputs.gather:
        raise InputError("--shard", "gather", "--shard and --gather exclude each other")
    timer = Timer()
    methods = params.methods
    if "model_loss" in with_parts(methods) and not inputs.model_loss:
        which = [m for m in methods if "model_loss" in with_parts([m])][0]
        raise InputError("score.methods", which, f"method {which!r} needs --model-loss")
    table = read_samples(inputs.samples)
    layer, d_sae = encode_info(inputs.encode)
    concept = needs_concepts(methods)
    feats = read_columns(Path(inputs.features) / Files.FEATURES, CONCEPT_COLUMNS if concept else ("feature", "weight"))
    store = ActivationStore(inputs.extract)
    model = load_layer_sae(inputs.sae, store, inputs.extract, layer, params.device) if inputs.sae else None
    rule = feature_rule(inputs.features)
    text = text_modalities(rule)
    ids = table.column("sample_id").to_pylist()
    if inputs.shard is not None:
        return run_shard(inputs.shard, params, ids, store, layer, model, text, timer, extract=inputs.extract,
                         encode=inputs.encode, out=out)
    losses = read_columns(Path(inputs.model_loss) / Files.LOSS, ("sample_id", "loss")) if inputs.model_loss else None
    context = dict(
        codes=Path(inputs.encode) / Files.CODES, weights=feature_weights(feats, d_sae), store=store, layer=layer,
        losses=losses, delta=params.delta, seed=params.seed, text_modalities=text, features=feats if concept else None,
        sae=model, consistency=params.consistency,
    )
    with timer("score"):
        ctx, scores = score_all(ids, methods, context, out, params.shards if inputs.gather else None)
    counts: dict[str, Any] = {"n_samples": len(scores), "feature_rule": rule}
    if inputs.gather:
        counts["n_shards"] = params.shards
    if concept:
        counts["n_concept_features"] = int(ctx.concept_features["selected"].sum())
    read = {"samples": inputs.samples, "extract": inputs.extract, "encode": inputs.encode, "features": inputs.features}
    read.update({k: v for k, v in (("model_loss", inputs.model_loss), ("sae", inputs.sae)) if v})
    write_scores(out, table, scores, params, {k: os.fspath(v) for k, v in read.items()}, counts, timer)


def score_all(ids: Sequence[str], methods: Sequence[str], context: dict[str, Any], out: Folder,
              n_shards: int | None) -> tuple[ScoringContext, Any]:
    """(the context, the scores frame) of every sample: one job, or with `n_shards` the gather of the
    shards of `out`."""
    if n_shards is None:
        ctx = ScoringContext(ids, **context)
        return ctx, score_samples(ctx, methods)
    ctx, done = gather_context([shard_folder(out, k) for k in range(n_shards)], ids, **context)
    return ctx, score_gathered(ctx, methods, done)


def write_scores(out: Folder, samples: pa.Table, scores, params: ScoreParams, inputs: dict[str, str],
                 counts: dict[str, Any], timer: Timer) -> None:
    """scores.parquet, the subsets and the manifest, into `out` atomically."""
    with atomic_dir(out) as tmp:
        scores.to_parquet(tmp / Files.SCORES, index=False)
        with timer("subsets"):
            written = write_subsets(samples, scores, params.methods, params.fractions, tmp / SUBSETS)
        write_manifest(tmp, STAGE, params.as_dict(), inputs, {**counts, "subsets": written}, timer.timings)


def run_shard(shard: int, params: ScoreParams, ids: Sequence[str], store: ActivationStore, layer: int, sae,
              text: Sequence[str], timer: Timer, *, extract: Folder, encode: Folder, out: Folder) -> None:
    """The per-sample statistics of the `shard`-th sample range, into OUT.shards/K (mmsae.scoring.shards)."""
    n_shards = params.shards
    if not 0 <= shard < n_shards:
        raise InputError("--shard", "shard", f"shard {shard} outside 0..{n_shards - 1} (score.shards = {n_shards})")
    with timer("shard"):
        result = shard_statistics(store, Path(encode) / Files.CODES, layer, ids, params.methods, shard, n_shards,
                                  delta=params.delta, text_modalities=text, sae=sae)
    with atomic_dir(shard_folder(out, shard)) as tmp:
        write_shard(tmp, result, shard, n_shards)
        write_manifest(tmp, "score_shard", params.as_dict(), {"extract": os.fspath(extract), "encode": os.fspath(encode)},
                       {"shard": shard, "n_shards": n_shards, "n_samples": len(result["stats"]),
                        "rows": result["rows"]}, timer.timings)
