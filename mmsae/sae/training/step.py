"""One optimisation step of SAE training and what it depends on: the learning-rate and L1 schedules and
the numeric mode (train_sae.precision) of the SAE forward."""

from __future__ import annotations

import contextlib

import torch

from mmsae.errors import InputError
from mmsae.params import TrainSaeParams
from mmsae.sae.model import SAE

PRECISIONS = ("bf16", "tf32", "fp32")


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The SAE forward's numeric mode (config train_sae.precision), on CUDA only; CPU runs stay fp32.

    bf16: autocast to bfloat16 (matmuls in bf16, reductions and the weights / Adam state in fp32) plus
    TF32 for the fp32 matmuls that remain; tf32: fp32 with TF32 matmuls; fp32: strict fp32 (the paper)."""
    if precision not in PRECISIONS:
        raise InputError("--params", "precision", f"unknown precision {precision!r} (have {list(PRECISIONS)})")
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, params: TrainSaeParams) -> float:
    """Linear warm-up over lr_warmup_steps, constant, linear decay to 0 over the last lr_decay_steps."""
    f = 1.0
    if params.lr_warmup_steps > 0:
        f = min(f, (step + 1) / params.lr_warmup_steps)
    if params.lr_decay_steps > 0:
        f = min(f, (params.steps - step) / params.lr_decay_steps)
    return params.lr * max(f, 0.0)


def l1_at(step: int, params: TrainSaeParams, key: str = "l1_coefficient") -> float:
    """The sparsity coefficient `key` (relu: l1_coefficient, jumprelu: l0_coefficient), linearly warmed up
    over l1_warmup_steps."""
    value = float(getattr(params, key))
    if params.l1_warmup_steps > 0:
        return value * min(1.0, (step + 1) / params.l1_warmup_steps)
    return value


def optimizer_step(sae: SAE, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One update: backward, the SAE's gradient hook, clipping to grad_clip, the step, the weight hook."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.before_optimizer_step()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    sae.after_optimizer_step()
