"""The image patch grid (mmsae.models.grid): token -> cell -> pixels, and the grids it is read from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import build_tiny_llava

from mmsae.errors import InputError
from mmsae.models import LlavaAdapter
from mmsae.models.grid import Grid, adapter_grid, crop_box, pixel_boxes, square_side, token_grid, upsample


def test_cells_rows_cols_and_dict_form():
    g = Grid(2, 3, first=1)
    assert g.cells == 6 and g.span == 7
    cell, inside = g.cell_index([0, 1, 6, 7])  # a CLS token before the grid, tile tokens after it
    assert cell.tolist() == [-1, 0, 5, 6] and inside.tolist() == [False, True, True, False]
    rows, cols = g.row_col([0, 2, 3, 5])
    assert rows.tolist() == [0, 0, 1, 1] and cols.tolist() == [0, 2, 0, 2]
    assert g.as_dict() == {"rows": 2, "cols": 3, "first": 1} and Grid.from_dict(g.as_dict()) == g
    assert Grid.from_dict({"rows": 4, "cols": 4}) == Grid(4, 4, 0)
    assert vars(g) == g.as_dict()  # the browser's manifest stores vars(grid)


def test_square_side_and_token_grid():
    assert [square_side(n) for n in (0, 1, 16, 576, 15)] == [0, 1, 4, 24, None]
    tokens = pd.DataFrame({"modality": ["text", *["image"] * 4], "patch": [-1, 0, 1, 2, 3]})
    assert token_grid(tokens) == Grid(2, 2)
    with pytest.raises(InputError, match="not a square grid"):
        token_grid(tokens.iloc[:4])
    with pytest.raises(InputError, match="no image tokens"):
        token_grid(tokens.iloc[:1])


def test_adapter_grid():
    model, proc = build_tiny_llava()
    assert adapter_grid(LlavaAdapter(model, proc)) == Grid(4, 4, 0)

    class NoGrid:
        def image_grid(self):
            return None

    assert adapter_grid(NoGrid()) is None


def test_pixel_boxes_toy_llava_and_rectangular_grids():
    toy = pixel_boxes(4, 4, 32, 32)
    assert toy.shape == (16, 4)
    np.testing.assert_array_equal(toy[0], [0, 0, 8, 8])
    np.testing.assert_array_equal(toy[5], [8, 8, 16, 16])  # row 1, col 1
    np.testing.assert_array_equal(toy[7], [24, 8, 32, 16])  # row 1, col 3
    llava = pixel_boxes(24, 24, 336, 336)
    np.testing.assert_array_equal(llava[25], [14, 14, 28, 28])
    np.testing.assert_array_equal(llava[575], [322, 322, 336, 336])
    np.testing.assert_array_equal(pixel_boxes(2, 3, 4, 9)[4], [3, 2, 6, 4])
    with pytest.raises(ValueError, match="does not divide"):
        pixel_boxes(24, 24, 330, 336)


def test_upsample_nearest_and_center_crop():
    assert crop_box(6, 4, False) == (0, 0, 6, 4) and crop_box(6, 4, True) == (1, 0, 5, 4)
    cells = np.array([[1, 0], [0, 1]], bool)
    up = upsample(cells, 4, 4)
    assert up[:2, :2].all() and up[2:, 2:].all() and not up[:2, 2:].any() and not up[2:, :2].any()
    # 6 wide x 4 high, centre crop: the grid covers x in [1, 5); the margins are outside
    up = upsample(cells, 6, 4, center_crop=True)
    assert not up[:, 0].any() and not up[:, 5].any()
    assert up[0:2, 1:3].all() and up[2:4, 3:5].all() and up.sum() == 8
    # a 3-pixel image over a 2-cell grid: pixels 0, 1 -> cell 0, pixel 2 -> cell 1
    assert upsample(np.array([[1, 0]], bool), 3, 1).tolist() == [[True, True, False]]


