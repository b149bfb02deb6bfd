"""Which features to explain, and where they fire on images: activation maps over the patch grid, the
activation mask, the masked images the explainer sees."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from mmsae.activations.store import image_index
from mmsae.artifacts import MANIFEST, Files, read_manifest
from mmsae.errors import InputError
from mmsae.features import Codes, iter_codes, require_columns
from mmsae.models.grid import Grid, token_grid, upsample


def select_features(features: pd.DataFrame, top_n: int, explicit: Sequence[int] | None = None) -> list[int]:
    """An explicit list as given (each must be in features.parquet), else the top_n cross-modal
    features by weight (ties by feature id)."""
    require_columns(Files.FEATURES, list(features.columns), ("feature", "class", "weight"))
    if explicit:
        missing = sorted(set(int(f) for f in explicit) - set(features["feature"].astype(int)))
        if missing:
            raise InputError(Files.FEATURES, "explain.features", f"feature(s) {missing[:10]} not in features.parquet")
        return [int(f) for f in dict.fromkeys(explicit)]
    cross = features[features["class"] == "cross-modal"].assign(_w=lambda d: d["weight"].astype("float64"))
    if cross.empty:
        raise InputError(Files.FEATURES, "class", "no cross-modal feature to explain (give explain.features)")
    cross = cross.sort_values(["_w", "feature"], ascending=[False, True], kind="stable")
    return [int(f) for f in cross["feature"].head(top_n)]


def image_grid(extract: str | os.PathLike, tokens: pd.DataFrame) -> Grid:
    """The grid from extract's manifest (counts.image_grid), else a square one from tokens.parquet."""
    grid = None
    if (Path(extract) / MANIFEST).exists():
        counts = read_manifest(extract).get("counts", {})
        if "image_grid" in counts:
            grid = counts["image_grid"]
            if grid is None:  # Qwen2-VL-style: the number of image tokens varies per image
                raise InputError(Path(extract) / MANIFEST, "counts.image_grid",
                                 "the model has no fixed patch grid; activation masks need one")
            return Grid.from_dict(grid)
    return token_grid(tokens)


