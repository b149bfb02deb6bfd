"""Automatic feature explanations by a multimodal LLM, and their IoU score (method.md section 6).

Companion paper: "Large Multi-modal Models Can Interpret Features in Large Multi-modal Models".

Explaining (stage `explain`)
    For each selected feature (config: the top `top_n` cross-modal features by weight, or an explicit
    list), its top `n_images` images and top `n_texts` text contexts go to an explainer behind any
    OpenAI-compatible chat endpoint (POST {base_url}/chat/completions, images as PNG data URIs,
    temperature 0 by default, retries with exponential backoff on connection errors, timeouts, 429
    and 5xx). The reply's first non-empty line is the explanation.

    - Images: samples ranked by the feature's highest (`image_rank: max`) or mean (`mean`, the
      paper) activation over their image tokens, from the sparse codes. The activation map over the
      patch grid (extract's `image_grid`: rows x cols from patch `first`; a square grid inferred from
      tokens.parquet when the manifest has none) is thresholded into the ACTIVATION MASK: cells where
      activation >= mask_threshold x the feature's highest image-token activation anywhere (one
      reference per feature, so a weak activation on a random image stays weak). The mask is
      upsampled to pixels (nearest; over the centre square with `center_crop`, the CLIP crop) and
      everything outside it is multiplied by `dim` (0 = black).
    - Texts: the feature's top text tokens (features.parquet top_text_rows), each with
      `context_tokens` tokens either side of its sample, decoded by the model's tokenizer, the
      activating token marked <<like this>>, a run of image tokens shown once as <image>, special
      tokens left out.

Scoring (stage `explain_score`)
    On each of the feature's top images: IoU between the explanation's segmentation mask and the
    feature's activation mask (both at pixel resolution). Baseline: the same on `n_random` random
    images (seeded, not among its top images): the explanation's mask on that image vs the feature's
    activation mask there. A pair whose union is empty (nothing segmented, nothing active) has no IoU
    and is left out of the means; the counts say how many were scored. Read the gap with care: a
    feature that detects its concept perfectly also scores well on the random images that happen to
    show the concept; the baseline is low when the feature is weak or misplaced on ordinary images.

    Masks come from
    - a masks parquet (`masks`, e.g. from GroundingDINO + SAM): sample_id, concept, and `mask`
      (PNG bytes, the image's size, nonzero = inside) or `box` ([x0, y0, x1, y1] pixels, x0 <= x < x1);
      optional `feature` (a row then applies to that feature only). A concept is used when its label
      occurs as a word or phrase in the explanation (case-insensitive, plural 's' allowed); its masks
      on a sample are united. A sample the file never names is not scored;
    - otherwise, on the toy world, ground truth: the samples' `objects` (colour, shape, bbox): an
      explanation naming colours and/or shapes gets the objects of those colours AND shapes (any
      named colour, any named shape), drawn as rendered. A noise-image sample shows no objects.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from mmsae.artifacts import MANIFEST, read_manifest
from mmsae.data.toyvocab import COLOURS, SHAPES
from mmsae.data.toyworld import object_mask
from mmsae.errors import InputError
from mmsae.features import FEATURES, Codes, iter_codes, read_columns, require_columns
from mmsae.models.grid import Grid, token_grid, upsample

log = logging.getLogger("mmsae.explain")

EXPLANATIONS = "explanations.parquet"
SCORES = "explanation_scores.parquet"
IMAGES = "images"
DEFAULT_PROMPT = (
    "We are studying one feature of a multimodal neural network. First come the images on which it fires "
    "most strongly: in each, the regions where it does not fire are darkened, so the bright regions show "
    "what it responds to. Then come the text passages on which it fires most strongly, with the token "
    "where it fires marked <<like this>>. What single concept (an object, a colour, a shape, an attribute "
    "or a word meaning) does the feature respond to, in the images and in the text? Answer with a short "
    "noun phrase of at most five words and nothing else."
)
EXPLANATION_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("explanation", pa.string()), ("model", pa.string()), ("prompt_hash", pa.string()),
    ("n_images", pa.int32()), ("n_texts", pa.int32()), ("raw_response", pa.string()), ("error", pa.string()),
    ("weight", pa.float64()), ("ref_activation", pa.float32()), ("image_samples", pa.list_(pa.string())),
    ("texts", pa.list_(pa.string())),
])
SCORE_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("explanation", pa.string()), ("concepts", pa.list_(pa.string())),
    ("n_top", pa.int32()), ("iou_top", pa.float64()), ("n_random", pa.int32()), ("iou_random", pa.float64()),
    ("iou_gain", pa.float64()), ("iou_top_each", pa.list_(pa.float64())), ("iou_random_each", pa.list_(pa.float64())),
])


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Which features, and where they fire on images
# --------------------------------------------------------------------------------------------------


def select_features(features: pd.DataFrame, top_n: int, explicit: Sequence[int] | None = None) -> list[int]:
    """An explicit list as given (each must be in features.parquet), else the top_n cross-modal
    features by weight (ties by feature id)."""
    require_columns(FEATURES, list(features.columns), ("feature", "class", "weight"))
    if explicit:
        missing = sorted(set(int(f) for f in explicit) - set(features["feature"].astype(int)))
        if missing:
            raise InputError(FEATURES, "explain.features", f"feature(s) {missing[:10]} not in features.parquet")
        return [int(f) for f in dict.fromkeys(explicit)]
    cross = features[features["class"] == "cross-modal"].assign(_w=lambda d: d["weight"].astype("float64"))
    if cross.empty:
        raise InputError(FEATURES, "class", "no cross-modal feature to explain (give explain.features)")
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
    require_columns("tokens.parquet", list(tokens.columns), ("row", "sample_id", "modality", "patch"))
    n_rows = int(tokens["row"].max()) + 1 if len(tokens) else 0
    img = tokens[tokens["modality"] == "image"]
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
    path = Path(samples) / "samples.parquet"
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


# --------------------------------------------------------------------------------------------------
# Text contexts
# --------------------------------------------------------------------------------------------------


def render_context(tokenizer: Any, window: pd.DataFrame, target_position: int, mark: tuple[str, str] = ("<<", ">>")) -> str:
    """The window's tokens (position, modality, token_id; sorted) as text: text tokens decoded
    incrementally (each piece = decode(run + [id]) minus decode(run), so spacing is the tokenizer's),
    one <image> per run of image tokens, special tokens left out, the target token marked."""
    out: list[str] = []
    run: list[int] = []
    prev = ""
    for pos, mod, tid in zip(window["position"], window["modality"], window["token_id"], strict=True):
        if mod == "image":
            if not out or out[-1] != " <image>":
                out.append(" <image>")
            run, prev = [], ""
            continue
        if mod != "text":
            continue
        full = tokenizer.decode([*run, int(tid)])
        piece = full[len(prev):] if full.startswith(prev) else tokenizer.decode([int(tid)])
        if not run and out:  # a new run after an image or at the window start: keep one space
            piece = " " + piece.lstrip()
        run.append(int(tid))
        prev = full
        if int(pos) == target_position:
            stripped = piece.lstrip()
            piece = piece[: len(piece) - len(stripped)] + mark[0] + stripped + mark[1]
        out.append(piece)
    return "".join(out).strip()


def text_contexts(features: pd.DataFrame, tokens: pd.DataFrame, selected: Sequence[int], tokenizer: Any,
                  n: int, context_tokens: int) -> dict[int, list[str]]:
    """feature -> up to n contexts of its top text tokens (features.parquet top_text_rows, in order)."""
    require_columns(FEATURES, list(features.columns), ("feature", "top_text_rows"))
    require_columns("tokens.parquet", list(tokens.columns), ("row", "sample_id", "position", "modality", "token_id"))
    tops = {int(f): [int(r) for r in rows][:n]
            for f, rows in zip(features["feature"], features["top_text_rows"], strict=True) if int(f) in set(selected)}
    by_row = tokens.set_index("row")
    need = {int(r) for rows in tops.values() for r in rows if int(r) in by_row.index}
    sids = set(by_row.loc[sorted(need), "sample_id"].astype(str)) if need else set()
    per_sample = {str(s): d.sort_values("position")
                  for s, d in tokens[tokens["sample_id"].astype(str).isin(sids)].groupby("sample_id")}
    out = {}
    for f in selected:
        contexts = []
        for r in tops.get(int(f), []):
            if r not in by_row.index:
                raise InputError("tokens.parquet", "row", f"feature {f}: top text row {r} is not in tokens.parquet")
            sid, pos = str(by_row.at[r, "sample_id"]), int(by_row.at[r, "position"])
            toks = per_sample[sid]
            win = toks[(toks["position"] >= pos - context_tokens) & (toks["position"] <= pos + context_tokens)]
            contexts.append(render_context(tokenizer, win, pos))
        out[int(f)] = contexts
    return out


# --------------------------------------------------------------------------------------------------
# The explainer: any OpenAI-compatible chat endpoint
# --------------------------------------------------------------------------------------------------


@dataclass
class ExplainerConfig:
    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.0
    max_tokens: int = 64
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0


class ChatError(Exception):
    """A request that failed after its retries, or a reply with no usable text."""


def api_key(cfg: ExplainerConfig) -> str | None:
    """The key from the variable named by api_key_env (never stored or logged)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise InputError("explain params", "explain.api_key_env", f"environment variable {cfg.api_key_env!r} is not set")
    return key


def chat(cfg: ExplainerConfig, messages: list[dict[str, Any]], key: str | None = None,
         sleep: Callable[[float], None] = time.sleep) -> str:
    """One chat completion; the reply's text. Retries connection errors, timeouts, 429 and 5xx up to
    cfg.retries times (backoff_s x 2^k seconds between, at most 60); ChatError otherwise."""
    # benchmarks.chat_completion fixes the judge's system prompt and a text-only user turn, so it
    # cannot carry the explainer's multimodal message; this client takes the messages as they are.
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                       "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = cfg.base_url.rstrip("/") + "/chat/completions"

    def redact(text: str) -> str:
        return text.replace(key, "<redacted>") if key else text

    last = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            sleep(min(60.0, cfg.backoff_s * 2 ** (attempt - 1)))
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200] if exc.fp else ""
            last = f"HTTP {exc.code}: {redact(detail)}"
            if exc.code != 429 and exc.code < 500:
                raise ChatError(last) from exc
            continue
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
            last = f"{exc.__class__.__name__}: {redact(str(exc))}"
            continue
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ChatError(f"unexpected response shape: {redact(json.dumps(reply)[:200])}") from exc
    raise ChatError(f"request failed after {cfg.retries + 1} attempts: {last}")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_messages(prompt: str, images: Sequence[bytes], texts: Sequence[str]) -> list[dict[str, Any]]:
    """One user turn: the prompt, the masked images (PNG data URIs), then the numbered text contexts."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for i, png in enumerate(images):
        content.append({"type": "text", "text": f"Image {i + 1}:"})
        content.append({"type": "image_url", "image_url": {"url": data_uri(png)}})
    lines = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts)) if texts else "(none)"
    content.append({"type": "text", "text": f"Text passages:\n{lines}"})
    return [{"role": "user", "content": content}]


def parse_explanation(reply: str) -> str:
    """The first non-empty line, without markdown emphasis, quotes or a final full stop."""
    lines = [ln.strip() for ln in (reply or "").splitlines() if ln.strip()]
    if not lines:
        raise ChatError("empty reply")
    text = re.sub(r"^(?:explanation|answer|concept)\s*:\s*", "", lines[0], flags=re.I)
    text = text.strip("*_`\"' ").rstrip(".").strip()
    if not text:
        raise ChatError(f"no explanation in reply: {lines[0][:120]!r}")
    return text[:300]


def explain_features(selected: Sequence[int], images: Mapping[int, Sequence[bytes]], texts: Mapping[int, Sequence[str]],
                     prompt: str, cfg: ExplainerConfig,
                     complete: Callable[[list[dict[str, Any]]], str] | None = None) -> pd.DataFrame:
    """Per feature: explanation (null on failure), raw_response, error, n_images, n_texts, model,
    prompt_hash. A failed request or unusable reply is recorded, not raised. `complete` (messages ->
    reply text) replaces the HTTP client in tests."""
    if complete is None:
        key = api_key(cfg)

        def complete(messages: list[dict[str, Any]]) -> str:
            return chat(cfg, messages, key)

    rows = []
    for f in tqdm(selected, desc="explain", unit="feature", mininterval=5):
        imgs, txts = list(images.get(f, [])), list(texts.get(f, []))
        reply, explanation, error = None, None, None
        try:
            reply = complete(build_messages(prompt, imgs, txts))
            explanation = parse_explanation(reply)
        except ChatError as exc:
            error = str(exc)
            log.warning("explain: feature %d failed: %s", f, error)
        rows.append({"feature": int(f), "explanation": explanation, "model": cfg.model,
                     "prompt_hash": prompt_hash(prompt), "n_images": len(imgs), "n_texts": len(txts),
                     "raw_response": reply, "error": error})
    return pd.DataFrame(rows)


def explainer_config(params: Mapping[str, Any]) -> ExplainerConfig:
    """The client settings of the `explain` config slice; base_url is required."""
    if not params.get("base_url"):
        raise InputError("explain params", "explain.base_url",
                         "not set: give the explainer's OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    return ExplainerConfig(base_url=params["base_url"], model=params["model"], api_key_env=params["api_key_env"],
                           temperature=params["temperature"], max_tokens=params["max_tokens"],
                           timeout_s=params["timeout_s"], retries=params["retries"], backoff_s=params["backoff_s"])


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The model's tokenizer (no remote code), which turns token ids back into text."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InputError(model_dir, "tokenizer", f"cannot load a tokenizer ({exc.__class__.__name__})") from exc


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


def write_table(df: pd.DataFrame, path: str | os.PathLike, schema: pa.Schema) -> None:
    pq.write_table(pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False), path)


# --------------------------------------------------------------------------------------------------
# Scoring: IoU of the explanation's segmentation with the activation mask, vs random images
# --------------------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b|; NaN when both are empty (nothing to agree on)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes {a.shape} and {b.shape} differ")
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else math.nan


def _word_plural(label: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])" + re.escape(label.lower()) + r"(?:e?s)?(?![a-z0-9])")


class ToyMasks:
    """Ground-truth concept masks of the toy world from the samples' `objects` (colour, shape, bbox)."""

    def __init__(self, samples: pd.DataFrame) -> None:
        require_columns("samples.parquet", list(samples.columns), ("sample_id", "objects"))
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
            raise InputError("samples.parquet", "objects", f"sample {sample_id}: toy-world masks need square images")
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
    require_columns(EXPLANATIONS, list(explanations.columns), ("feature", "explanation", "image_samples"))
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


