"""The image patch grid: which image tokens are which patches, and where a patch lies in pixels.

A model with a fixed grid numbers the image tokens of each image of a sample 0, 1, ... (BatchMeta.patch,
the `patch` column of tokens.parquet; `image_index` says which image); token `first + r * cols + c` is cell (r, c) of the base grid,
row-major (`first` = 1 when a CLS feature comes first). Tokens before `first` or past the grid
(LLaVA-NeXT tiles and newlines) are no cell. `ModelAdapter.image_grid()` reports the grid as a dict
{rows, cols, first} (None where it is not fixed, e.g. Qwen2-VL); `adapter_grid` turns it into a
`Grid`. Where only tokens are at hand, `token_grid` infers a square grid from them.

Pixels: a grid covers an image (or its centre square, `crop_box`) in equal cells; `pixel_boxes`
gives each cell's exact box (a ViT's patches), `upsample` spreads per-cell values over the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import require_columns


@dataclass(frozen=True)
class Grid:
    """The base patch grid: image token with patch index `first + r * cols + c` is cell (r, c)."""

    rows: int
    cols: int
    first: int = 0

    @classmethod
    def from_dict(cls, grid: Mapping[str, Any]) -> Grid:
        """From an adapter's / a manifest's {rows, cols, first} (first defaults to 0)."""
        return cls(int(grid["rows"]), int(grid["cols"]), int(grid.get("first", 0)))

    def as_dict(self) -> dict[str, int]:
        """{rows, cols, first}: the form adapters report and manifests store."""
        return {"rows": self.rows, "cols": self.cols, "first": self.first}

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def span(self) -> int:
        """Image tokens a sample needs to cover the grid: `first` + one per cell."""
        return self.first + self.cells

    def cell_index(self, patch: Any) -> tuple[np.ndarray, np.ndarray]:
        """(cell, inside): int64 cell index `patch - first` of image-token patch indices, and whether
        each lies on the grid (0 <= cell < rows * cols)."""
        cell = np.asarray(patch, np.int64) - self.first
        return cell, (cell >= 0) & (cell < self.cells)

    def row_col(self, cell: Any) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) of row-major cell indices."""
        cell = np.asarray(cell, np.int64)
        return cell // self.cols, cell % self.cols

    def pixel_boxes(self, height: int, width: int) -> np.ndarray:
        """pixel_boxes of this grid's rows x cols over an H x W image."""
        return pixel_boxes(self.rows, self.cols, height, width)


def square_side(n: int) -> int | None:
    """The side of an n-cell square grid (n >= 0); None when n is not a square."""
    side = math.isqrt(n)
    return side if side * side == n else None


def adapter_grid(adapter: Any) -> Grid | None:
    """The grid `adapter.image_grid()` reports, or None where the model has no fixed grid."""
    grid = adapter.image_grid()
    return Grid.from_dict(grid) if grid else None


def token_grid(tokens: pd.DataFrame) -> Grid:
    """A square grid from tokens.parquet: image tokens per image (max patch index + 1) must be a square."""
    require_columns(Files.TOKENS, list(tokens.columns), ("modality", "patch"))
    patches = tokens.loc[tokens["modality"] == "image", "patch"]
    if len(patches) == 0:
        raise InputError(Files.TOKENS, "patch", "no image tokens")
    n = int(patches.max()) + 1
    side = square_side(n)
    if side is None:
        raise InputError(Files.TOKENS, "patch", f"{n} image tokens per image is not a square grid")
    return Grid(side, side)


def pixel_boxes(rows: int, cols: int, height: int, width: int) -> np.ndarray:
    """[rows * cols, 4] pixel boxes (x0, y0, x1, y1), end-exclusive, of the row-major grid cells over an
    H x W image; the grid must divide the image exactly (as a ViT's patches do)."""
    if height % rows or width % cols:
        raise ValueError(f"a {rows}x{cols} patch grid does not divide a {height}x{width} image")
    ph, pw = height // rows, width // cols
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c * pw, r * ph, (c + 1) * pw, (r + 1) * ph], axis=1).astype(np.int64)


def crop_box(width: int, height: int, center_crop: bool) -> tuple[int, int, int, int]:
    """The pixel region the patch grid covers: the whole image, or its centre square (CLIP's crop)."""
    if not center_crop:
        return 0, 0, width, height
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def upsample(cells: np.ndarray, width: int, height: int, center_crop: bool = False) -> np.ndarray:
    """bool [height, width]: each pixel takes the value of the grid cell it falls in (nearest);
    with center_crop the grid covers the centre square and the margins are False."""
    x0, y0, x1, y1 = crop_box(width, height, center_crop)
    rows, cols = cells.shape
    ys = (np.arange(y1 - y0) * rows) // (y1 - y0)
    xs = (np.arange(x1 - x0) * cols) // (x1 - x0)
    out = np.zeros((height, width), bool)
    out[y0:y1, x0:x1] = np.asarray(cells, bool)[ys[:, None], xs[None, :]]
    return out


__all__ = ["Grid", "adapter_grid", "crop_box", "pixel_boxes", "square_side", "token_grid", "upsample"]
