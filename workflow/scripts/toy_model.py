"""Train the toy MLLM (a tiny LLaVA) on the toy world and evaluate it on the held-out split.

Reads DIR/train.parquet and DIR/heldout.parquet (the toyworld stage's artifact), runs the staged recipe
of mmsae.models.toy (text -> vision + patch alignment -> joint), and writes, atomically:

  OUT/model/          save_pretrained model + processor (safetensors), loadable by
                      AutoModelForImageTextToText / AutoProcessor
  OUT/base_model/     the LM after the text stage (LlamaForCausalLM + tokenizer): the base LLM of the
                      SAE transfer test (evaluate_sae)
  OUT/metrics.json    held-out exact match of the reloaded model (overall, per task), final losses
  OUT/manifest.json

Example:
  python workflow/scripts/toy_model.py --toyworld results/demo/toyworld-xxxx --out results/demo/toy_model-yyyy \\
      --params '{"steps_text": 1200}'
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.cli import parser, run
from mmsae.data.schema import read_frame

STAGE = "toy_model"


def toy_model(toyworld: str | Path, out: str | Path, params: dict) -> dict:
    """The stage: read the splits, train, save; returns the metrics."""
    from mmsae.models.toy import train_toy_model

    toyworld = Path(toyworld)
    timer = Timer()
    with timer("read"):
        train = read_frame(toyworld / Files.TRAIN)
        heldout = read_frame(toyworld / Files.HELDOUT)
    with atomic_dir(out) as tmp:
        with timer("train"):
            metrics = train_toy_model(train, heldout, params, tmp)
        write_json(tmp / Files.METRICS, metrics)
        write_manifest(
            tmp, STAGE, params,
            inputs={"toyworld": toyworld},
            counts={"train": len(train), "heldout": len(heldout), "eval": metrics["n_eval"],
                    "parameters": metrics["n_params"]},
            timings={**timer.timings, **{f"train.{k}": v for k, v in metrics["timings_s"].items()}},
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    argp = parser(STAGE, __doc__)
    argp.add_argument("--toyworld", required=True, help="the toyworld artifact folder (train.parquet, heldout.parquet)")
    return run(STAGE, argp, lambda args, params: toy_model(args.toyworld, args.out, params), argv)


if __name__ == "__main__":
    sys.exit(main())
