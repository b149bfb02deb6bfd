"""`topk` (SAELens "topk"): Gao et al. 2024, "Scaling and evaluating sparse autoencoders", as implemented by
OpenAI's sparse_autoencoder and EleutherAI's sparsify (see TopKSAE)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsae.sae.model.base import SAE, LossOutput, SAEConfig, register_architecture

if TYPE_CHECKING:
    from mmsae.params import TrainSaeParams


@torch.no_grad()
def geometric_median(x: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """argmin_y sum_t ||x_t - y||_2 over the rows of x [n, d], by Weiszfeld's iteration (float64).

    Starts at the mean; distances are clamped at 1e-12 (a row equal to the iterate gets a large finite
    weight instead of a division by zero). Stops when an update moves by < tol * (1 + ||y||). Deterministic.
    """
    xd = x.reshape(-1, x.shape[-1]).double()
    y = xd.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * xd).sum(0) / w.sum()
        moved = float((y_new - y).norm())
        y = y_new
        if moved < tol * (1.0 + float(y.norm())):
            break
    return y.to(x.dtype)


class AuxKSAE(SAE):
    """What the TopK family shares (topk, batchtopk, matryoshka_batchtopk): unit-norm decoder rows (at init
    and after every optimizer step, the gradient component parallel to each row removed before it), b_dec
    initialised to the geometric median of the first batch, the AuxK loss on dead latents, and the helpers
    of the sparse paths (selected pairs, gathered decoder rows). Not an architecture by itself.
    """

    init_decoder_norm: ClassVar[float] = 1.0
    default_apply_b_dec_to_input: ClassVar[bool] = True
    sparsity_param: ClassVar[str | None] = None

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.aux_k: int = min(cfg.d_sae, max(1, cfg.d_in // 2))  # set by configure_training
        self.aux_coefficient: float = 1.0 / 32

    # ---- training hooks ----------------------------------------------------------------------------
    def configure_training(self, params: TrainSaeParams) -> None:
        """aux_k (null -> d_in // 2, the heuristic of Gao et al. App. B.1, sparsify and SAELens; at most
        d_sae) and aux_coefficient (Gao et al.: 1/32)."""
        aux_k = params.aux_k
        self.aux_k = min(self.cfg.d_sae, int(aux_k) if aux_k is not None else max(1, self.cfg.d_in // 2))
        self.aux_coefficient = float(params.aux_coefficient)

    def training_details(self) -> dict[str, Any]:
        return {"aux_k": self.aux_k, "aux_loss_coefficient": self.aux_coefficient, "rescale_acts_by_decoder_norm": False}

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """b_dec = geometric median of the batch in the SAE input space (Gao et al.; sparsify)."""
        x_in = x * self.input_factor(x)
        self.b_dec.copy_(geometric_median(x_in).to(self.b_dec))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each W_dec row's gradient its component along the row (g -= (g.w / w.w) w)."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            g.sub_(((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-30)) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise every W_dec row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- shared helpers of the sparse paths -------------------------------------------------------
    @staticmethod
    def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k largest per row, indices ascending (the sparse decoder's CSR order)."""
        values, indices = scores.topk(k, dim=-1, sorted=False)
        indices, order = indices.sort(dim=-1)
        return values.gather(-1, order), indices

    @staticmethod
    def _pairs(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, latents) [n k] of per-token latent indices [..., k], tokens sorted."""
        kk = indices.shape[-1]
        n = indices.numel() // kk
        return torch.arange(n, device=indices.device).repeat_interleave(kk), indices.reshape(-1)

    def _selected_k(self, values: torch.Tensor, x_in: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`selected` for k values per token ([..., k] in and out)."""
        if not torch.is_grad_enabled():
            return values
        tokens, latents = self._pairs(indices)
        return self.selected(values.reshape(-1), x_in, tokens, latents).reshape(values.shape)

    @staticmethod
    def _dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
        return values.new_zeros(*values.shape[:-1], d_sae).scatter(-1, indices, values)

    def _gather_rows(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_j values[..., j] W_dec[indices[..., j]] -> [..., d_in], without b_dec."""
        tokens, latents = self._pairs(indices)
        out = self.gather_rows(values.reshape(-1), tokens, latents, indices[..., 0].numel())
        return out.reshape(*values.shape[:-1], self.cfg.d_in)

    def auxk_loss(self, pre: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor | None,
                  total_variance: torch.Tensor, x_in: torch.Tensor | None = None) -> torch.Tensor:
        """AuxK (Gao et al. 2024 sec. A.2; sparsify's normalisation and scale).

        With n_dead = |dead| > 0 and k_aux = min(aux_k, n_dead): e_hat_t = sum of the k_aux largest ReLU'd
        pre-activations among the dead latents times their W_dec rows (no b_dec);
        AuxK = min(n_dead / aux_k, 1) * sum_t ||e_t - e_hat_t||^2 / total_variance, e = residual (detached).
        0 when dead_mask is None or no latent is dead. Gradients reach W_enc, b_enc (b_dec if applied to
        the input) and the dead rows of W_dec only. `pre`: the raw pre-activations of encode_sparse; with
        `x_in` (the SAE input they came from) the selected values get the sparse backward of `selected`,
        otherwise the gradient flows through `pre` (dense).
        """
        if dead_mask is None:
            return pre.new_zeros(())
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        scale = min(n_dead / self.aux_k, 1.0)
        if x_in is None:
            candidates = pre.masked_fill(~dead_mask.to(pre.device), -math.inf)  # live latents never selected
            values, indices = self._top(candidates, k_aux)
        else:
            with torch.no_grad():
                candidates = pre.masked_fill(~dead_mask.to(pre.device), -math.inf)
                values, indices = self._top(candidates, k_aux)
            values = self._selected_k(values, x_in, indices)
        e_hat = self._gather_rows(torch.relu(values), indices)
        return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


@register_architecture("topk")
class TopKSAE(AuxKSAE):
    """TopK SAE (Gao et al. 2024; OpenAI sparse_autoencoder, EleutherAI sparsify; SAELens "topk").

    Codes: f = TopK_k(ReLU((x_in - b_dec) W_enc + b_enc)): the k largest ReLU'd pre-activations per token
    are kept, all others are 0 (fewer than k are > 0 when fewer than k pre-activations are positive).
    b_dec is subtracted only if cfg.apply_b_dec_to_input (train_sae defaults it to true for topk; a
    loaded SAELens file keeps its own setting). Decoding gathers the k selected rows of W_dec
    (`decode_sparse`, F.embedding_bag) instead of multiplying by the dense [n, d_sae] codes, and the
    encoder's backward touches only the k selected columns of W_enc (`selected`, SelectedPreGrad).

    Training (train_sae): W_dec rows are unit norm at init and after every optimizer step, and the
    gradient component parallel to each row is removed before the step (sparsify). b_dec starts at the
    geometric median of the first batch (in the SAE input space). l1_coefficient is ignored: the sparsity
    is the k of TopK. See `loss` for the objective and AuxK.
    """

    uses_k: ClassVar[bool] = True
    loss_definition: ClassVar[str] = (
        "sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_batch(x)||^2 (batch FVU, SAE input space) + "
        "aux_coefficient * min(n_dead / aux_k, 1) * sum_t ||e_t - e_hat_t||^2 / (same denominator), "
        "e = x - x_hat (detached), e_hat = the reconstruction of e by the top min(aux_k, n_dead) dead latents "
        "(no b_dec); no L1 term")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        if cfg.k is None:
            raise ValueError("a topk SAE needs cfg.k (active latents per token)")
        super().__init__(cfg, seed=seed)
        self.k: int = int(cfg.k)

    # ---- the architecture --------------------------------------------------------------------------
    def encode_sparse(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [..., k], indices [..., k], pre-activations [..., d_sae]) of SAE-space inputs.

        TopK_k(ReLU(pre)) = ReLU(TopK_k(pre)) (ReLU is monotone; they differ only in which zero-valued
        slots are listed), so ReLU runs on the k selected values, not on all d_sae pre-activations
        (one [n, d_sae] pass less forward and backward). The pre-activations are returned raw.
        """
        pre = self.pre_activations(x_in)
        with torch.no_grad():
            values, indices = self._top(pre, self.k)
        return torch.relu(self._selected_k(values, x_in, indices)), indices, pre

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return self._dense(torch.relu(values), indices, pre.shape[-1])

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """SAE-space reconstruction from (values, indices) [..., k]: equals decode_normalised(dense codes)."""
        return self._gather_rows(values, indices) + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction of x in raw space, dense codes); decodes through the sparse decoder."""
        factor = self.input_factor(x)
        values, indices, _ = self.encode_sparse(x * factor)
        return self.decode_sparse(values, indices) / factor, self._dense(values, indices, self.cfg.d_sae)

    def loss(self, x: torch.Tensor, l1_coefficient: float = 0.0, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """FVU + aux_coefficient * AuxK, in the SAE input space (x_in = x * input_factor(x)), x [n, d_in].

        FVU = sum_t ||x_in,t - x_hat_in,t||^2 / sum_t ||x_in,t - mean_t(x_in)||^2, both sums over the batch
        (the batch-centred fraction of variance unexplained, sparsify's l2 loss; the denominator depends on
        the data only and is clamped at 1e-12). AuxK: `auxk_loss` with dead_mask = latents that have not fired
        for dead_window training tokens. l1_coefficient is ignored (TopK: no L1 term).
        LossOutput.mse and .sparsity are reported as for relu; .aux is AuxK before aux_coefficient.
        """
        x_in = x * self.input_factor(x)
        values, indices, pre = self.encode_sparse(x_in)
        x_hat_in = self.decode_sparse(values, indices)
        sq = (x_hat_in - x_in).pow(2).sum(-1)
        total_variance = (x_in - x_in.mean(0)).pow(2).sum().detach().clamp_min(1e-12)
        fvu = sq.sum() / total_variance
        aux = self.auxk_loss(pre, x_in - x_hat_in, dead_mask, total_variance, x_in)
        with torch.no_grad():
            sparsity = (values * self.decoder_norms()[indices]).sum(-1).mean()
            codes = self._dense(values.detach(), indices, self.cfg.d_sae)
        return LossOutput(fvu + self.aux_coefficient * aux, sq.mean(), sparsity, codes, x_in, x_hat_in, aux)
