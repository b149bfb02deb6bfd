"""Stage finetune: fine-tune a multimodal model on a record-schema parquet with TRL: SFT or DPO,
optionally LoRA.

- SFT (`SFTTrainer`): the preferred response is the completion; the loss is on its tokens only.
- DPO (`DPOTrainer`): preferred = chosen, the other response = rejected (the first non-preferred one
  when a record has more than two); the reference model is the starting model (with LoRA: the model
  with its adapter disabled).

Both use TRL's vision format: `images` (a list of one image) plus `prompt` / `completion` (SFT) or
`prompt` / `chosen` / `rejected` (DPO) as plain strings. The strings are our own prompt format, so
the fine-tuned model sees the token layout every other stage uses (extract, model_loss, benchmarks):

    prompt     = <the special tokens the tokenizer adds itself, e.g. BOS> + format_prompt(question)
    completion = format_response(response)        (" {response} {eos}")

TRL tokenises prompt and completion separately with `add_special_tokens=False` and concatenates them;
the leading special tokens are therefore written into the prompt text. `check_layout` runs TRL's own
collator on the first records and compares input ids and loss positions with
`ModelAdapter.build_batch(records, include_response=True)`; a mismatch (a tokenizer that merges
across the prompt/response boundary) stops the run, or is logged with `layout_check: warn`. For the
toy model's word-level tokenizer and the test models the layouts are identical. For Chameleon the
processor is made to tokenise in text-completion mode, as the adapter does (no separator token).

The budget is `max_steps` optimizer steps of `batch_size` samples (global: per device x devices x
gradient accumulation), seeded. The result is saved with `save_pretrained` (safetensors, LoRA merged
into the weights) plus the processor, so `mmsae.models.load_model` loads it.

Multi-GPU: the stage script runs unchanged under `accelerate launch --config_file
config/accelerate/{deepspeed_zero3,fsdp}.yaml`; every rank trains, `trainer.save_model` gathers the
weights, and only the main process writes the artifact.

Writes, atomically:

  OUT/model/         save_pretrained weights (safetensors; LoRA merged) + processor: loadable by
                     mmsae.models.load_model and AutoModelForImageTextToText
  OUT/metrics.json   method, steps, losses (final 20% of logged steps and the whole log), layout check
  OUT/train_ids.parquet  sample_id of every record trained on (the kept subset), best first
  OUT/manifest.json

Example (CPU, one process):
  python workflow/scripts/finetune.py --model results/demo/toy_model-xxxx/model \\
      --data results/demo/sample-wwww/samples.parquet --ids results/demo/score-yyyy/subsets/cosine/top050.parquet \\
      --out results/demo/finetune-zzzz \\
      --params '{"method": "sft", "max_steps": 300}'

Multi-GPU (every rank trains; only the main process writes OUT):
  accelerate launch --config_file config/accelerate/deepspeed_zero3.yaml workflow/scripts/finetune.py \\
      --model ... --data ... --out ... --params ...

The package: `data` (TRL-format rows, the processor), `layout` (check_layout), `train` (finetune).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.data.lazy import read_meta, read_rows
from mmsae.data.schema import read_frame
from mmsae.errors import InputError
from mmsae.finetune.data import (
    build_dataset,
    load_processor,
    pair,
    special_prefix,
    text_completion_processor,
    trl_rows,
)
from mmsae.finetune.layout import check_layout
from mmsae.finetune.train import DEFAULT_LR, DROP_FILES, finetune, resolve_train_dtype
from mmsae.params import FinetuneParams
from mmsae.scoring import keep_top, read_subset

STAGE = "finetune"
MODEL_DIR = Files.MODEL_DIR  # the fine-tuned model's folder inside the artifact


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    model: str = cli.arg("model folder (or hub id) to start from")
    data: Path = cli.arg("parquet file in the mmsae record schema (the sample stage's samples.parquet)")
    ids: Path | None = cli.arg("a score subset (subsets/{method}/top{pct}.parquet: sample_id, best first): train on "
                               "those records of --data only, in that order; only their images are read",
                               default=None)
    keep_fraction: float | None = cli.arg("train on the best ceil(F * N) records of --data only, ranked by --keep-by",
                                          default=None, type=float)
    keep_by: str | None = cli.arg("'random:SEED' (a seeded random subset) or 'PATH:COLUMN' (a parquet with "
                                  "sample_id and a score, higher = kept first, e.g. baseline_scores' "
                                  "ifd.parquet:ifd_score)", default=None)


def read_data(inputs: Inputs) -> pd.DataFrame:
    """The records to train on, best first: --data whole, its --ids, or its best --keep-fraction by --keep-by.
    A subset is chosen on the columns without images (`read_meta`), then only its rows' images are read
    (`read_rows`): a kept subset of a 40K-sample pool never loads the others' images."""
    if (inputs.keep_fraction is None) != (inputs.keep_by is None):
        raise InputError("arguments", "--keep-fraction/--keep-by", "give both or neither")
    if inputs.ids is not None and inputs.keep_fraction is not None:
        raise InputError("arguments", "--ids", "--ids and --keep-fraction/--keep-by exclude each other")
    if inputs.ids is not None:
        return read_rows(inputs.data, read_subset(inputs.ids), inputs.ids)
    if inputs.keep_fraction is None:
        return read_frame(inputs.data)
    if not 0 < inputs.keep_fraction <= 1:
        raise InputError("arguments", "--keep-fraction", f"must be in (0, 1], got {inputs.keep_fraction}")
    kept = keep_top(read_meta(inputs.data), inputs.keep_fraction, inputs.keep_by)
    return read_rows(inputs.data, kept["sample_id"].tolist(), f"--keep-by {inputs.keep_by}")


def run(inputs: Inputs, params: FinetuneParams, out: Path) -> None:
    timer = Timer()
    with timer("read"):
        df = read_data(inputs)
    staging = out.parent / f".{out.name}.staging"  # the same path on every rank
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun: a worker rank
        finetune(inputs.model, df, None, params, staging, inputs.data)
        return
    with atomic_dir(out) as tmp:
        with timer("finetune"):
            metrics = finetune(inputs.model, df, tmp / MODEL_DIR, params, staging, inputs.data)
        write_json(tmp / Files.METRICS, metrics)
        df[["sample_id"]].astype(str).to_parquet(tmp / Files.TRAIN_IDS, index=False)
        counts = {"n_records": len(df), "steps": metrics["global_step"], "train_loss": metrics["train_loss"],
                  "processes": metrics["processes"], "layout_identical": metrics["layout_check"]["identical"]}
        manifest_inputs = {"model": inputs.model, "data": inputs.data}
        if inputs.ids is not None:
            manifest_inputs["ids"] = inputs.ids
        if inputs.keep_by:
            manifest_inputs["keep"] = f"{inputs.keep_fraction}:{inputs.keep_by}"
        write_manifest(tmp, STAGE, params.as_dict(), inputs=manifest_inputs, counts=counts,
                       timings={**timer.timings, **{f"finetune.{k}": v for k, v in metrics["timings_s"].items()}})


__all__ = [
    "DEFAULT_LR",
    "DROP_FILES",
    "MODEL_DIR",
    "STAGE",
    "Inputs",
    "build_dataset",
    "check_layout",
    "finetune",
    "load_processor",
    "pair",
    "read_data",
    "resolve_train_dtype",
    "run",
    "special_prefix",
    "text_completion_processor",
    "trl_rows",
]
