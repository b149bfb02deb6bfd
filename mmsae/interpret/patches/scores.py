"""Patch scores: one forward per image, the SAE codes (or the attention) at every base-grid patch."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsae.activations import LayerCapture
from mmsae.data import Record
from mmsae.errors import InputError
from mmsae.interpret.patches.images import ImageSet
from mmsae.models.adapters import IMAGE, TEXT, ModelAdapter
from mmsae.models.grid import Grid, adapter_grid
from mmsae.scoring.subsets import subset_size

METHODS = ("cosine", "cooc_l0", "l0", "l1", "random", "attention")
SAE_METHODS = ("cosine", "cooc_l0", "l0", "l1")
UNSUPPORTED = {
    "llava_next": "LLaVA-NeXT anyres images are split into tiles whose token count varies per image; "
                  "patch filtering needs one fixed base grid (use a LLaVA-1.5-style model_type 'llava')",
    "chameleon": "Chameleon's image tokens are VQ codes made inside the adapter, not pixel patches; "
                 "patch filtering needs a fixed-grid LLaVA model (model_type 'llava')",
    "qwen2_vl": "Qwen2-VL merges patches on a grid that depends on the image size; "
                "patch filtering needs a fixed-grid LLaVA model (model_type 'llava')",
    "causal_lm": "a text-only model sees no image",
}


def patch_grid(adapter: ModelAdapter) -> Grid:
    """The grid of a fixed-grid LLaVA model; InputError naming the family otherwise."""
    family = getattr(adapter, "family", "?")
    if family != "llava":
        reason = UNSUPPORTED.get(family, f"model family {family!r} has no fixed patch grid")
        raise InputError(adapter.path, "model.path", f"patch filtering is not supported for {family}: {reason}")
    grid = adapter_grid(adapter)
    if grid is None or grid.rows < 1 or grid.cols < 1:
        raise InputError(adapter.path, "model.path", "the model reports no fixed patch grid")
    return grid


def sae_patch_scores(patch_acts: np.ndarray, text_acts: np.ndarray, weights: np.ndarray, delta: float = 0.0,
                     cooccurrence: str = "text", cross_modal: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """l0, l1, cooc_l0, cosine per patch from its SAE codes `patch_acts` [P, F], the prompt's text
    codes `text_acts` [T, F], the cross-modal weights [F] and (cooccurrence 'features') the
    cross-modal mask [F]. See the module docstring."""
    active = patch_acts > delta
    if cooccurrence == "text":
        partner = (text_acts > delta).any(axis=0) if len(text_acts) else np.zeros(patch_acts.shape[1], bool)
    elif cooccurrence == "features":
        if cross_modal is None:
            raise ValueError("cooccurrence 'features' needs the cross-modal mask")
        partner = np.asarray(cross_modal, bool)
    else:
        raise ValueError(f"unknown cooccurrence {cooccurrence!r}")
    cooc = active & partner
    return {
        "l0": active.sum(1).astype(np.float64),
        "l1": np.where(active, patch_acts, 0.0).sum(1, dtype=np.float64),
        "cooc_l0": cooc.sum(1).astype(np.float64),
        "cosine": cooc.astype(np.float64) @ np.asarray(weights, np.float64),
    }


def _image_rng(image_id: str, seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode()), stream])


def random_scores(image_id: str, n: int, seed: int) -> np.ndarray:
    """The random baseline: uniform scores from (seed, image id) alone."""
    return _image_rng(image_id, seed, 0).random(n)


def tiebreak(image_id: str, n: int, seed: int) -> np.ndarray:
    """A seeded random order of the patches (ranks), used to break score ties."""
    return _image_rng(image_id, seed, 1).permutation(n)


def keep_mask(scores: np.ndarray, fraction: float, ties: np.ndarray) -> np.ndarray:
    """bool [P]: the best ceil(fraction * P) patches by (score descending, `ties` ascending)."""
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((np.asarray(ties), -scores))
    keep = np.zeros(len(scores), bool)
    keep[order[: subset_size(fraction, len(scores))]] = True
    return keep


class AttentionRows:
    """Forward hooks on every decoder layer's `self_attn` (eager attention): per sequence b, the
    attention probabilities of query position `last[b]` over all keys, averaged over heads, summed over
    layers. `mean()` divides by the number of layers."""

    def __init__(self, layers: torch.nn.ModuleList, last: torch.Tensor) -> None:
        self.last, self.total, self.n = last, None, 0
        self.handles = [layer.self_attn.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("self_attn returned no attention weights (needs attn_implementation='eager')")
        rows = weights[torch.arange(weights.shape[0], device=weights.device), :, self.last.to(weights.device)]
        part = rows.float().mean(1).cpu()  # [B, T]
        self.total = part if self.total is None else self.total + part
        self.n += 1

    def mean(self) -> torch.Tensor:
        if not self.n:
            raise RuntimeError("no attention layer ran")
        return self.total / self.n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _set_attention(adapter: ModelAdapter, impl: str) -> str:
    """Switch the model's attention implementation; returns the previous one."""
    before = getattr(adapter.model.config, "_attn_implementation", None) or "sdpa"
    if before != impl:
        adapter.model.set_attn_implementation(impl)
    return before


