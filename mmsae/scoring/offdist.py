"""Off-distribution images: per-sample image statistics, their robust z-scores against the scored pool,
and the offdist |z| behind `offdist`, `consistency_gated` and `consistency_binding_gated`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mmsae.scoring.context import ScoringContext

# offdist runs the SAE on at most this many image tokens at a time, fewer for a wide SAE, so that its
# dense [rows, d_sae] fp32 codes stay near 64 MB (256 rows at d_sae 65,536)
SAE_MAX_ROWS, SAE_MIN_ROWS, SAE_CODE_ELEMENTS = 4096, 64, 1 << 24


# score's passes over the store (offdist, nosae_cosine) read it 8 chunks (one shard file) at a time, fewer
# when that block would pass this many bytes as float32: at d_model 4,096 and chunk 8,192 a block of 8 chunks
# is 1 GiB of float32, and with its masked copy and float64 sums score's peak rose by 4.3 GB (perf/README.md: the flat regime)
STORE_BLOCK_CHUNKS, STORE_BLOCK_BYTES = 8, 1 << 28


def store_block_tokens(store) -> int:
    """Rows per block of score's store passes: whole chunks, at most STORE_BLOCK_CHUNKS and about
    STORE_BLOCK_BYTES of float32 (at least one chunk). A function of the store only, so sharded and
    unsharded scoring cut every block the same way."""
    chunk = int(store.chunk_tokens)
    fit = STORE_BLOCK_BYTES // max(1, chunk * int(store.d_model) * 4)
    return chunk * max(1, min(STORE_BLOCK_CHUNKS, fit))


def sae_rows(d_sae: int) -> int:
    """Tokens per SAE call in offdist's pass: a function of the SAE only, so sharded and unsharded
    scoring cut every store block the same way."""
    return min(SAE_MAX_ROWS, max(SAE_MIN_ROWS, SAE_CODE_ELEMENTS // max(d_sae, 1)))


def image_stats(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """One pass over the store at the SAE's layer, image tokens of the scored samples: per sample the
    token count, the sum of unit-norm hidden states [n, d_model] and (with an SAE) the sum of
    relative reconstruction errors ||x - x_hat||^2 / ||x||^2."""
    store = ctx.need("store", "offdist")
    layer = ctx.need("layer", "offdist")
    ti = ctx.token_sides
    n = ctx.n
    count = np.zeros(n)
    unit = torch.zeros(n, store.d_model, dtype=torch.float64)
    error = np.zeros(n) if ctx.sae is not None else None
    sub = sae_rows(int(ctx.sae.cfg.d_sae)) if ctx.sae is not None else SAE_MAX_ROWS
    for start, x in store.iter_blocks(layer, store_block_tokens(store)):
        s, side = ti["sample"][start : start + len(x)], ti["side"][start : start + len(x)]
        m = (s >= 0) & (side == 1)
        if not m.any():
            continue
        s, rows = s[m].astype(np.int64), np.flatnonzero(m)
        count += np.bincount(s, minlength=n)
        rel = np.zeros(len(rows))
        # sub-batches: the SAE's [rows, d_sae] pre-activations of a whole block (up to 65,536 rows) would
        # not fit; each row's values do not depend on the batch, and the sums run in the same order
        for a in range(0, len(rows), sub):
            xt = torch.from_numpy(np.ascontiguousarray(x[rows[a : a + sub]])).float()
            norms = xt.norm(dim=1)
            unit.index_add_(0, torch.from_numpy(s[a : a + sub]), (xt / norms.clamp_min(1e-12)[:, None]).double())
            if error is not None:
                rel[a : a + sub] = relative_error(ctx.sae, xt, norms)
        if error is not None:
            error += np.bincount(s, weights=rel, minlength=n)
    out = {"count": count, "unit_sum": unit.numpy()}
    if error is not None:
        out["error"] = error
    return out


@torch.no_grad()
def relative_error(sae, x: torch.Tensor, norms: torch.Tensor) -> np.ndarray:
    """||x - x_hat||^2 / ||x||^2 per row of x [n, d_in] (CPU float32; `norms` = its row norms), the SAE run
    on its own device. A sparse SAE (TopK: `encode_sparse` / `decode_sparse`) is decoded from its k
    (value, latent) pairs, as its forward does, without the dense [n, d_sae] codes forward also returns."""
    device = sae.W_enc.device
    xs = x.to(device=device, dtype=sae.W_enc.dtype, non_blocking=True)
    if hasattr(sae, "encode_sparse"):
        factor = sae.input_factor(xs)
        values, indices, _ = sae.encode_sparse(xs * factor)
        recon = sae.decode_sparse(values, indices) / factor
    else:
        recon, _ = sae(xs)
    x_d, n_d = (x, norms) if device.type == "cpu" else (xs.float(), norms.to(device))
    err = (recon.float() - x_d).pow(2).sum(1) / n_d.pow(2).clamp_min(1e-12)
    return err.double().cpu().numpy()


def offdist_z(ctx: ScoringContext) -> np.ndarray:
    """Per sample: the largest robust |z| of its image statistics against the scored pool (see
    `offdist`); 0 for samples without image tokens."""
    st = ctx.image_stats
    count = st["count"]
    has = count > 0
    c = np.maximum(count, 1.0)
    stats = [ctx.code_stats["image_l0"] / c, centre_distance(st["unit_sum"], c, has)]
    if "error" in st:
        stats.append(st["error"] / c)
    z = np.max(np.abs(np.stack([robust_z(x, has) for x in stats])), axis=0)
    return np.where(has, z, 0.0)


# columns per block of centre_distance: [samples, 256] float64 is 80 MB at a 40K-sample pool, where the
# whole [samples, d_model] mean array and the copies a median takes would be ~5 GB at d_model 4,096
CENTRE_COLUMNS = 256


def centre_distance(unit_sum: np.ndarray, count: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Per sample ||mean_unit - centre||, mean_unit = unit_sum / count and centre its per-dimension
    median over the samples in `has`; computed a block of columns at a time (the same numbers: a median
    and a squared distance are per column)."""
    n, d = unit_sum.shape
    sq = np.zeros(n)
    for a in range(0, d, CENTRE_COLUMNS):
        block = unit_sum[:, a : a + CENTRE_COLUMNS] / count[:, None]
        centre = np.median(block[has], axis=0) if has.any() else 0.0
        sq += ((block - centre) ** 2).sum(axis=1)
    return np.sqrt(sq)


def robust_z(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD) over x[mask]; 1.2533 x mean absolute deviation when the MAD is 0;
    all 0 when x[mask] is constant (the statistic then flags nothing)."""
    if not mask.any():
        return np.zeros_like(x)
    ref = x[mask]
    med = np.median(ref)
    scale = 1.4826 * np.median(np.abs(ref - med))
    if scale <= 0:
        scale = 1.2533 * np.mean(np.abs(ref - med))
    return (x - med) / scale if scale > 0 else np.zeros_like(x)
