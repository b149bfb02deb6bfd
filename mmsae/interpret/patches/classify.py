"""Classification of masked images: the kept patches per view, the black-out in pixel space, the model's
answer per view, accuracy per (method, kept fraction); `patch_filter` runs the whole experiment."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from mmsae.data import Record
from mmsae.errors import InputError
from mmsae.interpret.patches.images import ImageSet
from mmsae.interpret.patches.scores import keep_mask, patch_grid, score_patches, tiebreak
from mmsae.models.adapters import TEXT, ModelAdapter
from mmsae.models.grid import Grid, pixel_boxes
from mmsae.params import PatchFilterParams

UNMASKED = "none"


@dataclass
class View:
    """One input to classify: an image with the patches in `keep` visible (method `none` = all)."""

    method: str
    fraction: float
    keep: np.ndarray


def views_of(image_id: str, scores: pd.DataFrame, methods: Sequence[str], fractions: Sequence[float],
             seed: int) -> list[View]:
    """The unmasked view, then one per (method, fraction); `scores` are the image's rows of
    score_patches, in cell order."""
    n = len(scores)
    ties = tiebreak(image_id, n, seed)
    views = [View(UNMASKED, 1.0, np.ones(n, bool))]
    for m in methods:
        s = scores[f"score_{m}"].to_numpy()
        views += [View(m, float(f), keep_mask(s, f, ties)) for f in fractions]
    return views


def black_out(pixel_values: torch.Tensor, keep: np.ndarray, rows: int, cols: int, fill: torch.Tensor) -> torch.Tensor:
    """A copy of `pixel_values` [C, H, W] with every cell not in `keep` (bool [rows * cols]) set to
    `fill` [C] (the processed value of a black pixel)."""
    keep = np.asarray(keep, bool)
    if keep.shape != (rows * cols,):
        raise ValueError(f"keep mask of shape {keep.shape}, expected ({rows * cols},)")
    out = pixel_values.clone()
    fill = fill.to(out.dtype).to(out.device).view(-1, 1, 1)
    for x0, y0, x1, y1 in pixel_boxes(rows, cols, out.shape[-2], out.shape[-1])[~keep]:
        out[:, y0:y1, x0:x1] = fill
    return out


def black_pixel(adapter: ModelAdapter) -> torch.Tensor:
    """[C]: what the model's image processor makes of a black pixel (rescaled and normalised)."""
    pv = adapter.processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
    return pv.reshape(-1, *pv.shape[-3:])[0, :, pv.shape[-2] // 2, pv.shape[-1] // 2].float()


def masked_batch(adapter: ModelAdapter, records: Sequence[Record], views: Sequence[View], grid: Grid,
                 fill: torch.Tensor, include_response: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """build_batch of `records`, the i-th image blacked out outside views[i].keep."""
    inputs, meta = adapter.build_batch(records, include_response=include_response)
    pv = inputs["pixel_values"]
    if pv.dim() != 4 or pv.shape[0] != len(records):
        raise InputError(adapter.path, "model.path", f"pixel_values of shape {tuple(pv.shape)}: expected one image per record")
    try:
        inputs["pixel_values"] = torch.stack([black_out(pv[i], v.keep, grid.rows, grid.cols, fill)
                                              for i, v in enumerate(views)])
    except ValueError as exc:
        raise InputError(adapter.path, "model.path", str(exc)) from exc
    return inputs, meta


def response_logprob(adapter: ModelAdapter, inputs: dict[str, torch.Tensor], meta: Any) -> torch.Tensor:
    """[B] total log-probability of each row's response tokens (EOS included) given what precedes them."""
    target = torch.from_numpy(meta.is_response & meta.attention_mask)
    target[:, 0] = False
    rows, cols = target.nonzero(as_tuple=True)
    hidden = adapter.final_hidden(inputs)
    dev = hidden.device
    logits = adapter.lm_head(hidden[rows.to(dev), (cols - 1).to(dev)]).float()
    lp = -F.cross_entropy(logits, inputs["input_ids"][rows.to(dev), cols.to(dev)], reduction="none")
    return torch.zeros(target.shape[0], dtype=torch.float64).index_add_(0, rows, lp.double().cpu())


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").strip().rstrip(".!").split())


def classify_views(adapter: ModelAdapter, image_id: str, image: Image.Image, question: str, views: Sequence[View],
                   label_set: Sequence[str], grid: Grid, fill: torch.Tensor, mode: str = "likelihood",
                   batch_size: int = 64, max_new_tokens: int = 8) -> list[str]:
    """The model's answer for each view: the most likely label (`likelihood`) or its greedy text."""
    preds: list[str] = []
    with torch.inference_mode():
        if mode == "likelihood":
            pairs = [(v, label) for v in views for label in label_set]
            lp = []
            for s in range(0, len(pairs), batch_size):
                chunk = pairs[s : s + batch_size]
                recs = [Record(image_id, question, image, [label], 0) for _, label in chunk]
                inputs, meta = masked_batch(adapter, recs, [v for v, _ in chunk], grid, fill, include_response=True)
                lp.append(response_logprob(adapter, inputs, meta))
            best = torch.cat(lp).view(len(views), len(label_set)).argmax(1)  # ties: first label
            return [label_set[int(i)] for i in best]
        if mode != "greedy":
            raise ValueError(f"unknown classify mode {mode!r}")
        tok = adapter.tokenizer
        for s in range(0, len(views), batch_size):  # one prompt per image: equal lengths, no padding
            chunk = views[s : s + batch_size]
            inputs, _ = masked_batch(adapter, [Record(image_id, question, image, [], -1)] * len(chunk), chunk, grid,
                                     fill, include_response=False)
            out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            preds += [t.strip() for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    return preds


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """method, fraction, n_images, n_correct, accuracy; `none` first, then the methods in the order of
    `predictions`, fractions descending."""
    order = list(dict.fromkeys(predictions["method"]))
    acc = (predictions.groupby(["method", "fraction"], sort=False)["correct"]
           .agg(n_images="size", n_correct="sum").reset_index())
    acc["n_correct"] = acc["n_correct"].astype(np.int64)
    acc["n_images"] = acc["n_images"].astype(np.int64)
    acc["accuracy"] = acc["n_correct"] / acc["n_images"]
    acc["_m"] = acc["method"].map(order.index)
    return acc.sort_values(["_m", "fraction"], ascending=[True, False]).drop(columns="_m").reset_index(drop=True)


def patch_filter(adapter: ModelAdapter, sae: Any, layer: int, features: pd.DataFrame, images: ImageSet,
                 params: PatchFilterParams, text_modalities: Sequence[str] = (TEXT,),
                 progress: bool = True) -> dict[str, pd.DataFrame]:
    """The whole experiment: {'patch_scores', 'predictions', 'accuracy'} frames (see the module
    docstring); `params` is the patch_filter config slice."""
    from tqdm import tqdm

    from mmsae.features import feature_weights

    grid = patch_grid(adapter)
    methods, fractions = list(params.methods), [float(f) for f in params.fractions]
    d_sae = int(sae.cfg.d_sae) if sae is not None else int(features["feature"].max()) + 1
    weights = feature_weights(features, d_sae)
    cross = np.zeros(d_sae, bool)
    cross[features.loc[features["class"] == "cross-modal", "feature"].to_numpy(np.int64)] = True
    question = params.question
    scores = score_patches(adapter, sae, layer, images, params.score_question or question, weights, cross, methods,
                           params.delta, params.cooccurrence, text_modalities, params.seed,
                           params.batch_size, progress)
    fill = black_pixel(adapter)
    by_image = dict(tuple(scores.groupby("image_id", sort=False)))
    rows = []
    bar = tqdm(total=len(images), unit="image", desc="classify", disable=not progress, file=sys.stderr, mininterval=1.0)
    for image_id, image, label in zip(images.ids, images.images, images.labels, strict=True):
        views = views_of(image_id, by_image[image_id].sort_values("patch"), methods, fractions, params.seed)
        preds = classify_views(adapter, image_id, image, question, views, images.label_set, grid, fill,
                               params.classify, params.batch_size, params.max_new_tokens)
        for v, p in zip(views, preds, strict=True):
            rows.append({"image_id": image_id, "label": label, "method": v.method, "fraction": v.fraction,
                         "n_kept": int(v.keep.sum()), "prediction": p,
                         "correct": normalise_answer(p) == normalise_answer(label)})
        bar.update(1)
    bar.close()
    predictions = pd.DataFrame(rows)
    return {"patch_scores": scores, "predictions": predictions, "accuracy": accuracy_table(predictions)}
