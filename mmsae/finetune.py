"""Fine-tune a multimodal model on a record-schema data set with TRL: SFT or DPO, optionally LoRA.

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
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsae.data.schema import Record, records_from_frame
from mmsae.errors import InputError
from mmsae.models.prompts import format_prompt, format_response

log = logging.getLogger("mmsae.finetune")

MODEL_DIR = "model"
DEFAULT_LR = {"sft": 3e-4, "dpo": 3e-5}  # finetune.lr: null
DROP_FILES = ("training_args.bin",)  # a pickle written by Trainer.save_model: not part of the artifact


# --------------------------------------------------------------------------------------------------
# data in TRL's vision format


def special_prefix(tokenizer: Any, text: str) -> str:
    """The special tokens the tokenizer adds in front of `text` by itself (e.g. BOS), as text.

    TRL tokenises with `add_special_tokens=False`; our stages tokenise with the default (True). Writing
    these tokens into the prompt gives the same ids both ways. Empty when the chat template already
    wrote them (the toy model) or the tokenizer adds none (Qwen2-VL).
    """
    with_special = tokenizer(text)["input_ids"]
    without = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    if n <= 0 or with_special[n:] != without:
        return ""  # nothing added in front (suffix-only additions are not used by our formats)
    return "".join(tokenizer.convert_ids_to_tokens(with_special[:n]))


def pair(record: Record, method: str, path: str | os.PathLike = "<data>") -> tuple[str, str | None]:
    """(chosen, rejected) responses of one record; InputError when it has too few responses."""
    if not record.responses:
        raise InputError(path, "responses", f"sample {record.sample_id!r}: no responses to fine-tune on")
    chosen = record.responses[record.preferred]
    if method == "sft":
        return chosen, None
    others = [r for i, r in enumerate(record.responses) if i != record.preferred]
    if not others:
        raise InputError(path, "responses", f"sample {record.sample_id!r}: DPO needs a second (rejected) response")
    return chosen, others[0]


def trl_rows(records: Sequence[Record], processor: Any, method: str,
             path: str | os.PathLike = "<data>") -> list[dict[str, Any]]:
    """TRL vision-format rows (without images) for `records`: prompt + completion or chosen/rejected."""
    tokenizer = getattr(processor, "tokenizer", processor)
    cache: dict[tuple[str, bool], str] = {}
    rows = []
    for r in records:
        key = (r.question, r.image is not None)
        if key not in cache:
            p = format_prompt(processor, r.question, has_image=key[1])
            cache[key] = special_prefix(tokenizer, p) + p
        chosen, rejected = pair(r, method, path)
        if method == "sft":
            rows.append({"prompt": cache[key], "completion": format_response(processor, chosen)})
        else:
            rows.append({"prompt": cache[key], "chosen": format_response(processor, chosen),
                         "rejected": format_response(processor, rejected)})
    return rows


def build_dataset(df: pd.DataFrame, processor: Any, method: str, path: str | os.PathLike = "<data>"):
    """A `datasets.Dataset` in TRL's vision format; images stay encoded and decode to RGB on access."""
    from datasets import Dataset, Features, Image, Sequence, Value

    records = _text_records(df)
    rows = trl_rows(records, processor, method, path)
    columns: dict[str, list[Any]] = {k: [row[k] for row in rows] for k in rows[0]}
    columns["images"] = [[{"bytes": bytes(b), "path": None}] for b in df["image"]]
    text = {k: Value("string") for k in rows[0]}
    features = Features({"images": Sequence(Image(mode="RGB")), **text})
    return Dataset.from_dict(columns, features=features)


def _text_records(df: pd.DataFrame) -> list[Record]:
    """Records without decoded images (the dataset decodes them lazily); `image` is a truthy stub."""
    out = []
    for sid, q, responses, pref in zip(df["sample_id"], df["question"], df["responses"], df["preferred"], strict=True):
        responses = [] if responses is None else list(responses)
        out.append(Record(str(sid), q, True, responses, int(pref) if responses else -1))  # type: ignore[arg-type]
    return out


def load_processor(adapter_cls: type, path: str, trust_remote_code: bool = False) -> Any:
    """The family's processor, with the chat template restored where the processor dropped it on load
    (ChameleonProcessor in transformers 5.23; the tokenizer read the same file), as ModelAdapter does."""
    processor = adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if processor is not tokenizer and getattr(processor, "chat_template", None) is None:
        processor.chat_template = getattr(tokenizer, "chat_template", None)
    return processor


