"""The autograd functions behind the sparse paths of SAE (mmsae.sae.model.base): a gradient taken at the
selected (token, latent) pairs of the encoder only, and a decoder that gathers W_dec rows (embedding_bag)
instead of multiplying by dense [n, d_sae] codes. perf/README.md measures what they save."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


class SelectedPreGrad(torch.autograd.Function):
    """Pre-activations at selected (token, latent) pairs, flat [nnz], with a sparse backward.

    Forward returns `values` (computed by the dense encoder GEMM, unchanged). `tokens` [nnz] (sorted:
    each token's pairs are one run) and `latents` [nnz] say where each value sits in the [n, d_sae]
    pre-activations. Backward treats them as values[j] = x_c[tokens[j]] . W_enc[:, latents[j]] +
    b_enc[latents[j]], x_c = x_in (- b_dec), and returns for incoming gradients g [nnz]: W_enc = G^T x_c
    with G the [n, d_sae] matrix holding g at the pairs (a sparse x dense product, O(nnz d_in)); b_enc =
    g summed per latent; b_dec = -W_enc b_enc-gradient (a matvec); x_in (only if it needs one) = per token
    sum_j g[j] W_enc[:, latents[j]] (F.embedding_bag). Autograd through the dense GEMM would cost an
    [d_in, n] x [n, d_sae] matmul for W_enc and an [n, d_sae] x [d_sae, d_in] one for b_dec.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor | None, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x_c = x_in - b_dec if b_dec is not None else x_in
        ctx.save_for_backward(x_c, w_enc, tokens, latents)
        return values.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_c, w_enc, tokens, latents = ctx.saved_tensors
        d, d_sae = w_enc.shape
        g = g.to(w_enc.dtype)  # fp32 weights: the sparse product runs in their dtype
        x2 = x_c.reshape(-1, d)
        n = len(x2)
        grad_x = grad_w = grad_b = grad_bdec = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_b = g.new_zeros(d_sae).index_add_(0, latents, g)
        if ctx.needs_input_grad[2]:
            gt = torch.sparse_coo_tensor(torch.stack([latents, tokens]), g, (d_sae, n), check_invariants=False)
            grad_w = torch.sparse.mm(gt, x2.to(w_enc.dtype)).T
        if ctx.needs_input_grad[4]:
            grad_bdec = -(w_enc @ grad_b)
        if ctx.needs_input_grad[1]:
            rows = F.embedding_bag(latents, w_enc.T.contiguous(), bag_offsets(tokens, n), per_sample_weights=g,
                                   mode="sum")
            grad_x = rows.reshape(x_c.shape).to(x_c.dtype)
        return None, grad_x, grad_w, grad_b if ctx.needs_input_grad[3] else None, grad_bdec, None, None


def bag_offsets(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """F.embedding_bag offsets of n bags from the sorted bag (token) index of each entry."""
    counts = torch.bincount(tokens, minlength=n)
    return torch.cumsum(counts, 0) - counts


class SparseDecode(torch.autograd.Function):
    """Per token t < n: sum_j values[j] W_dec[latents[j]] over its pairs (tokens[j] = t) -> [n, d_in].

    Forward: F.embedding_bag. Backward, for incoming gradients g [n, d_in]: W_dec = G^T g with G the
    [n, d_sae] codes (a sparse x dense product, torch.sparse.mm on COO), values = g W_dec^T sampled at the
    pairs (an SDDMM, torch.sparse.sampled_addmm on CSR). embedding_bag's own backward took ~1.8x as
    long on the CPU (perf/README.md). Each token's pairs must be one run with its latents ascending (CSR column order).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, w_dec: torch.Tensor, tokens: torch.Tensor, latents: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, w_dec, tokens, latents, offsets)
        return F.embedding_bag(latents, w_dec, offsets, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        values, w_dec, tokens, latents, offsets = ctx.saved_tensors
        n, d_sae = len(offsets), w_dec.shape[0]
        g = g.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            crow = torch.cat([offsets, offsets.new_full((1,), len(latents))])
            with warnings.catch_warnings():  # torch warns that CSR support is "beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(crow, latents, g.new_zeros(len(latents)), (n, d_sae),
                                                  check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, g, w_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            gt = torch.sparse_coo_tensor(torch.stack([latents, tokens]), values, (d_sae, n), check_invariants=False)
            grad_w = torch.sparse.mm(gt, g)
        return grad_values, grad_w, None, None, None

