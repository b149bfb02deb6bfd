"""`relu` (SAELens "standard"): the SAE-V paper's SAE, ReLU codes, decoder-norm-weighted L1; a sparse
training step once the batch's codes are sparse enough."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from mmsae.sae.model.base import SAE, LossOutput, SAEConfig, register_architecture

if TYPE_CHECKING:
    from mmsae.params import TrainSaeParams


@register_architecture("relu")
class ReLUSAE(SAE):
    """Standard SAE (SAELens "standard"): f = ReLU(x W_enc + b_enc), trained with decoder-norm-weighted L1."""

    loss_definition: ClassVar[str] = (
        "mean_t ||x_t - x_hat_t||^2 + l1_coefficient * mean_t sum_i f_ti ||W_dec,i||_2 (SAE input space)")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        super().__init__(cfg, seed=seed)
        # A training step whose batch has at most this share of active (token, latent) pairs takes the
        # sparse path (`loss`); above it the five dense GEMMs are cheaper than the sparse products
        # (break-even ~0.16 on the CPU, d_in 256, d_sae 4096, batch 1024: perf/README.md).
        self.sparse_max_density: float = 0.125

    def configure_training(self, params: TrainSaeParams) -> None:
        """sparse_max_density (0: always dense)."""
        self.sparse_max_density = float(params.sparse_max_density)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x: torch.Tensor, l1_coefficient: float, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """SAE.loss (paper Eq. 1-3). In training, once at most `sparse_max_density` of the batch's codes are
        active (L0 << d_sae, as after the first steps of a real run), the step runs on the active pairs
        only: the decoder gathers their W_dec rows and the encoder's backward is taken at them
        (SelectedPreGrad), 2 n d_in d_sae + O(nnz d_in) FLOPs instead of 10 n d_in d_sae. Same values and
        gradients as the dense path (ReLU'(pre) = 0 wherever pre <= 0), up to float rounding."""
        if not torch.is_grad_enabled():
            return super().loss(x, l1_coefficient, dead_mask)
        x_in = x * self.input_factor(x)
        pre = self.pre_activations(x_in)
        with torch.no_grad():
            active = pre > 0
            sparse = int(torch.count_nonzero(active)) <= self.sparse_max_density * active.numel()
        if not sparse:
            return self._dense_loss(x_in, torch.relu(pre), l1_coefficient)
        with torch.no_grad():
            tokens, latents = active.nonzero(as_tuple=True)  # row-major: each token's pairs are one run
            codes = torch.relu(pre)
        values = self.selected(pre.detach()[tokens, latents], x_in, tokens, latents)  # all > 0: ReLU is the identity
        x_hat_in = self.gather_rows(values, tokens, latents, len(x_in)) + self.b_dec
        mse = (x_hat_in - x_in).pow(2).sum(-1).mean()
        sparsity = (values * self.decoder_norms()[latents]).sum() / len(x_in)
        return LossOutput(mse + l1_coefficient * sparsity, mse, sparsity, codes, x_in, x_hat_in)