def text_completion_processor(processor: Any, adapter_cls: type) -> Any:
    """The processor, made to pass the adapter's extra processor kwargs on every call (Chameleon:
    `return_for_text_completion=True`, i.e. no separator token), so TRL tokenises as our stages do."""
    extra = adapter_cls.processor_kwargs(None)  # a constant per family
    if not extra:
        return processor
    base = type(processor)

    def __call__(self, *args, **kwargs):  # noqa: N807
        return base.__call__(self, *args, **{**extra, **kwargs})

    processor.__class__ = type(base.__name__, (base,), {"__call__": __call__})
    return processor


# --------------------------------------------------------------------------------------------------
# layout check: TRL's collated batch vs ModelAdapter.build_batch


def check_layout(model: Any, processor: Any, df: pd.DataFrame, method: str, n: int,
                 path: str = "<model>") -> dict[str, Any]:
    """Collate the first `n` records with TRL's vision collator and compare with our build_batch.

    Compares, per row, the input ids (image tokens by position; for Chameleon the placeholders, before
    any VQ codes are written) and the loss positions (TRL's labels / completion_mask vs
    `BatchMeta.is_response`). Returns {"checked", "identical", "mismatches": [...]}.
    """
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from mmsae.models import adapter_class
    from mmsae.models.adapters import ModelAdapter

    sub = df.iloc[:n].reset_index(drop=True)
    records = records_from_frame(sub)
    ds = build_dataset(sub, processor, method)
    examples = [dict(ds[i]) for i in range(len(ds))]
    if method == "sft":
        batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)(examples)
        loss_mask = batch["labels"] != -100
        variants = [records]
    else:
        batch = DataCollatorForVisionPreference(processor=processor)(examples)
        loss_mask = batch["completion_mask"].bool()
        rejected = []
        for r in records:
            j = next(i for i in range(len(r.responses)) if i != r.preferred)
            rejected.append(Record(r.sample_id, r.question, r.image, r.responses, j, r.extras))
        variants = [records, rejected]  # TRL: chosen rows first, then rejected rows
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()

    cls = adapter_class(model.config, path)
    tokenizer = getattr(processor, "tokenizer", processor)
    padding_side = tokenizer.padding_side
    adapter = cls(model, processor, path)
    tokenizer.padding_side = padding_side  # the adapter sets right padding; leave the processor as it was
    mismatches: list[dict[str, Any]] = []
    row = 0
    for variant in variants:
        # the base build_batch: tokens only, no model forward (Chameleon's VQ step is not run)
        inputs, meta = ModelAdapter.build_batch(adapter, variant, include_response=True)
        ours = inputs["input_ids"].cpu()
        for b, rec in enumerate(variant):
            ours_ids = ours[b][torch.from_numpy(meta.attention_mask[b])].tolist()
            ours_resp = meta.is_response[b][meta.attention_mask[b]].tolist()
            trl_ids = ids[row][attn[row]].tolist()
            trl_resp = loss_mask[row][attn[row]].tolist()
            if ours_ids != trl_ids or ours_resp != trl_resp:
                mismatches.append({"sample_id": rec.sample_id, "row": row, "ours": ours_ids, "trl": trl_ids,
                                   "ours_loss_positions": [i for i, x in enumerate(ours_resp) if x],
                                   "trl_loss_positions": [i for i, x in enumerate(trl_resp) if x]})
            row += 1
    return {"checked": row, "identical": not mismatches, "mismatches": mismatches[:3]}


# --------------------------------------------------------------------------------------------------
# training


