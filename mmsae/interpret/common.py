"""What the steer and attribute stages share: the model / SAE / prompt inputs, the records they select
(samples.parquet rows or one image + question), and loading the model with its SAE."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from mmsae import cli
from mmsae.artifacts import Files
from mmsae.data.schema import Record, decode_image, read_frame, records_from_frame
from mmsae.errors import InputError
from mmsae.models.adapters import ModelAdapter
from mmsae.params import ModelParams
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptInputs:
    """The inputs steer and attribute share: model, SAE and which prompts (a base of their Inputs)."""

    model: str = cli.arg("model folder or hub id")
    model_params: ModelParams = cli.arg("the 'model' config slice: dtype, device, trust_remote_code (JSON)",
                                        default_factory=lambda: ModelParams.load({}))
    sae: Path = cli.arg("SAE folder (SAELens layout) or train_sae artifact folder")
    samples: Path | None = cli.arg("sample artifact folder (samples.parquet)", default=None)
    sample_id: tuple[str, ...] = cli.arg("a sample to use (repeatable)", default=(), action="append")
    image: Path | None = cli.arg("an image file (with --question) instead of --samples", default=None)
    question: str | None = cli.arg("question for --image (steer: also in place of the samples' own questions)",
                                   default=None)


def prompt_records(inputs: PromptInputs, sample_ids: Sequence[str] | None, task: str | None,
                   n_samples: int | None) -> list[Record]:
    """--image + --question, or the --sample-id (else config-selected: sample_ids, task, n_samples) records
    of --samples."""
    if inputs.image:
        if not inputs.question:
            raise InputError("--question", "question", "--image needs --question")
        return [image_record(inputs.image, inputs.question)]
    if inputs.samples:
        return select_records(inputs.samples, list(inputs.sample_id) or sample_ids, task, n_samples)
    raise InputError("--samples", "samples", "give --samples or --image")


def load_model_and_sae(inputs: PromptInputs, timer) -> tuple[ModelAdapter, SAE]:
    """The adapter of --model (with --model-params) and the SAE of --sae on the model's device."""
    from mmsae.models import load_model_with
    from mmsae.sae.io import load_sae

    with timer("load"):
        sae = load_sae(inputs.sae)
        adapter = load_model_with(inputs.model, inputs.model_params)
    return adapter, sae.to(adapter.device)
