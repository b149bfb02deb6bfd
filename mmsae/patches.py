"""Image-patch filtering (SAE-V paper, Section 3.2): score every patch of an image, keep the best ones,
black out the rest in pixel space, and measure how well the model still classifies the image.

Patch scores (higher = kept first) come from one forward of the model on the image plus a neutral
prompt (`score_question`). The SAE encodes the residual stream after its layer (`hook_layer`) at every
image token (one per base-grid patch) and at the prompt's text tokens; a feature is active where its
activation exceeds `delta`. They are the sample-level definitions of mmsae.scoring applied to the
pseudo-sample "prompt text + one patch":

- `l0`       active features on the patch (scoring `l0` of a sample made of that one token);
- `l1`       sum of their activations (`l1`);
- `cooc_l0`  active features on the patch that co-occur: with `cooccurrence: text` (Algorithm 1) they
             also fire on at least one text token of the prompt; with `cooccurrence: features` they are
             `cross-modal` in features.parquet (independent of the prompt);
- `cosine`   sum of the cross-modal weights (features.parquet; 0 unless cross-modal) of those
             co-occurring features (scoring `cosine`);
- `random`   seeded uniform scores, a function of (seed, image id) only;
- `attention` attention probability from the last prompt token to the patch's token, averaged over
             heads and over every decoder layer (eager attention, read by hooks on `self_attn`).

Kept patches: the best ceil(f * n_patches) per image and kept fraction f (`mmsae.scoring.subset_size`),
ties broken by a seeded random order (never by position: that would favour the top rows).

Geometry: a fixed-grid LLaVA model (`model_type: llava`, `ModelAdapter.image_grid`) sees the processed
image `pixel_values` [3, H, W]; base-grid cell (r, c) of a rows x cols grid is the pixel box
rows [r*H/rows, (r+1)*H/rows) x columns [c*W/cols, (c+1)*W/cols). Blacked-out boxes are set to what the
processor makes of a black pixel, so a masked input is exactly the processed image of a picture that is
black there (no resampling blur across patch borders). The toy model: 4x4 grid of 8 px on 32x32 images;
LLaVA-1.5: 24x24 of 14 px on 336x336. A `full` feature-select strategy puts CLS first; it is skipped.
LLaVA-NeXT (anyres tiles), Chameleon (VQ tokens made inside the adapter) and Qwen2-VL (merged, dynamic
grid) are refused with an InputError.

Classification: the model answers `question` about each (masked) image; `likelihood` picks the label
of the label set whose answer (label + EOS, the pipeline's response format) has the highest total
log-probability, `greedy` generates and compares the normalised text with the label. Accuracy per
(method, kept fraction), plus the unmasked images (method `none`, fraction 1.0).

Labelled images: an ImageFolder (`<root>/<label>/*.png|jpg|...`, label text = folder name with `_` as
spaces) or the toy world's held-out split, labelled by `toyworld.answer_for(question, scene)` (e.g.
"what shape is on the left ?": one object per side, so one right answer; label set = the three shapes).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from mmsae.activations import LayerCapture
from mmsae.data import Record, decode_image, sample_frame, toyvocab, toyworld
from mmsae.errors import InputError
from mmsae.models.adapters import IMAGE, TEXT, ModelAdapter
from mmsae.models.grid import Grid, adapter_grid, pixel_boxes
from mmsae.scoring import subset_size

log = logging.getLogger("mmsae.patches")

METHODS = ("cosine", "cooc_l0", "l0", "l1", "random", "attention")
SAE_METHODS = ("cosine", "cooc_l0", "l0", "l1")
UNMASKED = "none"
ACCURACY, PREDICTIONS, PATCH_SCORES = "accuracy.parquet", "predictions.parquet", "patch_scores.parquet"
PLOT, EXAMPLES = "accuracy.png", "examples.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNSUPPORTED = {
    "llava_next": "LLaVA-NeXT anyres images are split into tiles whose token count varies per image; "
                  "patch filtering needs one fixed base grid (use a LLaVA-1.5-style model_type 'llava')",
    "chameleon": "Chameleon's image tokens are VQ codes made inside the adapter, not pixel patches; "
                 "patch filtering needs a fixed-grid LLaVA model (model_type 'llava')",
    "qwen2_vl": "Qwen2-VL merges patches on a grid that depends on the image size; "
                "patch filtering needs a fixed-grid LLaVA model (model_type 'llava')",
    "causal_lm": "a text-only model sees no image",
}


# --------------------------------------------------------------------------------------------------
# labelled images


@dataclass
class ImageSet:
    """Labelled images: ids, RGB images, the right label of each, and the closed label set."""

    ids: list[str]
    images: list[Image.Image]
    labels: list[str]
    label_set: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def image_folder_set(root: str | os.PathLike, max_images: int | None = None, seed: int = 0) -> ImageSet:
    """An ImageFolder: `<root>/<label>/<image>`; label text = folder name with `_` read as a space.

    InputError naming the path for a missing root, a root without class folders, a class folder without
    images, or an image Pillow cannot decode (only the `max_images` drawn, seeded, are decoded).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "patch_filter.images", "image folder does not exist")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(root, "patch_filter.images", "no class folders (<root>/<label>/*.png)")
    rows = []
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(folder, "patch_filter.images", f"class {folder.name!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        rows += [{"sample_id": f"{folder.name}/{p.name}", "path": p, "label": folder.name.replace("_", " ")}
                 for p in files]
    chosen = sample_frame(pd.DataFrame(rows), max_images, seed)
    images = [decode_image(p.read_bytes(), p, sid) for p, sid in zip(chosen["path"], chosen["sample_id"], strict=True)]
    return ImageSet(chosen["sample_id"].tolist(), images, chosen["label"].tolist(),
                    sorted({c.name.replace("_", " ") for c in classes}), str(root))