def resolve_train_dtype(dtype: str, device_type: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _peft_config(params: dict[str, Any]):
    from peft import LoraConfig

    target = params["lora_target_modules"]
    return LoraConfig(r=int(params["lora_r"]), lora_alpha=float(params["lora_alpha"]),
                      lora_dropout=float(params["lora_dropout"]), target_modules=target, bias="none",
                      task_type="CAUSAL_LM")


def _trainer_args(params: dict[str, Any], output_dir: Path, per_device: int, dtype: torch.dtype):
    from trl import DPOConfig, SFTConfig

    common = dict(
        output_dir=str(output_dir), max_steps=int(params["max_steps"]), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=int(params["grad_accum"]), learning_rate=float(params["lr"]),
        lr_scheduler_type=params["lr_scheduler"], warmup_steps=int(params["warmup_steps"]),
        weight_decay=float(params["weight_decay"]), max_grad_norm=float(params["max_grad_norm"]),
        seed=int(params["seed"]), data_seed=int(params["seed"]), logging_steps=int(params["logging_steps"]),
        save_strategy="no", report_to="none", max_length=params["max_length"],
        activation_checkpointing=bool(params["gradient_checkpointing"]), bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=not params["progress"],
        model_init_kwargs={"dtype": dtype, "device_map": None, "trust_remote_code": bool(params["trust_remote_code"])},
    )
    if params["method"] == "sft":
        return SFTConfig(completion_only_loss=True, **common)
    losses, weights = [params["dpo_loss"]], [1.0]
    if params["dpo_sft_weight"] > 0:  # RPO: + weight x NLL of the chosen response
        losses.append("sft")
        weights.append(float(params["dpo_sft_weight"]))
    return DPOConfig(beta=float(params["beta"]), loss_type=losses, loss_weights=weights, **common)


def finetune(model_path: str | os.PathLike, df: pd.DataFrame, model_dir: str | os.PathLike | None,
             params: dict[str, Any], staging: str | os.PathLike, data_path: str | os.PathLike = "<data>") -> dict[str, Any]:
    """Fine-tune `model_path` on the records of `df`; the main process writes the result to `model_dir`
    (weights with LoRA merged, safetensors, + processor); every rank returns the metrics.

    `params` is the `finetune` config slice (defaults from config/schema.yaml). `staging` is a folder
    path every rank agrees on (the trainer's output and the gathered weights; removed at the end).
    """
    threads = torch.get_num_threads()
    try:
        return _finetune(model_path, df, model_dir, params, Path(staging), data_path)
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)


