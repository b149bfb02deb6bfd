"""Fine-tune a model on a record-schema parquet with TRL (SFT or DPO, optionally LoRA); see mmsae/finetune.py.

SFT trains on each record's preferred response; DPO uses preferred = chosen and the other response =
rejected. Prompts are the pipeline's own format (the processor's chat template + " {response} </s>"),
checked token by token against what extract / model_loss / the benchmarks feed the model. The budget
is `max_steps` optimizer steps of `batch_size` samples, seeded. Writes, atomically:

  OUT/model/         save_pretrained weights (safetensors; LoRA merged) + processor: loadable by
                     mmsae.models.load_model and AutoModelForImageTextToText
  OUT/metrics.json   method, steps, losses (final 20% of logged steps and the whole log), layout check
  OUT/train_ids.parquet  sample_id of every record trained on (the kept subset), best first
  OUT/manifest.json

Example (CPU, one process):
  python workflow/scripts/finetune.py --model results/demo/toy_model-xxxx/model \\
      --data results/demo/score-yyyy/subsets/cosine/top050.parquet --out results/demo/finetune-zzzz \\
      --params '{"method": "sft", "max_steps": 300}'

Multi-GPU (every rank trains; only the main process writes OUT):
  accelerate launch --config_file config/accelerate/deepspeed_zero3.yaml workflow/scripts/finetune.py \\
      --model ... --data ... --out ... --params ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.cli import parser, run
from mmsae.errors import InputError

STAGE = "finetune"


def build_parser():
    p = parser(STAGE, __doc__)
    p.add_argument("--model", required=True, help="model folder (or hub id) to start from")
    p.add_argument("--data", required=True, help="parquet file in the mmsae record schema (e.g. a score subset)")
    p.add_argument("--keep-fraction", type=float, default=None,
                   help="train on the best ceil(F * N) records of --data only, ranked by --keep-by")
    p.add_argument("--keep-by", default=None,
                   help="'random:SEED' (a seeded random subset) or 'PATH:COLUMN' (a parquet with sample_id and a "
                        "score, higher = kept first, e.g. baseline_scores' ifd.parquet:ifd_score)")
    return p


def body(args, params: dict) -> None:
    # heavy imports here, so --help answers at once
    from mmsae.data.schema import read_frame
    from mmsae.finetune import MODEL_DIR, finetune
    from mmsae.scoring import keep_top

    timer = Timer()
    with timer("read"):
        df = read_frame(args.data)
    if (args.keep_fraction is None) != (args.keep_by is None):
        raise InputError("arguments", "--keep-fraction/--keep-by", "give both or neither")
    if args.keep_fraction is not None:
        if not 0 < args.keep_fraction <= 1:
            raise InputError("arguments", "--keep-fraction", f"must be in (0, 1], got {args.keep_fraction}")
        df = keep_top(df, args.keep_fraction, args.keep_by)
    out = Path(args.out)
    staging = out.parent / f".{out.name}.staging"  # the same path on every rank
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun: a worker rank
        finetune(args.model, df, None, params, staging, args.data)
        return
    with atomic_dir(out) as tmp:
        with timer("finetune"):
            metrics = finetune(args.model, df, tmp / MODEL_DIR, params, staging, args.data)
        write_json(tmp / Files.METRICS, metrics)
        df[["sample_id"]].astype(str).to_parquet(tmp / Files.TRAIN_IDS, index=False)
        counts = {"n_records": len(df), "steps": metrics["global_step"], "train_loss": metrics["train_loss"],
                  "processes": metrics["processes"], "layout_identical": metrics["layout_check"]["identical"]}
        inputs = {"model": args.model, "data": args.data}
        if args.keep_by:
            inputs["keep"] = f"{args.keep_fraction}:{args.keep_by}"
        write_manifest(tmp, STAGE, params, inputs=inputs, counts=counts,
                       timings={**timer.timings, **{f"finetune.{k}": v for k, v in metrics["timings_s"].items()}})


if __name__ == "__main__":
    sys.exit(run(STAGE, build_parser(), body))
