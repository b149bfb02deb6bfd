"""SAE quality metrics: one definition each, pinned by tests/test_sae.py on hand-built tensors.

All metrics are computed on raw activations (the store's scale), whatever normalisation the SAE uses
internally, over the evaluated tokens:

- `l0`: mean over tokens of the number of latents with f_i > 0.
- `mse`: mean over tokens of the squared error summed over the d_in dimensions,
  (1/n) sum_t ||x_t - x_hat_t||^2 (NOT divided by d; SAELens' `mse` is the element mean, i.e. ours / d).
- `centred_fvu`: sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t(x)||^2, the mean taken over the same
  evaluated tokens (explained variance = 1 - FVU). Reconstructing every token by the mean gives 1.
- `dead_fraction`: fraction of latents that never fired on the evaluated tokens and, when training
  counters are given, also not within the last `dead_window` training tokens.
- `dense_fraction`: fraction of latents whose firing frequency on the evaluated tokens > dense_threshold.

`MetricAccumulator` computes the same quantities streaming (float64 sums), so evaluation over a large
held-out set needs memory for one block only (the SAE runs on row slices of at most
mmsae.sae.blocks.DENSE_BYTES of dense codes); `evaluate` is the in-memory entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mmsae.sae.blocks import forward_blocks

MODALITY_KEYS = ("image", "text")


def l0(f: torch.Tensor) -> float:
    """Mean number of active (> 0) latents per token; f is [n, d_sae]."""
    return float((f > 0).sum(-1).double().mean())


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens of the squared error summed over d: (1/n) sum_t ||x_t - x_hat_t||^2."""
    return float((x.double() - x_hat.double()).pow(2).sum(-1).mean())


def centred_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens (nan if all tokens are identical)."""
    x, x_hat = x.double(), x_hat.double()
    num = (x - x_hat).pow(2).sum()
    den = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return float(num / den) if den > 0 else float("nan")


def dead_fraction(fire_counts: torch.Tensor, tokens_since_fire: torch.Tensor | None = None,
                  dead_window: int | None = None) -> float:
    """Latents that never fired on the evaluated tokens (and not in the last dead_window training tokens)."""
    dead = fire_counts == 0
    if tokens_since_fire is not None and dead_window is not None:
        dead &= tokens_since_fire.to(dead.device) >= dead_window
    return float(dead.double().mean())


def dense_fraction(fire_counts: torch.Tensor, n_tokens: int, dense_threshold: float) -> float:
    """Latents firing on more than dense_threshold of the evaluated tokens."""
    if n_tokens == 0:
        return float("nan")
    return float((fire_counts.double() / n_tokens > dense_threshold).double().mean())


class MetricAccumulator:
    """Streaming version of the definitions above (sums in float64)."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_sq_x = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        if len(x) == 0:
            return
        xd = x.double()
        self.n += len(x)
        self.sq_err += (xd - x_hat.double()).pow(2).sum()
        self.sum_x += xd.sum(0)
        self.sum_sq_x += xd.pow(2).sum()
        fired = f > 0
        self.active += fired.sum()
        self.fire_counts += fired.sum(0)

    def result(self, dense_threshold: float, tokens_since_fire: torch.Tensor | None = None,
               dead_window: int | None = None) -> dict[str, float | int | None]:
        if self.n == 0:
            return {"n_tokens": 0, "l0": None, "mse": None, "centred_fvu": None,
                    "dead_fraction": None, "dense_fraction": None}
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2 (float64: fine for offsets << 1e6 * spread)
        den = float(self.sum_sq_x - self.sum_x.pow(2).sum() / self.n)
        return {
            "n_tokens": self.n,
            "l0": float(self.active) / self.n,
            "mse": float(self.sq_err) / self.n,
            "centred_fvu": float(self.sq_err) / den if den > 0 else float("nan"),
            "dead_fraction": dead_fraction(self.fire_counts, tokens_since_fire, dead_window),
            "dense_fraction": dense_fraction(self.fire_counts, self.n, dense_threshold),
        }


@torch.no_grad()
def evaluate_blocks(sae, blocks: Iterable[tuple[torch.Tensor, Sequence[str] | np.ndarray, np.ndarray | None]],
                    dense_threshold: float = 0.1, tokens_since_fire: torch.Tensor | None = None,
                    dead_window: int | None = None) -> tuple[dict, MetricAccumulator]:
    """Metrics over streamed blocks (x, modality per token, in_scope mask or None = all in scope).

    Returns ({"overall": ..., "image": ..., "text": ..., [other modalities seen]}, overall accumulator).
    `overall` covers the in-scope tokens; per-modality entries cover every token of that modality given,
    in scope or not (so a text-only SAE still reports how it does on image tokens).
    """
    device = sae.W_enc.device
    overall = MetricAccumulator(sae.cfg.d_in, sae.cfg.d_sae, device)
    per: dict[str, MetricAccumulator] = {m: MetricAccumulator(sae.cfg.d_in, sae.cfg.d_sae, device) for m in MODALITY_KEYS}
    for x_block, modality_block, in_scope_block in blocks:
        x_block = x_block.to(device=device, dtype=sae.W_enc.dtype)
        modality_block = np.asarray(modality_block)
        # the SAE on row slices: dense codes of at most mmsae.sae.blocks.DENSE_BYTES at a time
        for s, x_hat, f in forward_blocks(sae, x_block):
            x, modality = x_block[s], modality_block[s]
            if in_scope_block is None:
                overall.update(x, x_hat, f)
            else:
                m = torch.from_numpy(np.asarray(in_scope_block, dtype=bool)[s]).to(device)
                overall.update(x[m], x_hat[m], f[m])
            for name in np.unique(modality):
                m = torch.from_numpy(modality == name).to(device)
                acc = per.setdefault(str(name), MetricAccumulator(sae.cfg.d_in, sae.cfg.d_sae, device))
                acc.update(x[m], x_hat[m], f[m])
    out = {"overall": overall.result(dense_threshold, tokens_since_fire, dead_window)}
    out.update({name: acc.result(dense_threshold) for name, acc in per.items()})
    return out, overall


def evaluate(sae, x: torch.Tensor, modality: Sequence[str] | np.ndarray, *, batch_size: int = 4096,
             dense_threshold: float = 0.1) -> dict:
    """Metrics of `sae` on raw activations x [n, d_in], overall and per modality (image, text, ...)."""
    modality = np.asarray(modality)
    if len(modality) != len(x):
        raise ValueError(f"modality has {len(modality)} entries for {len(x)} tokens")
    blocks = ((x[i : i + batch_size], modality[i : i + batch_size], None) for i in range(0, len(x), batch_size))
    return evaluate_blocks(sae, blocks, dense_threshold)[0]
