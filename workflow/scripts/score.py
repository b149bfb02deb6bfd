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
one job). See mmsae.scoring.shards; the stage itself: mmsae.scoring.stage.run.
"""

from __future__ import annotations

import sys

from mmsae import cli
from mmsae.scoring.stage import run


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
        run(samples=args.samples, extract=args.extract, encode=args.encode, features=args.features, out=args.out,
            params=params, model_loss=args.model_loss, sae=args.sae, shard=args.shard, gather=args.gather)

    return cli.run("score", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
