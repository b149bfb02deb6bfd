"""`jumprelu` (SAELens "jumprelu"): Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders", as SAELens 6.54.12 trains it (JumpReLUTrainingSAE)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mmsae.sae.model.base import SAE, LossOutput, SAEConfig, register_architecture

if TYPE_CHECKING:
    from mmsae.params import TrainSaeParams

SPARSITY_LOSS_MODES = ("step", "tanh")


def rectangle(x: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel 1{-1/2 < x < 1/2}."""
    return ((x > -0.5) & (x < 0.5)).to(x)


class JumpReLUFn(torch.autograd.Function):
    """f = pre * 1{pre > threshold}. Backward: d/dpre = 1{pre > threshold} (exact away from the jump);
    d/dthreshold = -(threshold / bandwidth) K((pre - threshold) / bandwidth) summed over tokens, K the
    rectangle kernel: the straight-through pseudo-derivative of the jump (SAELens JumpReLU, ste_to_input
    false: DeepMind's estimator, the encoder gets no gradient from the jump)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (threshold / bw) * rectangle((pre - threshold) / bw) * g
        return (pre > threshold) * g, -ste.reshape(-1, ste.shape[-1]).sum(0), None


class StepFn(torch.autograd.Function):
    """H(pre - threshold) (the L0 of a latent). Backward: pre gets nothing; threshold gets
    -(1 / bandwidth) K((pre - threshold) / bandwidth) summed over tokens (SAELens Step)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (1.0 / bw) * rectangle((pre - threshold) / bw) * g
        return None, -ste.reshape(-1, ste.shape[-1]).sum(0), None


@register_architecture("jumprelu")
class JumpReLUSAE(SAE):
    """JumpReLU SAE: f_i = pre_i * 1{pre_i > threshold_i}, pre = (x_in [- b_dec]) W_enc + b_enc, with a
    trained threshold per latent (SAELens 6: the threshold itself is the parameter, kept >= 0 by a
    projection after every step, not exp(log_threshold): Adam moves a log-threshold too little, SAELens
    issue #494). A threshold >= 0 makes this ReLU(pre) * 1{pre > threshold}, SAELens' inference JumpReLUSAE.

    Loss: mse + l0_coefficient * sparsity, with sparsity = mean_t sum_i H(pre_ti - threshold_i) ("step",
    DeepMind's L0; the threshold's gradient through StepFn) or mean_t sum_i tanh(tanh_scale f_ti
    ||W_dec,i||) ("tanh", Anthropic's). The straight-through gradients use a rectangle kernel of width
    `bandwidth`. The L0 coefficient is warmed up over train_sae.l1_warmup_steps (SAELens l0_warm_up_steps).
    Saved as SAELens "jumprelu" (tensor `threshold` [d_sae]); the dense path only: the threshold gradient
    needs dL/df at the inactive pairs within the bandwidth, which the sparse decoder does not produce.
    """

    weight_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    sparsity_param: ClassVar[str | None] = "l0_coefficient"
    loss_definition: ClassVar[str] = (
        "mean_t ||x_t - x_hat_t||^2 + l0_coefficient * (step: mean_t sum_i H(pre_ti - threshold_i); "
        "tanh: mean_t sum_i tanh(tanh_scale f_ti ||W_dec,i||)) (SAE input space); straight-through threshold "
        "gradients with a rectangle kernel of width jumprelu_bandwidth")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        self.init_threshold: float = 0.01  # SAELens jumprelu_init_threshold
        super().__init__(cfg, seed=seed)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), self.init_threshold, dtype=getattr(torch, cfg.dtype)))
        self.bandwidth: float = 0.05
        self.sparsity_loss_mode: str = "step"
        self.tanh_scale: float = 4.0
        self.l0_coefficient: float = 1.0

    def configure_training(self, params: TrainSaeParams) -> None:
        """jumprelu_bandwidth, jumprelu_init_threshold (the fresh threshold), jumprelu_sparsity_loss_mode,
        jumprelu_tanh_scale."""
        self.bandwidth = float(params.jumprelu_bandwidth)
        self.init_threshold = float(params.jumprelu_init_threshold)
        with torch.no_grad():
            self.threshold.fill_(self.init_threshold)
        self.sparsity_loss_mode = params.jumprelu_sparsity_loss_mode
        self.tanh_scale = float(params.jumprelu_tanh_scale)
        self.l0_coefficient = float(params.l0_coefficient)

    def training_details(self) -> dict[str, Any]:
        return {"jumprelu_init_threshold": self.init_threshold, "jumprelu_bandwidth": self.bandwidth,
                "jumprelu_sparsity_loss_mode": self.sparsity_loss_mode, "l0_coefficient": self.l0_coefficient,
                "jumprelu_tanh_scale": self.tanh_scale, "jumprelu_ste_to_input": False}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the thresholds >= 0 (SAELens projects them before each forward; the same sequence)."""
        self.threshold.clamp_(min=0.0)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return JumpReLUFn.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)
        return torch.relu(pre) * (pre > self.threshold.to(pre.dtype))

    def loss(self, x: torch.Tensor, l1_coefficient: float, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """`l1_coefficient` is the L0 coefficient here (train_sae.l0_coefficient, warmed up)."""
        if self.sparsity_loss_mode not in SPARSITY_LOSS_MODES:
            raise ValueError(f"jumprelu sparsity loss mode must be one of {SPARSITY_LOSS_MODES}, got {self.sparsity_loss_mode!r}")
        x_in = x * self.input_factor(x)
        pre = self.pre_activations(x_in)
        threshold = self.threshold.to(pre.dtype)
        f = JumpReLUFn.apply(pre, threshold, self.bandwidth)
        x_hat_in = self.decode_normalised(f)
        mse = (x_hat_in - x_in).pow(2).sum(-1).mean()
        if self.sparsity_loss_mode == "step":
            sparsity = StepFn.apply(pre, threshold, self.bandwidth).sum(-1).mean()
        else:
            sparsity = torch.tanh(self.tanh_scale * f * self.decoder_norms()).sum(-1).mean()
        return LossOutput(mse + l1_coefficient * sparsity, mse, sparsity, f, x_in, x_hat_in)
