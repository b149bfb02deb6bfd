"""Dense [tokens x d_sae] blocks, bounded by bytes rather than by a token count.

At d_sae 65,536 one fp32 code row is 256 KiB, so an 8,192-token block of codes is 2 GiB (and its
nonzero scan as much again). Every caller that materialises dense codes (encode, the SAE evaluation,
the splice hook) runs the SAE on row slices of at most `DENSE_BYTES` of codes instead; the slices are
cut from the caller's batch, so results are those of one batch up to float summation order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

DENSE_BYTES = 256 << 20  # one [rows x d_sae] fp32 block of codes at most


def dense_rows(d_sae: int, budget: int | None = None) -> int:
    """Rows of a [rows x d_sae] fp32 block that fit in `budget` bytes (DENSE_BYTES by default); at least 1."""
    return max(1, int(DENSE_BYTES if budget is None else budget) // (4 * max(1, int(d_sae))))


def row_slices(n: int, d_sae: int, budget: int | None = None) -> Iterator[slice]:
    """Consecutive row slices of [0, n) whose dense codes fit in the budget."""
    step = dense_rows(d_sae, budget)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


@torch.no_grad()
def forward_blocks(sae, x: torch.Tensor, budget: int | None = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, reconstruction, codes) of `sae` on x, row slice by row slice (see the module docstring)."""
    for s in row_slices(len(x), sae.cfg.d_sae, budget):
        x_hat, f = sae(x[s])
        yield s, x_hat, f


@torch.no_grad()
def reconstruct(sae, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """sae(x)[0] without a dense [len(x) x d_sae] block of codes."""
    out = torch.empty_like(x)
    for s, x_hat, _ in forward_blocks(sae, x, budget):
        out[s] = x_hat.to(out.dtype)
    return out
