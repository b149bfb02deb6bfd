"""Model families behind one adapter interface, and `load_model` (local folder or hub id)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmsae.device import resolve_device
from mmsae.errors import InputError
from mmsae.models.adapters import (
    ADAPTERS,
    IMAGE,
    SPECIAL,
    TEXT,
    BatchMeta,
    CausalLMAdapter,
    ChameleonAdapter,
    LlavaAdapter,
    LlavaNextAdapter,
    ModelAdapter,
    Qwen2VLAdapter,
)
from mmsae.models.prompts import format_prompt, format_response

if TYPE_CHECKING:
    from mmsae.params import ModelParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("mmsae.models")


def cpu_dtype_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """One line when a half-precision model runs on a CPU without native units for it (oneDNN's own check):
    its matmuls then fall back to a scalar path, measured 260x slower than fp32 for bf16 (0.2 vs 53 GFLOP/s)
    and 37x for fp16 on an AVX-512 CPU without FP16 (2.2 vs 82). None on CUDA, in fp32, or with native units."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    try:
        native = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16
                  else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: no way to tell
        native = None
    if native:
        return None
    why = ("this CPU has no native " + name + " matmul units (oneDNN)" if native is False
           else "torch cannot tell whether this CPU has native " + name + " units")
    return (f"model.dtype {name} on the CPU: {why}, so its matmuls take a slow fallback (measured up to 260x slower "
            f"than float32); set model.dtype: float32 (or auto) for CPU runs")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError("--model-params", "model.dtype", f"unknown dtype {dtype!r}; one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def adapter_class(config, path: str = "<config>") -> type[ModelAdapter]:
    """The adapter for a loaded config, by `model_type`: multimodal families, or a text-only causal LM
    (llama / mistral / qwen2) for the transfer experiments; InputError naming the supported types."""
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise InputError(path, "model.path", f"unsupported model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    if cls is CausalLMAdapter and any(getattr(config, k, None) is not None for k in ("vision_config", "vq_config")):
        raise InputError(path, "model.path", f"model_type {model_type!r} with a vision tower is not a text-only LLM")
    return cls


def load_config(path: str | os.PathLike, trust_remote_code: bool = False) -> tuple[Any, type[ModelAdapter]]:
    """(transformers config, adapter class) of the model at `path`, without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(path, "model.path", f"cannot load a model config: {_first_line(exc)}") from exc
    return config, adapter_class(config, str(path))


def load_model(path: str | os.PathLike, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, allow_pickle_weights: bool = False) -> ModelAdapter:
    """Load model + processor (tokenizer for a text-only LLM) from a local folder or hub id and wrap
    them in the family's adapter. Weights load from safetensors only unless `allow_pickle_weights`:
    unpickling a pytorch_model.bin runs whatever code the file carries."""
    import transformers

    path = str(path)
    config, cls = load_config(path, trust_remote_code)
    dev = resolve_device(device, "--model-params", "model.device")
    torch_dtype = resolve_dtype(dtype, dev)
    slow = cpu_dtype_warning(torch_dtype, dev)
    if slow:
        log.warning("%s", slow)
    auto_model = getattr(transformers, cls.auto_model)
    try:
        model = auto_model.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                           use_safetensors=None if allow_pickle_weights else True)
    except OSError as exc:  # config present, weights missing or unreadable
        if not allow_pickle_weights and _has_pickle_weights(path):
            raise InputError(path, "model.allow_pickle_weights", "the weights are pickle files (.bin/.pt), which can "
                             "run code when loaded; convert them to safetensors, or set model.allow_pickle_weights: "
                             "true for a folder you trust") from exc
        raise InputError(path, "model.path", f"cannot load the model weights: {_first_line(exc)}") from exc
    model = model.to(dev).eval()
    processor = cls.load_processor(path, trust_remote_code=trust_remote_code)
    return cls(model, processor, path)


def load_model_with(path: str | os.PathLike, params: ModelParams) -> ModelAdapter:
    """The model of a stage's --model option, loaded as its 'model' config slice says."""
    return load_model(path, dtype=params.dtype, device=params.device, trust_remote_code=params.trust_remote_code,
                      allow_pickle_weights=params.allow_pickle_weights)


def _has_pickle_weights(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and any(any(folder.glob(f"*.{ext}")) for ext in ("bin", "pt", "pth"))


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The model's tokenizer alone (no remote code), which turns token ids back into text."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InputError(model_dir, "tokenizer", f"cannot load a tokenizer ({exc.__class__.__name__})") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__


__all__ = [
    "ADAPTERS",
    "IMAGE",
    "SPECIAL",
    "TEXT",
    "BatchMeta",
    "CausalLMAdapter",
    "ChameleonAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "adapter_class",
    "format_prompt",
    "format_response",
    "load_model",
    "load_model_with",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]
