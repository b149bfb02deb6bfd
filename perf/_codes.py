"""A synthetic pool with its codes, for the features and score stages at real widths without encoding.

perf/scale.py --synthetic-codes: encoding 60K+ tokens at d 4096 x 65,536 takes hours on a CPU, so the
codes are drawn instead and written with the encode stage's own CodesWriter. `write_pool` makes, in a
work folder, what features and score read:

- extract/  a store (mmsae's ActivationWriter: acts.zarr layer 0 + tokens.parquet): Gaussian hidden states
            (their values only feed the cosines; memory and reads do not depend on them);
- encode/   codes.parquet (parts of whole samples + _index.json) and a manifest with the SAE's layer, d_sae;
- sample/   samples.parquet (ids, texts, a 1-pixel image per sample: score reads it without the images).

Samples are laid out as the paper's pool: BOS, `images` images of `image_tokens` tokens each, then text
(the last 8 tokens the response). The defaults (3 x 334 image + 21 text + BOS = 1,024 tokens) give the
98:2 image:text mix measured on the Align-Anything layout. Codes: each token draws `k` latents with
replacement from a Zipf(`zipf`) law over the latents (one random rank order for image tokens, another for
text tokens that keeps the image order for half of the ranks: features image-only, text-only and shared),
duplicates merged (so L0 is a little under k), activations exponential. Deterministic in the seed;
written block by block, so memory is bounded by one block.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from mmsae.activations import ActivationWriter
from mmsae.artifacts import Files, write_manifest
from mmsae.codes import CODES_SCHEMA, CodesWriter

RESPONSE_TOKENS = 8
IMAGE_TOKEN_ID = 4


def layout(tokens_per_sample: int, images: int, image_tokens: int) -> pd.DataFrame:
    """One sample's tokens (without sample_id / row): position, modality, token_id, is_response, patch,
    image_index."""
    n_image = images * image_tokens
    if n_image > tokens_per_sample - 1 - RESPONSE_TOKENS:
        raise ValueError("images x image_tokens must leave room for BOS and the response")
    pos = np.arange(tokens_per_sample, dtype=np.int32)
    is_image = (pos >= 1) & (pos <= n_image)
    img = np.where(is_image, (pos - 1) // max(image_tokens, 1), -1).astype(np.int16)
    return pd.DataFrame({
        "position": pos,
        "modality": np.where(pos == 0, "special", np.where(is_image, "image", "text")),
        "token_id": np.where(pos == 0, 1, np.where(is_image, IMAGE_TOKEN_ID, 10 + pos % 200)).astype(np.int32),
        "is_response": pos >= tokens_per_sample - RESPONSE_TOKENS,
        "patch": np.where(is_image, (pos - 1) % max(image_tokens, 1), -1).astype(np.int32),
        "image_index": img,
    })


def sample_id(i: int) -> str:
    return f"s{i:08d}"


class CodeDraw:
    """Zipf-distributed latents per token, rank orders per side (see the module docstring)."""

    def __init__(self, d_sae: int, k: int, zipf: float, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        p = 1.0 / np.arange(1, d_sae + 1) ** zipf
        self.cdf = np.cumsum(p / p.sum())
        self.image_order = rng.permutation(d_sae).astype(np.int32)
        text_order = self.image_order.copy()
        moved = np.flatnonzero(rng.random(d_sae) < 0.5)  # half of the ranks get other latents on text
        text_order[moved] = text_order[rng.permutation(moved)]
        self.text_order = text_order
        self.d_sae, self.k, self.seed = d_sae, k, seed

    def draw(self, row0: int, is_image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, feature, activation) of tokens row0 .. row0 + len(is_image) - 1, sorted by (row, feature)."""
        g = np.random.default_rng([self.seed, 2, row0])
        n = len(is_image)
        rank = np.minimum(np.searchsorted(self.cdf, g.random((n, self.k))), self.d_sae - 1)
        feat = np.where(is_image[:, None], self.image_order[rank], self.text_order[rank]).astype(np.int64)
        key = np.unique((np.arange(row0, row0 + n, dtype=np.int64)[:, None] * self.d_sae + feat).ravel())
        act = g.exponential(1.0, len(key)).astype(np.float32) + np.float32(0.01)
        return key // self.d_sae, (key % self.d_sae).astype(np.int32), act


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


