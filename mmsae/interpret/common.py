"""What the steer and attribute command lines share: the model / SAE / prompt arguments, the records they
select (samples.parquet rows or one image + question), and loading the model with its SAE."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmsae.artifacts import Files
from mmsae.data.schema import Record, decode_image, read_frame, records_from_frame
from mmsae.errors import InputError
from mmsae.models.adapters import ModelAdapter
from mmsae.sae.model import SAE


def select_records(samples: str | os.PathLike, sample_ids: Sequence[str] | None = None, task: str | None = None,
                   n: int | None = None, clean_only: bool = True) -> list[Record]:
    """Records of {samples}/samples.parquet: the given ids (in that order), else the first `n` (null = all)
    in file order, of task `task` (column `task`; null = any) and not corrupted (when `corruption` exists)."""
    path = Path(samples) / Files.SAMPLES
    df = read_frame(path, check_images=False)
    if sample_ids:
        missing = [s for s in sample_ids if s not in set(df["sample_id"])]
        if missing:
            raise InputError(path, "sample_id", f"no sample {missing[0]!r}")
        df = df.set_index("sample_id", drop=False).loc[list(sample_ids)].reset_index(drop=True)
    else:
        if task is not None:
            if "task" not in df.columns:
                raise InputError(path, "task", f"no task column to select task {task!r}")
            df = df[df["task"] == task]
        if clean_only and "corruption" in df.columns:
            df = df[df["corruption"].isna()]
        if n is not None:
            df = df.iloc[:n]
    if len(df) == 0:
        raise InputError(path, "sample_id", f"no sample selected (task={task!r})")
    return records_from_frame(df.reset_index(drop=True), path)


def image_record(image: str | os.PathLike, question: str) -> Record:
    """A record for an image file and a question (no responses)."""
    path = Path(image)
    if not path.exists():
        raise InputError(path, "image", "file does not exist")
    return Record(path.stem, question, decode_image(path.read_bytes(), path, path.stem), [], -1)


def add_prompt_args(argp, what: str) -> None:
    """The arguments steer and attribute share: model, SAE and which prompts."""
    argp.add_argument("--model", required=True, help="model folder or hub id")
    argp.add_argument("--model-params", default="{}", help="the 'model' config slice: dtype, device, trust_remote_code")
    argp.add_argument("--sae", required=True, help="SAE folder (SAELens layout) or train_sae artifact folder")
    argp.add_argument("--samples", help="sample artifact folder (samples.parquet)")
    argp.add_argument("--sample-id", action="append", default=[], help=f"a sample to {what} (repeatable)")
    argp.add_argument("--image", help="an image file (with --question) instead of --samples")


def prompt_records(args, params: dict[str, Any]) -> list[Record]:
    """--image + --question, or the --sample-id / config-selected records of --samples."""
    if args.image:
        if not args.question:
            raise InputError("--question", "question", "--image needs --question")
        return [image_record(args.image, args.question)]
    if args.samples:
        return select_records(args.samples, args.sample_id or params["sample_ids"], params["task"], params["n_samples"])
    raise InputError("--samples", "samples", "give --samples or --image")


def load_model_and_sae(args, timer) -> tuple[ModelAdapter, SAE]:
    """The adapter of --model (with --model-params) and the SAE of --sae on the model's device."""
    from mmsae.config import stage_params
    from mmsae.models import load_model
    from mmsae.sae.io import load_sae

    model_params = stage_params("model", args.model_params, source="--model-params")
    with timer("load"):
        sae = load_sae(args.sae)
        adapter = load_model(args.model, dtype=model_params["dtype"], device=model_params["device"],
                             trust_remote_code=model_params["trust_remote_code"])
    return adapter, sae.to(adapter.device)
