"""Concept masks for the IoU score: toy-world ground truth from the samples' objects, or a segmenter's
masks parquet."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from mmsae.artifacts import Files
from mmsae.data.toyvocab import COLOURS, SHAPES
from mmsae.data.toyworld import object_mask
from mmsae.errors import InputError
from mmsae.features import read_columns, require_columns


def _word_plural(label: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])" + re.escape(label.lower()) + r"(?:e?s)?(?![a-z0-9])")


class ToyMasks:
    """Ground-truth concept masks of the toy world from the samples' `objects` (colour, shape, bbox)."""

    def __init__(self, samples: pd.DataFrame) -> None:
        require_columns(Files.SAMPLES, list(samples.columns), ("sample_id", "objects"))
        noise = samples["corruption"].astype("string").eq("noise_image").fillna(False) \
            if "corruption" in samples.columns else pd.Series(False, index=samples.index)
        self.objects: dict[str, list[dict]] = {}
        for sid, obj, is_noise in zip(samples["sample_id"].astype(str), samples["objects"], noise, strict=True):
            if obj is None or (isinstance(obj, float) and math.isnan(obj)):
                continue
            self.objects[sid] = [] if is_noise else json.loads(obj)  # a noise image shows none of its objects
        self.covered = set(self.objects)

    @staticmethod
    def concepts(explanation: str) -> tuple[list[str], list[str]]:
        text = (explanation or "").lower()
        colours = [c for c in COLOURS if _word_plural(c).search(text)]
        shapes = [s for s in SHAPES if _word_plural(s).search(text)]
        return colours, shapes

    def labels(self, feature: int, explanation: str) -> list[str]:
        colours, shapes = self.concepts(explanation)
        return colours + shapes

    def mask(self, sample_id: str, feature: int, explanation: str, size: tuple[int, int]) -> np.ndarray | None:
        """bool [H, W] of the objects matching every named kind (colour, shape); None if not covered."""
        if sample_id not in self.objects:
            return None
        colours, shapes = self.concepts(explanation)
        if not colours and not shapes:
            return np.zeros((size[1], size[0]), bool)
        objs = [o for o in self.objects[sample_id]
                if (not colours or o["colour"] in colours) and (not shapes or o["shape"] in shapes)]
        if size[0] != size[1]:
            raise InputError(Files.SAMPLES, "objects", f"sample {sample_id}: toy-world masks need square images")
        return object_mask(objs, size[0])


class FileMasks:
    """Concept masks from a segmenter's parquet: sample_id, concept, mask (PNG) or box, optional feature."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "path", "file does not exist")
        try:
            names = pq.read_schema(self.path).names
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise InputError(self.path, "file", f"not a parquet file ({exc.__class__.__name__})") from exc
        require_columns(self.path, names, ("sample_id", "concept"))
        if "mask" not in names and "box" not in names:
            raise InputError(self.path, "mask", "missing column: give 'mask' (PNG bytes) or 'box' ([x0, y0, x1, y1])")
        df = read_columns(self.path, [c for c in ("sample_id", "concept", "mask", "box", "feature") if c in names])
        self.rows: list[dict[str, Any]] = []
        for i, r in enumerate(df.to_dict("records")):
            sid, concept = r.get("sample_id"), r.get("concept")
            if sid is None or not isinstance(concept, str) or not concept.strip():
                raise InputError(self.path, "concept", f"row {i}: sample_id and a non-empty concept are required")
            mask, box = r.get("mask"), r.get("box")
            entry = {"sample_id": str(sid), "concept": concept.strip(), "pattern": _word_plural(concept.strip()),
                     "feature": None if pd.isna(r.get("feature", None)) else int(r["feature"]), "mask": None, "box": None}
            if mask is not None and not (isinstance(mask, float) and math.isnan(mask)):
                try:
                    entry["mask"] = np.asarray(Image.open(io.BytesIO(mask)).convert("L")) > 0
                except Exception as exc:
                    raise InputError(self.path, "mask", f"row {i} (sample {sid}): not a decodable image "
                                                        f"({exc.__class__.__name__})") from exc
            elif box is not None and not (isinstance(box, float) and math.isnan(box)):
                b = list(box)
                if len(b) != 4 or not all(isinstance(v, int | float | np.integer | np.floating) for v in b) \
                        or b[2] < b[0] or b[3] < b[1]:
                    raise InputError(self.path, "box", f"row {i} (sample {sid}): expected [x0, y0, x1, y1] with x0 <= x1, y0 <= y1")
                entry["box"] = [int(round(float(v))) for v in b]
            else:
                raise InputError(self.path, "mask", f"row {i} (sample {sid}): neither mask nor box given")
            self.rows.append(entry)
        self.covered = {r["sample_id"] for r in self.rows}
        self._by_sample: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            self._by_sample.setdefault(r["sample_id"], []).append(r)

    def _matches(self, r: dict[str, Any], feature: int, explanation: str) -> bool:
        return (r["feature"] is None or r["feature"] == feature) and bool(r["pattern"].search((explanation or "").lower()))

    def labels(self, feature: int, explanation: str) -> list[str]:
        return sorted({r["concept"] for r in self.rows if self._matches(r, feature, explanation)})

    def mask(self, sample_id: str, feature: int, explanation: str, size: tuple[int, int]) -> np.ndarray | None:
        if sample_id not in self.covered:
            return None
        width, height = size
        out = np.zeros((height, width), bool)
        for r in self._by_sample[sample_id]:
            if not self._matches(r, feature, explanation):
                continue
            if r["mask"] is not None:
                if r["mask"].shape != (height, width):
                    raise InputError(self.path, "mask", f"sample {sample_id}, concept {r['concept']!r}: mask is "
                                     f"{r['mask'].shape[1]}x{r['mask'].shape[0]}, the image {width}x{height}")
                out |= r["mask"]
            else:
                x0, y0, x1, y1 = r["box"]
                out[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
        return out


def read_mask_samples(samples: str | os.PathLike) -> pd.DataFrame:
    """samples.parquet without images (sample_id and the ground-truth columns that exist)."""
    path = Path(samples) / Files.SAMPLES
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    names = pq.read_schema(path).names
    return pd.read_parquet(path, columns=[c for c in ("sample_id", "objects", "corruption") if c in names])