def image_activations(codes: Codes, tokens: pd.DataFrame, features: Sequence[int], grid: Grid) -> pd.DataFrame:
    """feature, sample_id, cell, activation: the codes of `features` on image tokens inside the grid
    (streamed; memory is bounded by the selected features' image activations)."""
    require_columns(Files.TOKENS, list(tokens.columns), ("row", "sample_id", "modality", "patch"))
    n_rows = int(tokens["row"].max()) + 1 if len(tokens) else 0
    # the first image of each sample: the one shown (read_images); later images' patches are not its cells
    img = tokens[(tokens["modality"] == "image").to_numpy() & (image_index(tokens) == 0)]
    cell, ok = grid.cell_index(img["patch"].to_numpy(np.int64))
    cell_of = np.full(n_rows, -1, np.int64)
    cell_of[img["row"].to_numpy(np.int64)[ok]] = cell[ok]
    sample_ids, sample_codes = pd.factorize(tokens["sample_id"].astype(str))
    sample_codes = np.asarray(sample_codes, dtype=object)
    sample_of = np.full(n_rows, -1, np.int64)
    sample_of[tokens["row"].to_numpy(np.int64)] = sample_ids
    feats = np.asarray(sorted(set(int(f) for f in features)), np.int64)
    parts = []
    for b in iter_codes(codes, ("row", "feature", "activation")):
        r = b["row"].astype(np.int64)
        m = np.isin(b["feature"].astype(np.int64), feats) & (r >= 0) & (r < n_rows)
        r = r[m]
        c = cell_of[r]
        keep = (c >= 0) & (sample_of[r] >= 0)
        parts.append(pd.DataFrame({"feature": b["feature"][m][keep].astype(np.int64),
                                   "sample_id": sample_codes[sample_of[r[keep]]],
                                   "cell": c[keep], "activation": b["activation"][m][keep].astype(np.float32)}))
    cols = ["feature", "sample_id", "cell", "activation"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def top_images(acts: pd.DataFrame, n: int, rank: str, grid: Grid,
               allowed: set[str] | None = None) -> dict[int, list[str]]:
    """feature -> its top n sample ids by max (or mean over all grid cells) image activation; ties by id."""
    if rank not in ("max", "mean"):
        raise ValueError(f"unknown image rank {rank!r}")
    a = acts if allowed is None else acts[acts["sample_id"].isin(allowed)]
    g = a.groupby(["feature", "sample_id"])["activation"]
    per = (g.max() if rank == "max" else g.sum() / grid.cells).rename("score").reset_index()
    per = per.sort_values(["feature", "score", "sample_id"], ascending=[True, False, True], kind="stable")
    return {int(f): list(d["sample_id"].head(n)) for f, d in per.groupby("feature", sort=True)}


def reference_activations(acts: pd.DataFrame) -> dict[int, float]:
    """feature -> its highest image-token activation (the activation mask's reference)."""
    return {int(f): float(v) for f, v in acts.groupby("feature")["activation"].max().items()}


def activation_index(acts: pd.DataFrame) -> dict[tuple[int, str], np.ndarray]:
    """(feature, sample_id) -> positions in `acts`: built once, so each map is not a full scan."""
    return acts.groupby(["feature", "sample_id"]).indices if len(acts) else {}


def activation_grid(acts: pd.DataFrame, feature: int, sample_id: str, grid: Grid,
                    index: Mapping[tuple[int, str], np.ndarray] | None = None) -> np.ndarray:
    """float32 [rows, cols]: the feature's activation per cell of one image (0 where not active)."""
    if index is None:
        pos = np.flatnonzero((acts["feature"] == feature).to_numpy() & (acts["sample_id"] == sample_id).to_numpy())
    else:
        pos = index.get((feature, sample_id), np.zeros(0, np.int64))
    out = np.zeros(grid.cells, np.float32)
    out[acts["cell"].to_numpy(np.int64)[pos]] = acts["activation"].to_numpy(np.float32)[pos]
    return out.reshape(grid.rows, grid.cols)


def activation_mask(cells: np.ndarray, ref: float, threshold: float) -> np.ndarray:
    """bool cells: activation > 0 and >= threshold x ref (the feature's highest image activation)."""
    return (cells > 0) & (cells >= threshold * ref)


def masked_image(image: Image.Image, mask: np.ndarray, dim: float) -> Image.Image:
    """The image with pixels outside `mask` multiplied by `dim` (0 = black)."""
    arr = np.asarray(image.convert("RGB"), np.float32)
    scale = np.where(mask, 1.0, float(dim))[..., None]
    return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image, min_side: int = 0) -> bytes:
    """PNG of `image`, upscaled (nearest, so patch edges stay sharp) until its short side >= min_side."""
    short = min(image.size)
    if min_side and short < min_side:
        f = math.ceil(min_side / short)
        image = image.resize((image.width * f, image.height * f), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_images(samples: str | os.PathLike, ids: Sequence[str]) -> dict[str, Image.Image]:
    """sample_id -> decoded RGB image, for the given ids that have an image."""
    path = Path(samples) / Files.SAMPLES
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    want = sorted(set(map(str, ids)))
    table = pq.read_table(path, columns=["sample_id", "image"], filters=[("sample_id", "in", want)] if want else None)
    out = {}
    for sid, blob in zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist(), strict=True):
        if blob is None:
            continue
        try:
            out[str(sid)] = Image.open(io.BytesIO(blob)).convert("RGB")
        except Exception as exc:  # Pillow raises many types for bad bytes
            raise InputError(path, "image", f"sample {sid}: undecodable image ({exc.__class__.__name__})") from exc
    return out


def feature_images(tops: Mapping[int, Sequence[str]], acts: pd.DataFrame, refs: Mapping[int, float],
                   images: Mapping[str, Image.Image], grid: Grid, threshold: float, dim: float,
                   center_crop: bool = False, min_side: int = 0) -> dict[int, list[tuple[str, bytes]]]:
    """feature -> [(sample_id, PNG of its masked image)] over its top images that have an image."""
    out: dict[int, list[tuple[str, bytes]]] = {}
    index = activation_index(acts)
    for f, ids in tops.items():
        views = []
        for sid in ids:
            img = images.get(sid)
            if img is None:
                continue
            cells = activation_mask(activation_grid(acts, f, sid, grid, index), refs.get(f, 0.0), threshold)
            views.append((sid, png_bytes(masked_image(img, upsample(cells, img.width, img.height, center_crop), dim),
                                         min_side)))
        out[int(f)] = views
    return out
