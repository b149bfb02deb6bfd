"""Per-sample reference scores of the SAE-V rebuttal: IFD and (optionally) CLIP score; see
mmsae/evaluation/baselines.py.

IFD (Li et al. 2024) = the model's loss on the preferred response given image + question, divided by
its loss on the response alone. Higher IFD = the prompt helps less (harder, per Li et al.). `ifd_score`
is the published selection (higher = kept first): IFD below `ifd_threshold` as is, IFD >= threshold
ranked below all others. CLIP score = cosine of CLIP image and text embeddings, only with a local
`clip_model` folder configured (otherwise skipped, said in the manifest and the log).

Reads SAMPLE_DIR/samples.parquet (record schema) and writes, atomically:
  OUT/ifd.parquet    sample_id, loss_conditioned, loss_answer, ifd, ifd_score, n_tokens
  OUT/clip.parquet   sample_id, clip_score                        (only with clip_model)
  OUT/manifest.json  counts include clip_skipped (the reason) when there is no CLIP score

Example:
  python workflow/scripts/baseline_scores.py --samples results/demo/sample-xxxx --model path/to/model \\
      --out results/demo/baseline_scores-yyyy --params '{"clip_model": "/models/clip-vit-large-patch14"}'
"""

from __future__ import annotations

import sys

from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.cli import add_model_args, load_records_and_model_from_args, parser, run

STAGE = "baseline_scores"


def build_parser():
    p = parser(STAGE, __doc__)
    add_model_args(p)
    return p


def body(args, params: dict) -> None:
    from mmsae.evaluation.baselines import clip_scores, ifd_scores

    timer = Timer()
    records, adapter, model_params = load_records_and_model_from_args(args, timer)
    with timer("ifd"):
        ifd = ifd_scores(adapter, records, params["batch_size"], params["ifd_threshold"])
    with timer("clip"):
        clip, skipped = clip_scores(records, params["clip_model"], params["clip_text"], params["batch_size"],
                                    device=str(adapter.device))
    with atomic_dir(args.out) as tmp:
        ifd.to_parquet(tmp / Files.IFD, index=False)
        counts = {"n_samples": len(ifd), "ifd_mean": float(ifd["ifd"].mean()),
                  "ifd_at_or_above_threshold": int((ifd["ifd"] >= params["ifd_threshold"]).sum())}
        if clip is not None:
            clip.to_parquet(tmp / Files.CLIP, index=False)
            counts["clip_mean"] = float(clip["clip_score"].mean())
        else:
            counts["clip_skipped"] = skipped
        write_manifest(tmp, STAGE, {**params, "model": model_params},
                       inputs={"samples": args.samples, "model": args.model}, counts=counts, timings=timer.timings)


if __name__ == "__main__":
    sys.exit(run(STAGE, build_parser(), body))
