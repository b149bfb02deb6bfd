"""`batchtopk` (SAELens "batchtopk"): Bussmann et al. 2024, "BatchTopK Sparse Autoencoders", as SAELens
6.54.12 trains it (BatchTopKTrainingSAE), on the TopK family's recipe (AuxKSAE)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsae.sae.model.base import LossOutput, SAEConfig, register_architecture
from mmsae.sae.model.topk import AuxKSAE

if TYPE_CHECKING:
    from mmsae.params import TrainSaeParams


@register_architecture("batchtopk")
class BatchTopKSAE(AuxKSAE):
    """BatchTopK SAE: in training, the k * n largest ReLU'd pre-activations of the whole batch of n tokens
    are kept (k active latents per token on average, more on some tokens, fewer on others); at inference,
    one threshold: f = ReLU(pre) * 1{pre > threshold}, a JumpReLU with the same threshold for every latent.

    The threshold (`topk_threshold`, float64, starts at 0) follows the smallest kept activation of each
    training batch: threshold <- (1 - topk_threshold_lr) threshold + topk_threshold_lr min_kept, once per
    step (SAELens BatchTopKTrainingSAE.update_topk_threshold). Saved as SAELens "jumprelu" with `threshold`
    = topk_threshold for every latent (SAELens process_state_dict_for_saving_inference), so SAELens'
    inference JumpReLUSAE reads it unchanged.

    Training as `topk` (AuxKSAE): unit-norm decoder rows (SAELens' rescale_acts_by_decoder_norm is then the
    identity), b_dec at the geometric median of the first batch, FVU + AuxK. The step is sparse: the kept
    (token, latent) pairs get the gathered decoder and the encoder gradient at those pairs only.
    """

    uses_k: ClassVar[bool] = True
    loss_definition: ClassVar[str] = (
        "as topk, with the codes of the batch = its k * n_tokens largest ReLU'd pre-activations (BatchTopK); "
        "inference codes = ReLU(pre) * 1{pre > topk_threshold} (EMA of the smallest kept activation per batch)")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        if cfg.k is None:
            raise ValueError(f"a {cfg.architecture} SAE needs cfg.k (mean active latents per token)")
        super().__init__(cfg, seed=seed)
        self.k: int = int(cfg.k)
        self.topk_threshold_lr: float = 0.01
        # float64 as SAELens: an EMA of small values in float32 drifts
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64))
        self._batch_min: torch.Tensor | None = None  # the last training batch's smallest kept activation

    def configure_training(self, params: TrainSaeParams) -> None:
        """AuxKSAE's options and topk_threshold_lr."""
        super().configure_training(params)
        self.topk_threshold_lr = float(params.topk_threshold_lr)

    def training_details(self) -> dict[str, Any]:
        return {**super().training_details(), "k": self.k, "topk_threshold_lr": self.topk_threshold_lr}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Unit-norm rows (AuxKSAE), then the threshold update from the batch the step was taken on."""
        super().after_optimizer_step()
        if self._batch_min is not None:
            lr = self.topk_threshold_lr
            self.topk_threshold.copy_((1 - lr) * self.topk_threshold + lr * self._batch_min.to(torch.float64))
            self._batch_min = None

    # ---- inference: one threshold ------------------------------------------------------------------
    @property
    def threshold(self) -> torch.Tensor:
        """The JumpReLU threshold of every latent [d_sae] (weights dtype), as saved."""
        return self.topk_threshold.to(self.b_enc.dtype).expand(self.cfg.d_sae)

    def weights(self) -> dict[str, torch.Tensor]:
        return {**super().weights(), "threshold": self.threshold.detach().clone()}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.topk_threshold.to(pre.dtype))

    # ---- training: BatchTopK -----------------------------------------------------------------------
    def batch_pairs(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, tokens, latents) [nnz] of the k * n largest positive pre-activations of pre [n, d_sae],
        tokens sorted and latents ascending within a token (the sparse decoder's order); values are taken
        from `pre` without a graph."""
        n, d_sae = pre.shape
        with torch.no_grad():
            flat = pre.detach().reshape(-1)
            values, idx = flat.topk(min(self.k * n, flat.numel()), sorted=False)
            idx = idx[values > 0].sort().values
        return flat[idx], idx // d_sae, idx % d_sae

    def encode_batch(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, tokens, latents, pre-activations) of the BatchTopK codes of SAE-space x_in [n, d_in];
        the values carry the sparse encoder gradient (`selected`)."""
        pre = self.pre_activations(x_in)
        values, tokens, latents = self.batch_pairs(pre)
        return self.selected(values, x_in, tokens, latents), tokens, latents, pre

    def _codes(self, values: torch.Tensor, tokens: torch.Tensor, latents: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            codes = values.new_zeros(n, self.cfg.d_sae)
            codes[tokens, latents] = values.detach()
        return codes

    def _fvu_aux(self, x_in: torch.Tensor, x_hat_in: torch.Tensor, pre: torch.Tensor,
                 dead_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(FVU, squared error per token, AuxK, total variance) of a reconstruction, as TopKSAE.loss."""
        sq = (x_hat_in - x_in).pow(2).sum(-1)
        total_variance = (x_in - x_in.mean(0)).pow(2).sum().detach().clamp_min(1e-12)
        aux = self.auxk_loss(pre, x_in - x_hat_in, dead_mask, total_variance, x_in)
        return sq.sum() / total_variance, sq, aux, total_variance

    def _remember_min(self, values: torch.Tensor) -> None:
        if torch.is_grad_enabled() and values.numel():
            self._batch_min = values.detach().min()

    def loss(self, x: torch.Tensor, l1_coefficient: float = 0.0, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """FVU + aux_coefficient * AuxK (TopKSAE.loss) with the BatchTopK codes of the batch x [n, d_in].
        With grad enabled (training), the smallest kept activation is remembered for the threshold update
        in `after_optimizer_step`. l1_coefficient is ignored."""
        x_in = x * self.input_factor(x)
        values, tokens, latents, pre = self.encode_batch(x_in)
        self._remember_min(values)
        x_hat_in = self.gather_rows(values, tokens, latents, len(x_in)) + self.b_dec
        fvu, sq, aux, _ = self._fvu_aux(x_in, x_hat_in, pre, dead_mask)
        with torch.no_grad():
            sparsity = (values * self.decoder_norms()[latents]).sum() / len(x_in)
        codes = self._codes(values, tokens, latents, len(x_in))
        return LossOutput(fvu + self.aux_coefficient * aux, sq.mean(), sparsity, codes, x_in, x_hat_in, aux)