def _finetune(model_path: str | os.PathLike, df: pd.DataFrame, model_dir: str | os.PathLike | None,
              params: dict[str, Any], staging: Path, data_path: str | os.PathLike) -> dict[str, Any]:
    from accelerate import PartialState
    from transformers import AutoConfig

    from mmsae.config import stage_params
    from mmsae.models import adapter_class

    params = stage_params("finetune", dict(params), source="finetune params")
    method = params["method"]
    if params["lr"] is None:
        params["lr"] = DEFAULT_LR[method]
    model_path = str(model_path)
    t0 = time.perf_counter()
    if params["num_threads"]:
        torch.set_num_threads(int(params["num_threads"]))

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=params["trust_remote_code"])
    except (OSError, ValueError) as exc:
        raise InputError(model_path, "model", f"cannot load a model config: {exc}") from exc
    cls = adapter_class(config, model_path)
    if cls.auto_model != "AutoModelForImageTextToText":
        raise InputError(model_path, "model", f"fine-tuning needs a multimodal model; {config.model_type!r} is text-only")
    processor = text_completion_processor(load_processor(cls, model_path, params["trust_remote_code"]), cls)

    # the launcher's world size (accelerate launch / torchrun set WORLD_SIZE); the trainer's arguments
    # initialise the distributed state, so PartialState is read only after they exist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum, batch = int(params["grad_accum"]), int(params["batch_size"])
    if batch % (world * accum):
        raise InputError("finetune params", "finetune.batch_size",
                         f"{batch} is not divisible by {world} processes x {accum} accumulation steps")
    per_device = batch // (world * accum)
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    dtype = resolve_train_dtype(params["dtype"], "cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    dataset = build_dataset(df, processor, method, data_path)
    args = _trainer_args(params, staging / "trainer", per_device, dtype)
    _ = args.device  # sets up the distributed state (gloo / nccl / DeepSpeed) as the trainer will use it
    state = PartialState()
    if state.num_processes != world:
        raise RuntimeError(f"launcher says {world} processes, accelerate sees {state.num_processes}")
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by a killed run
    state.wait_for_everyone()
    peft_config = _peft_config(params) if params["lora"] else None

    from trl import DPOTrainer, SFTTrainer

    t = time.perf_counter()
    if method == "sft":
        trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=processor,
                             peft_config=peft_config)
    else:
        trainer = DPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=processor,
                             peft_config=peft_config)
    timings = {"setup": time.perf_counter() - t}
    model = trainer.model.get_base_model() if params["lora"] else trainer.model
    if params["freeze_vision_tower"]:
        frozen = _freeze_vision_tower(model)
        log.info("finetune: vision tower frozen (%d parameters)", frozen)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    layout: dict[str, Any] = {"checked": 0, "identical": None}
    if params["layout_check_samples"] > 0:
        layout = check_layout(model, processor, df, method, int(params["layout_check_samples"]), model_path)
        if not layout["identical"]:
            msg = (f"TRL's token layout differs from the pipeline's prompt format on {len(layout['mismatches'])}+ "
                   f"samples (first: {layout['mismatches'][0]['sample_id']!r}); the fine-tuned model would be "
                   "trained on a different layout than it is evaluated on")
            if params["layout_check"] == "error":
                raise InputError(model_path, "finetune.layout_check", msg + "; set layout_check: warn to go on")
            log.warning("finetune: %s", msg)
        else:
            log.info("finetune: TRL layout identical to build_batch on %d rows", layout["checked"])

    log.info("finetune: %s on %d records, %d steps x %d samples (%d per device, %d processes, accumulation %d), "
             "%s, lr %g, %d trainable parameters%s", method, len(df), params["max_steps"], batch, per_device,
             world, accum, str(dtype).removeprefix("torch."), params["lr"], n_trainable,
             ", LoRA" if params["lora"] else "")
    t = time.perf_counter()
    result = trainer.train()
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    trainer.save_model(str(staging / "saved"))  # every rank: gathers ZeRO-3 / FSDP shards
    metrics: dict[str, Any] = {
        "method": method, "n_records": len(df), "max_steps": int(params["max_steps"]),
        "global_step": int(trainer.state.global_step), "batch_size": batch, "per_device_batch_size": per_device,
        "processes": world, "dtype": str(dtype).removeprefix("torch."), "lora": bool(params["lora"]),
        "lr": float(params["lr"]), "trainable_parameters": int(n_trainable), "train_loss": float(result.training_loss),
        "final": _final_logs(trainer.state.log_history), "log_history": trainer.state.log_history,
        "layout_check": layout, "model_type": config.model_type,
    }
    if state.is_main_process:
        if model_dir is not None:
            _write_model(staging / "saved", Path(model_dir), model_path, cls, params, dtype)
        shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    timings["save"] = time.perf_counter() - t
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["wall_s"] = round(time.perf_counter() - t0, 2)
    log.info("finetune: %d steps in %.1f s, train loss %.4f", metrics["global_step"], timings["train"],
             metrics["train_loss"])
    return metrics


def _freeze_vision_tower(model: Any) -> int:
    inner = getattr(model, "model", model)
    tower = next((getattr(inner, name) for name in ("vision_tower", "visual", "vqmodel") if hasattr(inner, name)), None)
    if tower is None:
        raise InputError(getattr(model, "name_or_path", "<model>"), "finetune.freeze_vision_tower",
                         "no vision tower found (looked for vision_tower, visual, vqmodel)")
    n = 0
    for p in tower.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def _final_logs(history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each logged training metric over the last 20% of the logging steps (at least one)."""
    logs = [h for h in history if "loss" in h]
    if not logs:
        return {}
    tail = logs[-max(1, math.ceil(0.2 * len(logs))):]
    keys = sorted({k for h in tail for k, v in h.items() if isinstance(v, int | float)} - {"epoch", "step"})
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys}


def _write_model(saved: Path, target: Path, model_path: str, cls: type, params: dict[str, Any],
                 dtype: torch.dtype) -> None:
    """The trained weights as a plain model folder: LoRA merged in, a fresh copy of the processor."""
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    if params["lora"]:
        from peft import PeftModel

        auto = getattr(transformers, cls.auto_model)
        base = auto.from_pretrained(model_path, dtype=dtype, trust_remote_code=params["trust_remote_code"])
        merged = PeftModel.from_pretrained(base, str(saved)).merge_and_unload()
        merged.save_pretrained(target)
    else:
        shutil.copytree(saved, target, ignore=shutil.ignore_patterns(*DROP_FILES, "README.md"))
    # the processor as it was loaded (the copy TRL used had its padding side / class adjusted)
    load_processor(cls, model_path, params["trust_remote_code"]).save_pretrained(target)