def score_patches(adapter: ModelAdapter, sae: Any, layer: int, images: ImageSet, question: str,
                  weights: np.ndarray, cross_modal: np.ndarray, methods: Sequence[str], delta: float = 0.0,
                  cooccurrence: str = "text", text_modalities: Sequence[str] = (TEXT,), seed: int = 0,
                  batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """One row per (image, grid cell): image_id, patch (row-major cell), row, col, score_<method>."""
    from tqdm import tqdm

    grid = patch_grid(adapter)
    n_cells = grid.cells
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("patch_filter.methods", "methods", f"unknown method {unknown[0]!r}; known: {list(METHODS)}")
    need_sae = any(m in SAE_METHODS for m in methods)
    attention = "attention" in methods
    previous = _set_attention(adapter, "eager") if attention else None
    frames = []
    bar = tqdm(total=len(images), unit="image", desc="score patches", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    try:
        for start in range(0, len(images), batch_size):
            ids = images.ids[start : start + batch_size]
            records = [Record(i, question, im, [], -1) for i, im in zip(ids, images.images[start : start + batch_size], strict=True)]
            with torch.inference_mode():
                inputs, meta = adapter.build_batch(records, include_response=False)
                last = torch.from_numpy(meta.attention_mask.sum(1) - 1)
                capture = LayerCapture(adapter.decoder_layers(), [layer], stop_after_last=not attention)
                attn = AttentionRows(adapter.decoder_layers(), last) if attention else None
                try:
                    states = capture.run(lambda inputs=inputs: adapter.forward(inputs), None)[layer]
                finally:
                    capture.remove()
                    if attn is not None:
                        attn.remove()
                attn_mean = attn.mean().numpy() if attn is not None else None
            for b, image_id in enumerate(ids):
                real = meta.attention_mask[b]
                img_pos = np.nonzero((meta.modality[b] == IMAGE) & real)[0]
                cell, spatial = grid.cell_index(meta.patch[b, img_pos])
                img_pos, cell = img_pos[spatial], cell[spatial]
                if not np.array_equal(cell, np.arange(n_cells)):
                    raise InputError(adapter.path, "model.path",
                                     f"image {image_id!r}: {len(meta.patch[b][meta.patch[b] >= 0])} image tokens do not "
                                     f"form the {grid.rows}x{grid.cols} grid (+{grid.first}) the model config declares")
                row, col = grid.row_col(cell)
                out: dict[str, Any] = {"image_id": image_id, "patch": cell.astype(np.int32),
                                       "row": row.astype(np.int32), "col": col.astype(np.int32)}
                if need_sae:
                    txt_pos = np.nonzero(np.isin(meta.modality[b], list(text_modalities)) & real)[0]
                    dev = sae.W_enc.device
                    with torch.inference_mode():
                        codes = sae.encode(states[b, torch.from_numpy(np.r_[img_pos, txt_pos])].to(dev, sae.W_enc.dtype)).float().cpu().numpy()
                    sae_scores = sae_patch_scores(codes[: len(img_pos)], codes[len(img_pos):], weights, delta,
                                                  cooccurrence, cross_modal)
                for m in methods:
                    if m in SAE_METHODS:
                        out[f"score_{m}"] = sae_scores[m]
                    elif m == "random":
                        out[f"score_{m}"] = random_scores(image_id, n_cells, seed)
                    else:
                        out[f"score_{m}"] = attn_mean[b, img_pos].astype(np.float64)
                frames.append(pd.DataFrame(out))
            bar.update(len(ids))
    finally:
        bar.close()
        if previous is not None:
            _set_attention(adapter, previous)
    return pd.concat(frames, ignore_index=True)
