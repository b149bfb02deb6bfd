"""Stage explain_score: IoU of each explanation's segmentation mask with the feature's activation mask.

On each of the feature's top images (the ones the explainer saw) and on `n_random` random images:
IoU between the mask of the concept the explanation names (a segmenter's masks parquet, `masks`; or,
on the toy world, ground truth from the samples' objects) and the feature's activation mask (same
threshold as the explain stage). Writes explanation_scores.parquet: feature, explanation, concepts,
n_top, iou_top, n_random, iou_random, iou_gain (= iou_top - iou_random), iou_top_each,
iou_random_each. See mmsae.interpret.explain.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.errors import InputError
from mmsae.features import read_columns
from mmsae.interpret.explain import (
    SCORE_SCHEMA,
    FileMasks,
    ToyMasks,
    image_activations,
    image_grid,
    random_images,
    read_images,
    read_mask_samples,
    score_explanations,
    write_table,
)
from mmsae.params import ExplainParams, ExplainScoreParams

log = logging.getLogger("mmsae")

STAGE = "explain_score"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("sample artifact folder (images; objects on the toy world)")
    extract: Path = cli.arg("extract artifact folder (tokens.parquet, image grid)")
    encode: Path = cli.arg("encode artifact folder (codes.parquet)")
    explain: Path = cli.arg("explain artifact folder (explanations.parquet)")
    masks: Path | None = cli.arg("masks parquet (overrides explain_score.masks)", default=None)


def run(inputs: Inputs, params: ExplainScoreParams, out: Path) -> None:
    timer = Timer()
    # the explain run's own settings (mask threshold, crop), as typed params
    explain_params = ExplainParams.load(read_manifest(inputs.explain)["params"],
                                        source=str(Path(inputs.explain) / Files.MANIFEST))
    expl = read_columns(Path(inputs.explain) / Files.EXPLANATIONS, ("feature", "explanation", "image_samples",
                                                             "ref_activation"))
    masks_path = inputs.masks or params.masks
    if masks_path:
        masks = FileMasks(masks_path)
    else:
        samples = read_mask_samples(inputs.samples)
        if "objects" not in samples.columns:
            raise InputError(Path(inputs.samples) / Files.SAMPLES, "objects",
                             "no ground-truth objects: give explain_score.masks (a segmenter's masks parquet)")
        masks = ToyMasks(samples)
    tokens = ActivationStore(inputs.extract).tokens
    grid = image_grid(inputs.extract, tokens)
    pool = sorted(masks.covered & set(tokens.loc[tokens["modality"] == "image", "sample_id"].astype(str)))
    tops = {int(f): [str(s) for s in (ids if ids is not None else [])]
            for f, ids in zip(expl["feature"], expl["image_samples"], strict=True)}
    wanted = {s for ids in tops.values() for s in ids}
    for ids in tops.values():  # the random draws each feature will use
        wanted |= set(random_images(pool, params.n_random, params.seed, set(ids)))
    with timer("activations"):
        acts = image_activations(Path(inputs.encode) / Files.CODES, tokens, list(tops), grid)
        images = read_images(inputs.samples, sorted(wanted))
    refs = {int(f): float(v) for f, v in zip(expl["feature"], expl["ref_activation"], strict=True) if pd.notna(v)}
    with timer("score"):
        df = score_explanations(expl, masks, acts, images, grid, refs, explain_params.mask_threshold, pool,
                                params.n_random, params.seed, explain_params.center_crop)
    summary = {"n_features": int(len(df)), "n_matched": int(sum(len(c) > 0 for c in df["concepts"])),
               "mean_iou_top": float(np.nanmean(df["iou_top"])) if df["iou_top"].notna().any() else None,
               "mean_iou_random": float(np.nanmean(df["iou_random"])) if df["iou_random"].notna().any() else None,
               "masks": str(masks_path) if masks_path else "toy-world ground truth (samples' objects)"}
    log.info("explain_score: %s", summary)
    with atomic_dir(out) as tmp:
        write_table(df, tmp / Files.EXPLANATION_SCORES, SCORE_SCHEMA)
        read = {"samples": inputs.samples, "extract": inputs.extract, "encode": inputs.encode,
                "explain": inputs.explain, **({"masks": masks_path} if masks_path else {})}
        write_manifest(tmp, STAGE, params.as_dict(), read, summary, timer.timings)
