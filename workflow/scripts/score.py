"""Stage score: one score per sample per method (higher = kept first), ranks, and the top subsets.

Methods (config score.methods): cosine (SAE-V Algorithm 1), l0, l1, cooc_l0, random, nosae_cosine,
model_loss (needs --model-loss), and the cross-modal consistency scores consistency, consistency_image,
consistency_cos (concept features of features.parquet, config score.consistency), offdist and
consistency_gated (off-distribution images; with --sae, the SAE's reconstruction error on image tokens
is one of offdist's statistics). Writes scores.parquet (sample_id, score_<m>, rank_<m>; rank 1 =
best, ties by sample_id) and subsets/{method}/top{pct:03d}.parquet: the best ceil(f*N) samples for
every fraction f, in the samples.parquet record schema. See mmsae.scoring.

Sharded (score.shards = N > 1): `--shard K` writes the per-sample statistics of the K-th of N sample
ranges to OUT.shards/K (4 digits); `--gather` finishes the scores from all N of them (same output as
one job). See mmsae.scoring.shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Timer, atomic_dir, read_manifest, write_manifest
from mmsae.errors import InputError
from mmsae.features import CODES, FEATURES, encode_info, feature_weights, read_columns
from mmsae.scoring import (
    CONCEPT_COLUMNS,
    SCORES,
    SUBSETS,
    ScoringContext,
    read_samples,
    score_samples,
    write_subsets,
)
from mmsae.scoring.shards import gather_context, score_gathered, shard_folder, shard_statistics, write_shard


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("score", __doc__)
    argp.add_argument("--samples", required=True, help="sample artifact folder (samples.parquet)")
    argp.add_argument("--extract", required=True, help="extract artifact folder")
    argp.add_argument("--encode", required=True, help="encode artifact folder (codes.parquet)")
    argp.add_argument("--features", required=True, help="features artifact folder (features.parquet)")
    argp.add_argument("--model-loss", default=None, help="model_loss artifact folder (loss.parquet)")
    argp.add_argument("--sae", default=None,
                      help="train_sae artifact folder (or SAELens folder) of the SAE behind --encode: adds its "
                           "image reconstruction error to offdist / consistency_gated (optional)")
    mode = argp.add_mutually_exclusive_group()
    mode.add_argument("--shard", type=int, default=None,
                      help="only the per-sample statistics of shard K of score.shards, into OUT.shards/K")
    mode.add_argument("--gather", action="store_true", help="finish the scores from the score.shards shards of OUT")

    def body(args, params):
        timer = Timer()
        methods = params["methods"]
        if "model_loss" in methods and not args.model_loss:
            raise InputError("score.methods", "model_loss", "method 'model_loss' needs --model-loss")
        samples = read_samples(args.samples)
        layer, d_sae = encode_info(args.encode)
        concept = any(m.startswith("consistency") for m in methods)
        features = read_columns(Path(args.features) / FEATURES, CONCEPT_COLUMNS if concept else ("feature", "weight"))
        store = ActivationStore(args.extract)
        sae = None
        if args.sae:
            from mmsae.sae.io import CFG, check_d_in, load_sae

            sae = load_sae(args.sae)
            check_d_in(sae, store.d_model, args.extract)
            if sae.cfg.metadata.get("hook_layer") != layer:
                raise InputError(sae.source / CFG, "metadata.hook_layer",
                                 f"SAE is for layer {sae.cfg.metadata.get('hook_layer')}, the codes for layer {layer}")
        rule = read_manifest(args.features).get("params", {}).get("rule", "per_modality")
        text_modalities = ("text", "special") if rule == "release" else ("text",)
        ids = samples.column("sample_id").to_pylist()
        if args.shard is not None:
            return score_shard(args, params, ids, store, layer, sae, text_modalities, timer)
        losses = None
        if args.model_loss:
            losses = read_columns(Path(args.model_loss) / "loss.parquet", ("sample_id", "loss"))
        context = dict(
            codes=Path(args.encode) / CODES, weights=feature_weights(features, d_sae), store=store,
            layer=layer, losses=losses, delta=params["delta"], seed=params["seed"], text_modalities=text_modalities,
            features=features if concept else None, sae=sae, consistency=params["consistency"],
        )
        with timer("score"):
            if args.gather:
                shards = [shard_folder(args.out, k) for k in range(params["shards"])]
                ctx, done = gather_context(shards, ids, **context)
                scores = score_gathered(ctx, methods, done)
            else:
                ctx = ScoringContext(ids, **context)
                scores = score_samples(ctx, methods)
        counts = {"n_samples": len(scores), "feature_rule": rule}
        if args.gather:
            counts["n_shards"] = params["shards"]
        if concept:
            counts["n_concept_features"] = int(ctx.concept_features["selected"].sum())
        with atomic_dir(args.out) as tmp:
            scores.to_parquet(tmp / SCORES, index=False)
            with timer("subsets"):
                written = write_subsets(samples, scores, methods, params["fractions"], tmp / SUBSETS)
            inputs = {"samples": args.samples, "extract": args.extract, "encode": args.encode,
                      "features": args.features}
            if args.model_loss:
                inputs["model_loss"] = args.model_loss
            if args.sae:
                inputs["sae"] = args.sae
            write_manifest(tmp, "score", params, inputs, {**counts, "subsets": written}, timer.timings)

    return cli.run("score", argp, body, argv)


def score_shard(args, params, ids, store, layer, sae, text_modalities, timer) -> None:
    """--shard K: the per-sample statistics of the K-th sample range (mmsae.scoring.shards)."""
    n_shards = params["shards"]
    if not 0 <= args.shard < n_shards:
        raise InputError("--shard", "shard", f"shard {args.shard} outside 0..{n_shards - 1} (score.shards = {n_shards})")
    with timer("shard"):
        result = shard_statistics(store, Path(args.encode) / CODES, layer, ids, params["methods"],
                                  args.shard, n_shards, delta=params["delta"], text_modalities=text_modalities, sae=sae)
    with atomic_dir(shard_folder(args.out, args.shard)) as tmp:
        write_shard(tmp, result, args.shard, n_shards)
        write_manifest(tmp, "score_shard", params, {"extract": args.extract, "encode": args.encode},
                       {"shard": args.shard, "n_shards": n_shards, "n_samples": len(result["stats"]),
                        "rows": result["rows"]}, timer.timings)


if __name__ == "__main__":
    sys.exit(main())