def write_samples(path: Path, n_samples: int) -> None:
    png = _png()
    pd.DataFrame({
        "sample_id": [sample_id(i) for i in range(n_samples)],
        "question": ["<image> describe"] * n_samples,
        "image": [png] * n_samples,
        "responses": [["a", "b"]] * n_samples,
        "preferred": [0] * n_samples,
    }).to_parquet(path, index=False)


def write_pool(work: str | Path, n_samples: int, d_in: int, d_sae: int, k: int, *, seed: int = 0,
               tokens_per_sample: int = 1024, images: int = 3, image_tokens: int = 334, zipf: float = 1.0,
               store_dtype: str = "bfloat16", chunk_tokens: int = 8192, part_tokens: int = 1 << 20,
               samples_per_block: int = 16) -> dict[str, int]:
    """work/{extract,encode,sample} for n_samples samples (see the module docstring); their counts."""
    work = Path(work)
    for sub in ("extract", "encode", "sample"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    one = layout(tokens_per_sample, images, image_tokens)
    draw = CodeDraw(d_sae, k, zipf, seed)
    acts = ActivationWriter(work / "extract", [0], d_in, store_dtype, chunk_tokens=chunk_tokens, shard_chunks=8)
    codes = CodesWriter(work / "encode" / Files.CODES, part_tokens)
    gen = torch.Generator().manual_seed(seed)
    n_codes, modality = 0, one["modality"].to_numpy()
    for s0 in range(0, n_samples, samples_per_block):
        m = min(samples_per_block, n_samples - s0)
        row0, n = s0 * tokens_per_sample, m * tokens_per_sample
        ids = np.repeat(np.array([sample_id(i) for i in range(s0, s0 + m)], dtype=object), tokens_per_sample)
        tokens = pd.concat([one] * m, ignore_index=True).assign(sample_id=ids)
        acts.append({0: torch.randn(n, d_in, generator=gen)}, tokens)
        is_image = np.tile(modality == "image", m)
        row, feat, act = draw.draw(row0, is_image)
        local = row - row0
        sid = pa.DictionaryArray.from_arrays(pa.array(local // tokens_per_sample, pa.int32()),
                                             pa.array([sample_id(i) for i in range(s0, s0 + m)]))
        mod_names = np.array(["image", "text", "special"], dtype=object)
        mod_code = np.where(modality == "image", 0, np.where(modality == "text", 1, 2))[local % tokens_per_sample]
        table = pa.table({
            "row": pa.array(row, pa.int64()), "sample_id": sid.cast(pa.string()),
            "position": pa.array((local % tokens_per_sample).astype(np.int32)),
            "modality": pa.DictionaryArray.from_arrays(pa.array(mod_code, pa.int8()), pa.array(mod_names)).cast(pa.string()),
            "feature": pa.array(feat, pa.int32()), "activation": pa.array(act, pa.float32()),
        }, schema=CODES_SCHEMA)
        if codes.needs_new_part():
            codes.start_part(row0, s0)
        codes.write(table, row0 + n, s0 + m)
        n_codes += len(table)
    n_tokens = acts.close()
    parts = codes.close()
    write_samples(work / "sample" / Files.SAMPLES, n_samples)
    counts = {"n_tokens": n_tokens, "n_codes": n_codes, "n_parts": len(parts), "layer": 0, "d_sae": d_sae,
              "n_samples": n_samples, "image_tokens": int(n_samples * images * image_tokens)}
    write_manifest(work / "encode", "encode", {"synthetic": True, "k": k, "zipf": zipf}, {}, counts)
    return counts

