"""Scoring: IoU of the explanation's segmentation with the activation mask, on the feature's top images
vs random images."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mmsae.artifacts import Files, read_manifest
from mmsae.features import require_columns
from mmsae.interpret.explain.activations import (
    activation_grid,
    activation_index,
    activation_mask,
    image_activations,
    image_grid,
    read_images,
    reference_activations,
    top_images,
)
from mmsae.interpret.explain.masks import FileMasks, ToyMasks, read_mask_samples
from mmsae.interpret.explain.tables import SCORE_SCHEMA
from mmsae.models.grid import Grid, upsample


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b|; NaN when both are empty (nothing to agree on)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes {a.shape} and {b.shape} differ")
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else math.nan


def random_images(pool: Sequence[str], n: int, seed: int, exclude: set[str]) -> list[str]:
    """n ids from `pool` not in `exclude`, in a seeded order shared by every feature."""
    order = np.random.default_rng(seed).permutation(len(pool))
    out = []
    for i in order:
        if pool[i] not in exclude:
            out.append(pool[i])
            if len(out) == n:
                break
    return out


def score_explanations(explanations: pd.DataFrame, masks: ToyMasks | FileMasks, acts: pd.DataFrame,
                       images: Mapping[str, Image.Image], grid: Grid, refs: Mapping[int, float], threshold: float,
                       random_pool: Sequence[str], n_random: int, seed: int, center_crop: bool = False) -> pd.DataFrame:
    """Per explained feature: IoU of its explanation's mask with its activation mask on each of its top
    images (explanations.image_samples) and on n_random random images; means over the scored pairs."""
    require_columns(Files.EXPLANATIONS, list(explanations.columns), ("feature", "explanation", "image_samples"))
    rows = []
    index = activation_index(acts)
    for r in explanations.itertuples(index=False):
        f, text = int(r.feature), r.explanation
        if text is None or (isinstance(text, float) and math.isnan(text)):
            continue  # a failed request has nothing to score
        tops = [str(s) for s in (r.image_samples if r.image_samples is not None else [])]
        rand = random_images(random_pool, n_random, seed, set(tops))

        def each(ids: Sequence[str], f: int = f, text: str = text) -> list[float]:
            vals = []
            for sid in ids:
                img = images.get(sid)
                if img is None:
                    continue
                seg = masks.mask(sid, f, text, img.size)
                if seg is None:
                    continue
                act = upsample(activation_mask(activation_grid(acts, f, sid, grid, index), refs.get(f, 0.0), threshold),
                               img.width, img.height, center_crop)
                vals.append(iou(seg, act))
            return vals

        top_iou, rand_iou = each(tops), each(rand)
        mt, mr = _nanmean(top_iou), _nanmean(rand_iou)
        rows.append({"feature": f, "explanation": text, "concepts": masks.labels(f, text),
                     "n_top": int(np.isfinite(top_iou).sum()) if top_iou else 0, "iou_top": mt,
                     "n_random": int(np.isfinite(rand_iou).sum()) if rand_iou else 0, "iou_random": mr,
                     "iou_gain": mt - mr, "iou_top_each": top_iou, "iou_random_each": rand_iou})
    return pd.DataFrame(rows, columns=SCORE_SCHEMA.names)


def _nanmean(x: Sequence[float]) -> float:
    a = np.asarray(x, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else math.nan


def premise_localization(premise: str | os.PathLike, n_images: int = 20, n_random: int = 200,
                         threshold: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """Toy world, no explainer needed: for each concept word of a premise artifact, the IoU of its
    feature's activation mask with the word's ground-truth mask on the feature's top images vs random
    images (score_explanations with the word as the explanation). How localized the cross-modal
    concept features are: an upper reference for explanations that name the concept exactly."""
    man = read_manifest(premise)
    result = json.loads((Path(premise) / Files.PREMISE).read_text())
    samples, extract, encode = (man["inputs"][k] for k in ("samples", "extract", "encode"))
    tokens = pd.read_parquet(Path(extract) / Files.TOKENS)
    grid = image_grid(extract, tokens)
    masks = ToyMasks(read_mask_samples(samples))
    pool = sorted(masks.covered & set(tokens.loc[tokens["modality"] == "image", "sample_id"].astype(str)))
    words = [(c["word"], int(c["feature"])) for c in result["concepts"] if c.get("feature") is not None]
    acts = image_activations(Path(encode) / Files.CODES, tokens, sorted({f for _, f in words}), grid)
    tops = top_images(acts, n_images, "max", grid, allowed=set(pool))
    wanted = {s for ids in tops.values() for s in ids}
    for _, f in words:
        wanted |= set(random_images(pool, n_random, seed, set(tops.get(f, []))))
    images = read_images(samples, sorted(wanted))
    refs = reference_activations(acts)
    out = [score_explanations(pd.DataFrame({"feature": [f], "explanation": [w], "image_samples": [tops.get(f, [])]}),
                              masks, acts, images, grid, refs, threshold, pool, n_random, seed)
           for w, f in words]  # one row per word: two words may share a feature
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=SCORE_SCHEMA.names)
