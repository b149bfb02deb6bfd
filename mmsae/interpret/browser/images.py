"""The browser's images: the square each sample shows, the per-patch heat veil over it, the activation
histograms."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

from mmsae.artifacts import Files

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from mmsae.display import MODALITY_COLOURS  # noqa: E402
from mmsae.errors import InputError  # noqa: E402
from mmsae.features import require_columns  # noqa: E402
from mmsae.interpret.browser.data import MODS  # noqa: E402
from mmsae.interpret.browser.pages import image_name  # noqa: E402
from mmsae.models.grid import Grid, crop_box  # noqa: E402

VEIL_RGB = (16, 16, 24)
VEIL_MAX_ALPHA = 190  # a silent patch stays faintly visible


def square_view(data: bytes, size: int) -> Image.Image:
    """The centre square of an encoded image (what a CLIP-style processor crops), `size` px a side;
    nearest-neighbour when enlarging so small images stay crisp."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = crop_box(*img.size, center_crop=True)
    side = box[2] - box[0]
    img = img.crop(box)
    return img.resize((size, size), Image.Resampling.NEAREST if side <= size else Image.Resampling.LANCZOS)


def write_images(samples: str | os.PathLike, ids: list[str], keys: list[tuple[int, int]], folder: Path,
                 size: int) -> dict[tuple[int, int], str]:
    """img/{s}.png (img/{s}_{k}.png for image k > 0 of a multi-image sample) for each shown (sample s,
    image k) that has that image; returns {(s, k): question} for those written."""
    path = Path(samples)
    if not ids:
        return {}
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    names = pq.read_schema(path).names
    require_columns(path, names, ("sample_id", "question", "image"))
    columns = ["sample_id", "question", "image", *(["extra_images"] if "extra_images" in names else [])]
    table = pq.read_table(path, columns=columns, filters=[("sample_id", "in", sorted(set(ids)))])
    by_id = {row[0]: (row[1], [row[2], *((row[3] or []) if len(row) > 3 else [])])
             for row in zip(*(table.column(c).to_pylist() for c in columns), strict=True)}
    written = {}
    for sid, (s, k) in zip(ids, keys, strict=True):
        if sid not in by_id:
            raise InputError(path, "sample_id", f"sample {sid!r} of the token index is not in samples.parquet")
        question, images = by_id[sid]
        data = images[k] if 0 <= k < len(images) else None
        if data is None:
            continue
        try:
            square_view(data, size).save(folder / f"{image_name(s, k)}.png", optimize=True)
        except OSError as exc:
            raise InputError(path, "image", f"sample {sid!r}: image {k + 1}: undecodable image "
                             f"({exc.__class__.__name__})") from exc
        written[(s, k)] = question or ""
    return written


def check_grid(tokens: pd.DataFrame, sample_of_row: np.ndarray, grid: Grid) -> None:
    """Every image (of a sample: `image_index`) must have at least the model's base grid of tokens."""
    image = (tokens["modality"] == "image").to_numpy()
    if not image.any():
        return
    which = tokens["image_index"].to_numpy(np.int64)[image] if "image_index" in tokens.columns else 0
    n_images = int(np.max(which)) + 1
    per_sample = np.bincount(sample_of_row[image] * n_images + which)
    per_sample = per_sample[per_sample > 0]
    if per_sample.min() < grid.span:
        raise InputError(Files.TOKENS, "patch", f"an image has {per_sample.min()} image tokens, fewer than the "
                         f"model's {grid.rows}x{grid.cols} patch grid (+{grid.first}) needs: wrong --model?")


def patch_heat(patches: np.ndarray, acts: np.ndarray, grid: Grid, top: float) -> np.ndarray:
    """[rows, cols] activation / top per grid cell from (image-token index, activation) pairs; image
    tokens outside the base grid (LLaVA-NeXT tiles, a CLS feature) are left out."""
    heat = np.zeros(grid.cells, np.float64)
    cell, ok = grid.cell_index(patches)
    heat[cell[ok]] = np.asarray(acts, np.float64)[ok] / (top if top > 0 else 1.0)
    return np.clip(heat, 0.0, 1.0).reshape(grid.rows, grid.cols)


def heat_png(heat: np.ndarray, path: Path) -> None:
    rgba = np.zeros((*heat.shape, 4), np.uint8)
    rgba[..., :3] = VEIL_RGB
    rgba[..., 3] = np.round((1.0 - heat) * VEIL_MAX_ALPHA).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)


class Histograms:
    """Activation histograms per modality (step lines, log counts) as PNG files.

    One figure and one line per modality, reused for every feature (only data, limits and labels
    change): building and laying out a fresh figure per feature made this the slowest part."""

    def __init__(self) -> None:
        from matplotlib.ticker import NullLocator

        self.fig, self.ax = plt.subplots(figsize=(4.5, 2.4), dpi=80)
        self.fig.subplots_adjust(left=0.14, right=0.98, bottom=0.2, top=0.96)
        self.lines = {m: self.ax.stairs([1.0], [0.0, 1.0], color=MODALITY_COLOURS[m], linewidth=1.4, label=m)
                      for m in MODS}
        self.ax.set_yscale("log")
        self.ax.yaxis.set_minor_locator(NullLocator())
        self.ax.set_xlabel("activation", fontsize=8)
        self.ax.set_ylabel("tokens", fontsize=8)
        self.ax.tick_params(labelsize=7)

    def save(self, counts: np.ndarray, top: float, path: Path) -> None:
        edges = np.linspace(0.0, top, counts.shape[1] + 1)
        shown = []
        for i, m in enumerate(MODS):
            n = int(counts[i].sum())
            self.lines[m].set_data(np.where(counts[i] > 0, counts[i], np.nan), edges)  # log axis: no zeros
            self.lines[m].set_visible(n > 0)
            self.lines[m].set_label(f"{m} ({n})")
            if n:
                shown.append(self.lines[m])
        self.ax.set_xlim(0.0, top)
        self.ax.set_ylim(0.7, max(2.0, float(counts.max()) * 1.5))
        self.ax.legend(handles=shown, fontsize=7)
        self.fig.savefig(path, format="png")

    def close(self) -> None:
        plt.close(self.fig)