def read_mask_samples(samples: str | os.PathLike) -> pd.DataFrame:
    """samples.parquet without images (sample_id and the ground-truth columns that exist)."""
    path = Path(samples) / "samples.parquet"
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    names = pq.read_schema(path).names
    return pd.read_parquet(path, columns=[c for c in ("sample_id", "objects", "corruption") if c in names])


def premise_localization(premise: str | os.PathLike, n_images: int = 20, n_random: int = 200,
                         threshold: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """Toy world, no explainer needed: for each concept word of a premise artifact, the IoU of its
    feature's activation mask with the word's ground-truth mask on the feature's top images vs random
    images (score_explanations with the word as the explanation). How localized the cross-modal
    concept features are: an upper reference for explanations that name the concept exactly."""
    man = read_manifest(premise)
    result = json.loads((Path(premise) / "premise.json").read_text())
    samples, extract, encode = (man["inputs"][k] for k in ("samples", "extract", "encode"))
    tokens = pd.read_parquet(Path(extract) / "tokens.parquet")
    grid = image_grid(extract, tokens)
    masks = ToyMasks(read_mask_samples(samples))
    pool = sorted(masks.covered & set(tokens.loc[tokens["modality"] == "image", "sample_id"].astype(str)))
    words = [(c["word"], int(c["feature"])) for c in result["concepts"] if c.get("feature") is not None]
    acts = image_activations(Path(encode) / "codes.parquet", tokens, sorted({f for _, f in words}), grid)
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
