"""Synthetic activation stores for the benchmarks, written with mmsae's own ActivationWriter.

Activations are sparse sums of random unit directions (a known dictionary) plus a shared offset and a
little noise, so an SAE trained or run on them behaves like one on real residual streams (few active
latents per token) rather than on isotropic noise. Every sample has `tokens_per_sample` tokens: a
BOS (`special`), `image_tokens` image tokens, then text tokens (word ids from a small vocabulary; the
last 8 are the response). Deterministic in the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmsae.activations import ActivationStore, ActivationWriter

IMAGE_TOKEN_ID = 4
VOCAB = 200  # text token ids 10 .. 10 + VOCAB - 1
RESPONSE_TOKENS = 8


def synthetic_acts(n: int, d_in: int, seed: int, start: int = 0, atoms_per_dim: int = 4, active: int = 8,
                   block: int = 4096) -> np.ndarray:
    """Rows start .. start + n - 1 of a synthetic store, [n, d_in] float32: each row = sum of `active` of
    `atoms_per_dim * d_in` unit atoms (one dictionary per seed), exponential magnitudes, + offset (norm 2)
    + N(0, 0.05^2) noise. Rows are drawn in global blocks of `block` rows (one RNG per block), so a row's
    value does not depend on how the store is cut into calls."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((atoms_per_dim * d_in, d_in)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    offset = rng.standard_normal(d_in).astype(np.float32)
    offset *= 2.0 / np.linalg.norm(offset)
    # atom frequencies ~ 1/rank (a few common features, a long tail), as in real SAE latents
    p = 1.0 / np.arange(1, len(atoms) + 1)
    p /= p.sum()
    out = np.empty((n, d_in), np.float32)
    for b in range(start // block, (start + n - 1) // block + 1 if n else 0):
        g = np.random.default_rng([seed, b])
        idx = g.choice(len(atoms), size=(block, active), p=p)
        mag = g.exponential(1.0, size=(block, active)).astype(np.float32)
        x = np.einsum("ma,mad->md", mag, atoms[idx]) + offset + 0.05 * g.standard_normal((block, d_in)).astype(np.float32)
        lo, hi = max(start, b * block), min(start + n, (b + 1) * block)
        out[lo - start : hi - start] = x[lo - b * block : hi - b * block]
    return out


def token_frame(n_samples: int, tokens_per_sample: int, image_tokens: int, seed: int, first: int = 0) -> pd.DataFrame:
    """tokens.parquet columns (without `row`) for samples first .. first + n_samples - 1."""
    if not 0 <= image_tokens <= tokens_per_sample - 1 - RESPONSE_TOKENS:
        raise ValueError("image_tokens must leave room for BOS and the response")
    rng = np.random.default_rng([seed, first])
    pos = np.tile(np.arange(tokens_per_sample, dtype=np.int32), n_samples)
    is_image = (pos >= 1) & (pos <= image_tokens)
    modality = np.where(pos == 0, "special", np.where(is_image, "image", "text"))
    token_id = rng.integers(10, 10 + VOCAB, size=len(pos)).astype(np.int32)
    token_id[pos == 0] = 1
    token_id[is_image] = IMAGE_TOKEN_ID
    ids = np.repeat(np.array([f"s{i:08d}" for i in range(first, first + n_samples)], dtype=object), tokens_per_sample)
    return pd.DataFrame({
        "sample_id": ids, "position": pos, "modality": modality, "token_id": token_id,
        "is_response": pos >= tokens_per_sample - RESPONSE_TOKENS,
        "patch": np.where(is_image, pos - 1, -1).astype(np.int32),
    })


def write_store(folder: str | Path, n_samples: int, d_in: int, seed: int, tokens_per_sample: int = 64,
                image_tokens: int = 32, chunk_tokens: int = 4096, layer: int = 0,
                samples_per_append: int = 256) -> ActivationStore:
    """An extract artifact (acts.zarr layer_{layer} + tokens.parquet) of n_samples synthetic samples,
    written in appends of `samples_per_append` samples (memory bounded by one block + one shard)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ActivationWriter(folder, [layer], d_in, "float32", chunk_tokens=chunk_tokens, shard_chunks=8)
    for first in range(0, n_samples, samples_per_append):
        m = min(samples_per_append, n_samples - first)
        acts = synthetic_acts(m * tokens_per_sample, d_in, seed, first * tokens_per_sample)
        writer.append({layer: torch.from_numpy(acts)}, token_frame(m, tokens_per_sample, image_tokens, seed, first))
    writer.close()
    return ActivationStore(folder)
