"""`matryoshka_batchtopk` (SAELens "matryoshka_batchtopk"): Bussmann et al. 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders" (and Nabeshima 2024), as SAELens 6.54.12 trains it
(MatryoshkaBatchTopKTrainingSAE), on the BatchTopK SAE."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsae.sae.model.base import LossOutput, SAEConfig, register_architecture
from mmsae.sae.model.batchtopk import BatchTopKSAE

if TYPE_CHECKING:
    from mmsae.params import TrainSaeParams


def matryoshka_widths(widths: list[int] | None, d_sae: int) -> list[int]:
    """The nested prefix widths, strictly increasing, ending at d_sae (appended when missing, as SAELens
    does). None: d_sae / 16, / 8, / 4, / 2, d_sae (the prefixes of at least one latent)."""
    if widths is None:
        widths = [d_sae >> j for j in (4, 3, 2, 1) if d_sae >> j >= 1]
    widths = [int(w) for w in widths]
    if widths and widths[-1] != d_sae:
        widths.append(d_sae)
    if not widths or any(w <= 0 for w in widths) or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"matryoshka widths must be positive, strictly increasing and at most d_sae={d_sae}, got {widths}")
    if widths[-1] != d_sae:
        raise ValueError(f"matryoshka widths must end at d_sae={d_sae}, got {widths}")
    return widths


@register_architecture("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: BatchTopK codes, and a reconstruction loss at every nested prefix of the
    dictionary: with widths w_1 < ... < w_L = d_sae, x_hat^(j) = b_dec + sum_{i < w_j} f_i W_dec,i, and the
    loss sums the FVU of every level (equal weights, as SAELens sums the levels' MSEs) plus AuxK on the full
    reconstruction (SAELens' default, use_matryoshka_aux_loss false). The early latents must reconstruct on
    their own, so they learn the general features and the later ones the specific ones (less absorption).

    Inference is BatchTopK's (one threshold; saved as SAELens "jumprelu"); the levels matter in training only.
    Each level's decode gathers only its own latents' rows (the sparse decoder on a subset of the pairs) and
    the prefixes are running sums, so the L levels cost one sparse decode, not L.
    """

    loss_definition: ClassVar[str] = (
        "sum over the matryoshka levels j of sum_t ||x_t - x_hat^(j)_t||^2 / sum_t ||x_t - mean_batch(x)||^2, "
        "x_hat^(j) = b_dec + the BatchTopK codes of latents < matryoshka_widths[j] times their W_dec rows, + "
        "aux_coefficient * AuxK of the full reconstruction (as topk); SAE input space")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.widths: list[int] = matryoshka_widths(None, cfg.d_sae)

    def configure_training(self, params: TrainSaeParams) -> None:
        """BatchTopKSAE's options and matryoshka_widths."""
        super().configure_training(params)
        self.widths = matryoshka_widths(params.matryoshka_widths, self.cfg.d_sae)

    def level_reconstructions(self, values: torch.Tensor, tokens: torch.Tensor, latents: torch.Tensor,
                              n: int) -> list[torch.Tensor]:
        """x_hat^(j) [n, d_in] of every level j (SAE space), from sorted (token, latent) pairs."""
        out, running, lo = [], self.b_dec.expand(n, self.cfg.d_in), 0
        for w in self.widths:
            sel = (latents >= lo) & (latents < w)
            running = running + self.gather_rows(values[sel], tokens[sel], latents[sel], n)
            out.append(running)
            lo = w
        return out

    def loss(self, x: torch.Tensor, l1_coefficient: float = 0.0, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """sum_j FVU(x_hat^(j)) + aux_coefficient * AuxK(full), x [n, d_in]; .mse / .aux of the full level."""
        x_in = x * self.input_factor(x)
        values, tokens, latents, pre = self.encode_batch(x_in)
        self._remember_min(values)
        levels = self.level_reconstructions(values, tokens, latents, len(x_in))
        x_hat_in = levels[-1]
        fvu, sq, aux, total_variance = self._fvu_aux(x_in, x_hat_in, pre, dead_mask)
        inner = sum(((lv - x_in).pow(2).sum() for lv in levels[:-1]), x_in.new_zeros(()))
        with torch.no_grad():
            sparsity = (values * self.decoder_norms()[latents]).sum() / len(x_in)
        codes = self._codes(values, tokens, latents, len(x_in))
        loss = fvu + inner / total_variance + self.aux_coefficient * aux
        return LossOutput(loss, sq.mean(), sparsity, codes, x_in, x_hat_in, aux)

    def training_details(self) -> dict[str, Any]:
        return {**super().training_details(), "matryoshka_widths": list(self.widths),
                "use_matryoshka_aux_loss": False}
