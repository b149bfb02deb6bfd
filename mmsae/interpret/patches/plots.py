"""Figures: accuracy against the kept fraction, and the model's masked inputs for a few images."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from mmsae.data import Record
from mmsae.interpret.patches.classify import UNMASKED, black_pixel, masked_batch, views_of
from mmsae.interpret.patches.images import ImageSet
from mmsae.interpret.patches.scores import patch_grid
from mmsae.models.adapters import ModelAdapter


def plot_accuracy(accuracy: pd.DataFrame, chance: float, path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against the kept fraction, one line per method from the unmasked point at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    base = accuracy[accuracy["method"] == UNMASKED]
    full = float(base["accuracy"].iloc[0]) if len(base) else None
    for m in [m for m in dict.fromkeys(accuracy["method"]) if m != UNMASKED]:
        part = accuracy[accuracy["method"] == m].sort_values("fraction", ascending=False)
        x, y = part["fraction"].tolist(), part["accuracy"].tolist()
        if full is not None:
            x, y = [1.0, *x], [full, *y]
        ax.plot(x, y, marker="o", label=m)
    if full is not None:
        ax.axhline(full, color="#555555", lw=0.8, ls=":", label="unmasked")
    ax.axhline(chance, color="#999999", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("kept fraction of patches")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.invert_xaxis()
    ax.set_title(title or "image-patch filtering", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _displayable(adapter: ModelAdapter, pixel_values: torch.Tensor) -> np.ndarray:
    """[H, W, 3] in [0, 1]: the processor's normalisation undone (black stays black), else min-max."""
    x = pixel_values.float().cpu()
    ip = adapter.processor.image_processor
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if getattr(ip, "do_normalize", False) and mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_examples(adapter: ModelAdapter, images: ImageSet, scores: pd.DataFrame, methods: Sequence[str],
                  fraction: float, seed: int, path: str | os.PathLike, n: int = 3) -> None:
    """The model's input for the first `n` images: unmasked, then each method at `fraction`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, fill = patch_grid(adapter), black_pixel(adapter)
    n = min(n, len(images))
    cols = ["unmasked", *methods]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.7 * n), squeeze=False)
    for i in range(n):
        image_id = images.ids[i]
        views = views_of(image_id, scores[scores["image_id"] == image_id].sort_values("patch"), methods, [fraction], seed)
        recs = [Record(image_id, "?", images.images[i], [], -1)] * len(views)
        with torch.inference_mode():
            inputs, _ = masked_batch(adapter, recs, views, grid, fill, include_response=False)
        for j, ax in enumerate(axes[i]):
            ax.imshow(_displayable(adapter, inputs["pixel_values"][j]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{images.labels[i]}", fontsize=8)
    fig.suptitle(f"kept {fraction:.0%} of patches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