def toy_label_set(question: str, answers: Sequence[str], source: object) -> list[str]:
    """The closed label set of a toy-world question: the colours or the shapes."""
    for options in (sorted(toyvocab.COLOURS), sorted(toyvocab.SHAPES)):
        if answers and set(answers) <= set(options):
            return options
    raise InputError(source, "patch_filter.question",
                     f"{question!r} has no one-word colour or shape answer (e.g. 'what shape is on the left ?')")


def toy_image_set(heldout: str | os.PathLike, question: str, max_images: int | None = None, seed: int = 0) -> ImageSet:
    """The toy world's held-out images labelled with the answer to `question` (toyworld.answer_for).

    Images the question does not apply to (no circle for "what color is the circle ?") and corrupted
    rows are left out; the count is logged.
    """
    path = Path(heldout)
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    df = pd.read_parquet(path)
    for col in ("sample_id", "image", "objects"):
        if col not in df.columns:
            raise InputError(path, col, "missing column")
    if "corruption" in df.columns:
        df = df[df["corruption"].isna()]
    df = df.assign(sample_id=df["sample_id"].astype(str))
    answers = []
    for sid, objects in zip(df["sample_id"], df["objects"], strict=True):
        try:
            scene = toyworld.Scene(json.loads(objects))
        except (TypeError, ValueError) as exc:
            raise InputError(path, "objects", f"sample {sid!r}: not a JSON object list") from exc
        try:
            answers.append(toyworld.answer_for(question, scene))
        except (IndexError, ValueError, KeyError):
            answers.append(None)
    df = df.assign(label=answers)
    n_all = len(df)
    df = df[df["label"].notna()]
    if len(df) == 0:
        raise InputError(path, "patch_filter.question", f"{question!r} applies to none of the {n_all} clean images")
    if len(df) < n_all:
        log.info("question %r applies to %d of %d clean images", question, len(df), n_all)
    label_set = toy_label_set(question, sorted(set(df["label"])), path)
    chosen = sample_frame(df, max_images, seed)
    images = [decode_image(b, path, sid) for b, sid in zip(chosen["image"], chosen["sample_id"], strict=True)]
    return ImageSet(chosen["sample_id"].tolist(), images, chosen["label"].tolist(), label_set, str(path))


# --------------------------------------------------------------------------------------------------
# geometry


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


# --------------------------------------------------------------------------------------------------
# patch scores


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


# --------------------------------------------------------------------------------------------------
# classification


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
                 params: dict[str, Any], text_modalities: Sequence[str] = (TEXT,),
                 progress: bool = True) -> dict[str, pd.DataFrame]:
    """The whole experiment: {'patch_scores', 'predictions', 'accuracy'} frames (see the module
    docstring); `params` is the patch_filter config slice."""
    from tqdm import tqdm

    from mmsae.features import feature_weights

    grid = patch_grid(adapter)
    methods, fractions = list(params["methods"]), [float(f) for f in params["fractions"]]
    d_sae = int(sae.cfg.d_sae) if sae is not None else int(features["feature"].max()) + 1
    weights = feature_weights(features, d_sae)
    cross = np.zeros(d_sae, bool)
    cross[features.loc[features["class"] == "cross-modal", "feature"].to_numpy(np.int64)] = True
    question = params["question"]
    scores = score_patches(adapter, sae, layer, images, params["score_question"] or question, weights, cross, methods,
                           params["delta"], params["cooccurrence"], text_modalities, params["seed"],
                           params["batch_size"], progress)
    fill = black_pixel(adapter)
    by_image = dict(tuple(scores.groupby("image_id", sort=False)))
    rows = []
    bar = tqdm(total=len(images), unit="image", desc="classify", disable=not progress, file=sys.stderr, mininterval=1.0)
    for image_id, image, label in zip(images.ids, images.images, images.labels, strict=True):
        views = views_of(image_id, by_image[image_id].sort_values("patch"), methods, fractions, params["seed"])
        preds = classify_views(adapter, image_id, image, question, views, images.label_set, grid, fill,
                               params["classify"], params["batch_size"], params["max_new_tokens"])
        for v, p in zip(views, preds, strict=True):
            rows.append({"image_id": image_id, "label": label, "method": v.method, "fraction": v.fraction,
                         "n_kept": int(v.keep.sum()), "prediction": p,
                         "correct": normalise_answer(p) == normalise_answer(label)})
        bar.update(1)
    bar.close()
    predictions = pd.DataFrame(rows)
    return {"patch_scores": scores, "predictions": predictions, "accuracy": accuracy_table(predictions)}


# --------------------------------------------------------------------------------------------------
# figures


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


__all__ = ["ACCURACY", "EXAMPLES", "METHODS", "PATCH_SCORES", "PLOT", "PREDICTIONS", "SAE_METHODS", "UNMASKED",
           "AttentionRows", "ImageSet", "View", "accuracy_table", "black_out", "black_pixel",
           "classify_views", "image_folder_set", "keep_mask", "masked_batch", "normalise_answer",
           "patch_filter", "patch_grid", "plot_accuracy", "plot_examples", "random_scores", "response_logprob",
           "sae_patch_scores", "score_patches", "tiebreak", "toy_image_set", "toy_label_set", "views_of"]
