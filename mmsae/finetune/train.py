"""Training: TRL's SFTTrainer / DPOTrainer on the TRL-format data set, seeded, on one process or under a
multi-process launcher, and the result saved as a plain model folder (LoRA merged)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsae.errors import InputError
from mmsae.finetune.data import build_dataset, load_processor, text_completion_processor
from mmsae.finetune.layout import check_layout
from mmsae.params import FinetuneParams

log = logging.getLogger("mmsae.finetune")

DEFAULT_LR = {"sft": 3e-4, "dpo": 3e-5}  # finetune.lr: null
DROP_FILES = ("training_args.bin",)  # a pickle written by Trainer.save_model: not part of the artifact


def resolve_train_dtype(dtype: str, device_type: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _peft_config(params: FinetuneParams):
    from peft import LoraConfig

    target = params.lora_target_modules
    return LoraConfig(r=int(params.lora_r), lora_alpha=float(params.lora_alpha),
                      lora_dropout=float(params.lora_dropout), target_modules=target, bias="none",
                      task_type="CAUSAL_LM")


def _trainer_args(params: FinetuneParams, output_dir: Path, per_device: int, dtype: torch.dtype):
    from trl import DPOConfig, SFTConfig

    common = dict(
        output_dir=str(output_dir), max_steps=int(params.max_steps), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=int(params.grad_accum), learning_rate=float(params.lr),
        lr_scheduler_type=params.lr_scheduler, warmup_steps=int(params.warmup_steps),
        weight_decay=float(params.weight_decay), max_grad_norm=float(params.max_grad_norm),
        seed=int(params.seed), data_seed=int(params.seed), logging_steps=int(params.logging_steps),
        save_strategy="no", report_to="none", max_length=params.max_length,
        activation_checkpointing=bool(params.gradient_checkpointing), bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=not params.progress,
        model_init_kwargs={"dtype": dtype, "device_map": None, "trust_remote_code": bool(params.trust_remote_code),
                           "use_safetensors": True},
    )
    if params.method == "sft":
        return SFTConfig(completion_only_loss=True, **common)
    losses, weights = [params.dpo_loss], [1.0]
    if params.dpo_sft_weight > 0:  # RPO: + weight x NLL of the chosen response
        losses.append("sft")
        weights.append(float(params.dpo_sft_weight))
    return DPOConfig(beta=float(params.beta), loss_type=losses, loss_weights=weights, **common)


def finetune(model_path: str | os.PathLike, df: pd.DataFrame, model_dir: str | os.PathLike | None,
             params: FinetuneParams, staging: str | os.PathLike,
             data_path: str | os.PathLike = "<data>") -> dict[str, Any]:
    """Fine-tune `model_path` on the records of `df`; the main process writes the result to `model_dir`
    (weights with LoRA merged, safetensors, + processor); every rank returns the metrics.

    `params` is the `finetune` config slice. `staging` is a folder path every rank agrees on (the
    trainer's output and the gathered weights; removed at the end).
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
              params: FinetuneParams, staging: Path, data_path: str | os.PathLike) -> dict[str, Any]:
    method = params.method
    if params.lr is None:
        params = params.replace(lr=DEFAULT_LR[method])
    model_path = str(model_path)
    t0 = time.perf_counter()
    if params.num_threads:
        torch.set_num_threads(int(params.num_threads))

    config, cls, processor = _multimodal_model(model_path, params)
    world, accum, batch, per_device = _batch_split(params)
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    dtype = resolve_train_dtype(params.dtype, "cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    dataset = build_dataset(df, processor, method, data_path)
    args, state = _distributed_args(params, staging, per_device, dtype, world)
    peft_config = _peft_config(params) if params.lora else None

    t = time.perf_counter()
    trainer = _trainer(method, model_path, args, dataset, processor, peft_config)
    timings = {"setup": time.perf_counter() - t}
    model = trainer.model.get_base_model() if params.lora else trainer.model
    if params.freeze_vision_tower:
        frozen = _freeze_vision_tower(model)
        log.info("finetune: vision tower frozen (%d parameters)", frozen)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    layout = _layout_check(model, processor, df, params, model_path)

    log.info("finetune: %s on %d records, %d steps x %d samples (%d per device, %d processes, accumulation %d), "
             "%s, lr %g, %d trainable parameters%s", method, len(df), params.max_steps, batch, per_device,
             world, accum, str(dtype).removeprefix("torch."), params.lr, n_trainable,
             ", LoRA" if params.lora else "")
    t = time.perf_counter()
    result = trainer.train()
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    trainer.save_model(str(staging / "saved"))  # every rank: gathers ZeRO-3 / FSDP shards
    metrics: dict[str, Any] = {
        "method": method, "n_records": len(df), "max_steps": int(params.max_steps),
        "global_step": int(trainer.state.global_step), "batch_size": batch, "per_device_batch_size": per_device,
        "processes": world, "dtype": str(dtype).removeprefix("torch."), "lora": bool(params.lora),
        "lr": float(params.lr), "trainable_parameters": int(n_trainable), "train_loss": float(result.training_loss),
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


def _multimodal_model(model_path: str, params: FinetuneParams) -> tuple[Any, type, Any]:
    """(config, adapter class, processor in text-completion mode) of a multimodal `model_path`."""
    from transformers import AutoConfig

    from mmsae.models import adapter_class

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=params.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(model_path, "model", f"cannot load a model config: {exc}") from exc
    cls = adapter_class(config, model_path)
    if cls.auto_model != "AutoModelForImageTextToText":
        raise InputError(model_path, "model", f"fine-tuning needs a multimodal model; {config.model_type!r} is text-only")
    processor = text_completion_processor(load_processor(cls, model_path, params.trust_remote_code), cls)
    return config, cls, processor


def _batch_split(params: FinetuneParams) -> tuple[int, int, int, int]:
    """(processes, accumulation steps, global batch, per-device batch): the global batch over the
    launcher's world size (accelerate launch / torchrun set WORLD_SIZE) and the accumulation steps."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum, batch = int(params.grad_accum), int(params.batch_size)
    if batch % (world * accum):
        raise InputError("finetune params", "finetune.batch_size",
                         f"{batch} is not divisible by {world} processes x {accum} accumulation steps")
    return world, accum, batch, batch // (world * accum)


def _distributed_args(params: FinetuneParams, staging: Path, per_device: int, dtype: torch.dtype,
                      world: int) -> tuple[Any, Any]:
    """(trainer arguments, accelerate's PartialState), with a fresh staging folder on every rank.

    The trainer's arguments initialise the distributed state, so PartialState is read only after they exist.
    """
    from accelerate import PartialState

    args = _trainer_args(params, staging / "trainer", per_device, dtype)
    _ = args.device  # sets up the distributed state (gloo / nccl / DeepSpeed) as the trainer will use it
    state = PartialState()
    if state.num_processes != world:
        raise RuntimeError(f"launcher says {world} processes, accelerate sees {state.num_processes}")
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by a killed run
    state.wait_for_everyone()
    return args, state


def _trainer(method: str, model_path: str, args: Any, dataset: Any, processor: Any, peft_config: Any) -> Any:
    from trl import DPOTrainer, SFTTrainer

    trainer_cls = SFTTrainer if method == "sft" else DPOTrainer
    return trainer_cls(model=model_path, args=args, train_dataset=dataset, processing_class=processor,
                       peft_config=peft_config)


def _layout_check(model: Any, processor: Any, df: pd.DataFrame, params: FinetuneParams,
                  model_path: str) -> dict[str, Any]:
    """check_layout on the first layout_check_samples records; a mismatch stops the run (or warns)."""
    layout: dict[str, Any] = {"checked": 0, "identical": None}
    if params.layout_check_samples > 0:
        layout = check_layout(model, processor, df, params.method, int(params.layout_check_samples), model_path)
        if not layout["identical"]:
            msg = (f"TRL's token layout differs from the pipeline's prompt format on {len(layout['mismatches'])}+ "
                   f"samples (first: {layout['mismatches'][0]['sample_id']!r}); the fine-tuned model would be "
                   "trained on a different layout than it is evaluated on")
            if params.layout_check == "error":
                raise InputError(model_path, "finetune.layout_check", msg + "; set layout_check: warn to go on")
            log.warning("finetune: %s", msg)
        else:
            log.info("finetune: TRL layout identical to build_batch on %d rows", layout["checked"])
    return layout


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


def _write_model(saved: Path, target: Path, model_path: str, cls: type, params: FinetuneParams,
                 dtype: torch.dtype) -> None:
    """The trained weights as a plain model folder: LoRA merged in, a fresh copy of the processor."""
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    if params.lora:
        from peft import PeftModel

        auto = getattr(transformers, cls.auto_model)
        base = auto.from_pretrained(model_path, dtype=dtype, trust_remote_code=params.trust_remote_code,
                                    use_safetensors=True)
        merged = PeftModel.from_pretrained(base, str(saved)).merge_and_unload()
        merged.save_pretrained(target)
    else:
        shutil.copytree(saved, target, ignore=shutil.ignore_patterns(*DROP_FILES, "README.md"))
    # the processor as it was loaded (the copy TRL used had its padding side / class adjusted)
    load_processor(cls, model_path, params.trust_remote_code).save_pretrained(target)
