"""Readers for the data sets researchers bring, each mapped onto the one record schema.

| format          | source                                                   | responses / preferred                 |
|-----------------|----------------------------------------------------------|---------------------------------------|
| mmsae           | our parquet (the toy world writes it)                    | as stored                             |
| align_anything  | PKU-Alignment/align-anything text-image-to-text parquet  | [response_1, response_2], overall_response - 1 |
| rlaif_v         | openbmb/RLAIF-V-Dataset parquet                          | [chosen, rejected], 0                 |
| llava_json      | LLaVA instruction JSON + an image root folder            | [first gpt turn], 0                   |
| obelics         | interleaved documents: parallel `texts` / `images` lists | none (documents have no responses)    |

Several images: every reader keeps every image, in order (`image`: the first, `extra_images`: the rest).
OBELICS documents interleave them with the text (`<image>` markers where they stood); LLaVA JSON, Align-
Anything and RLAIF-V take a list in `image` (markers as written in the text). Images that all precede the
text need no markers (the single-image layout): leading markers are dropped, so single-image data read as
before. An unreadable image of several is a bad row naming the image (image 1 in field `image`, image k > 1
in `extra_images`).

Images may come as raw bytes, as a Hugging Face image struct {bytes, path}, or as a path relative to
`image_root` (default: the data file's folder). Everything in the file is untrusted: a path must resolve,
symlinks included, to a regular file inside the root; images are capped at data.max_image_bytes and
texts at data.max_text_chars; ids must be unique strings or integers (never replaced by made-up ones);
every field is type-checked ("expected a string, got int"). Unreadable rows either stop the read (on_bad_row="error", one line naming file, field
and sample) or are dropped *and reported* with their ids (on_bad_row="skip").
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mmsae.data.schema import EXTRA_IMAGES, IMAGE_MARKER, PROBLEM, REQUIRED_COLUMNS, type_name, validate_frame
from mmsae.errors import InputError
from mmsae.params import DataParams

FORMATS = ("mmsae", "align_anything", "rlaif_v", "llava_json", "obelics")


class ImageFiles:
    """Reads image fields: inline bytes, an HF {bytes, path} struct, or a path. A path must resolve,
    symlinks included, to a regular file inside `root`; every image is capped at `max_bytes`. A value
    that breaks a rule gives (None, message): the row is bad, nothing outside the root is opened."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self._real_root = root.resolve()

    def read(self, value: Any) -> tuple[bytes | None, str | None]:
        if value is None:
            return None, None  # reported by validation as "no image bytes"
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                return None, None
        if isinstance(value, bytes | bytearray):
            if len(value) > self.max_bytes:
                return None, f"{len(value)} bytes, more than data.max_image_bytes = {self.max_bytes}"
            return bytes(value), None
        if not isinstance(value, str):
            return None, f"expected image bytes, an {{bytes, path}} struct or a path, got {type_name(value)}"
        return self._read_path(value)

    def _read_path(self, value: str) -> tuple[bytes | None, str | None]:
        try:
            path = (self.root / value).resolve(strict=True)  # an absolute `value` replaces the root
        except (OSError, RuntimeError, ValueError):
            return None, f"image path {value!r}: file does not exist"
        if not path.is_relative_to(self._real_root):
            return None, f"image path {value!r} is outside the image root {str(self.root)!r}"
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                return None, f"image path {value!r} is not a regular file"
            if info.st_size > self.max_bytes:
                return None, f"image path {value!r}: {info.st_size} bytes, more than data.max_image_bytes = {self.max_bytes}"
            with path.open("rb") as fh:
                data = fh.read(self.max_bytes + 1)  # the cap holds even if the file grows meanwhile
        except OSError as exc:
            return None, f"image path {value!r}: unreadable ({exc.__class__.__name__})"
        if len(data) > self.max_bytes:
            return None, f"image path {value!r}: more than data.max_image_bytes = {self.max_bytes} bytes"
        return data, None


def _require(df: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for col in columns:
        if col not in df.columns:
            raise InputError(path, col, "missing column")


def _ids(df: pd.DataFrame, candidates: tuple[str, ...], prefix: str) -> tuple[pd.Series, list]:
    """(ids, per-row problems): the first id column present is used as it is (a duplicate or a null id is
    a bad row, never silently replaced); without one, ids are made from the row numbers."""
    col = next((c for c in candidates if c in df.columns), None)
    if col is None:
        return pd.Series([f"{prefix}{i}" for i in range(len(df))], index=df.index), [None] * len(df)
    ids, problems = [], []
    for i, value in enumerate(df[col]):
        if isinstance(value, str | int | np.integer) and not isinstance(value, bool) and str(value).strip():
            ids.append(str(value))
            problems.append(None)
        else:
            ids.append(f"{prefix}{i}")
            problems.append(("sample_id", f"column {col!r}: expected a string or integer id, got {type_name(value)}"))
    return pd.Series(ids, index=df.index), problems


def _as_list(value: Any) -> list:
    return [] if value is None else list(value)  # parquet list columns arrive as numpy arrays


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:
        raise InputError(path, "file", f"not a readable parquet file ({exc.__class__.__name__})") from exc


def _image_list(value: Any, images: ImageFiles) -> tuple[bytes | None, list[bytes], tuple[str, str] | None]:
    """(first image, the others, problem) of one image field: a single image or a list of them, in order.
    A problem names the image: field 'image' for the first, 'extra_images' ("image k: ...") for the rest."""
    values = list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
    if not values:
        return None, [], None  # reported by validation as "no image bytes"
    out: list[bytes | None] = []
    for i, v in enumerate(values):
        data, message = images.read(v)
        if message:
            return None, [], ("image", message) if i == 0 else (EXTRA_IMAGES, f"image {i + 1}: {message}")
        if data is None and i:
            return None, [], (EXTRA_IMAGES, f"image {i + 1}: no image bytes")
        out.append(data)
    return out[0], [b for b in out[1:] if b is not None], None


def _images(values: Any, images: ImageFiles) -> tuple[list, list, list]:
    """(first image per row, the other images per row, per-row problems)."""
    read = [_image_list(v, images) for v in values]
    return [f for f, _, _ in read], [e for _, e, _ in read], [p for _, _, p in read]


def leading_markers_dropped(question: Any, n_images: int) -> Any:
    """The question without its `n_images` image markers when they all precede the text (the default
    layout, so '<image>\nWhat is it?' reads as 'What is it?'); otherwise unchanged (a wrong count is
    left for validation to report)."""
    if not isinstance(question, str):
        return question
    pieces = question.split(IMAGE_MARKER)
    if len(pieces) == n_images + 1 > 1 and all(not p.strip() for p in pieces[:-1]):
        return pieces[-1].strip()
    return question


def _extra_column(extra: list[list[bytes]]) -> dict[str, list]:
    """{extra_images: ...} when any row has more than one image, else {} (single-image data sets keep
    the single-image schema, byte for byte)."""
    return {EXTRA_IMAGES: [e or None for e in extra]} if any(extra) else {}


def _first(*problems: Any) -> list:
    """Per row, the first of several per-row problem lists that is set."""
    return [next((p for p in row if p), None) for row in zip(*problems, strict=True)]


def _mmsae(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path).drop(columns=[PROBLEM], errors="ignore")
    _require(df, path, REQUIRED_COLUMNS)
    ids, id_problems = _ids(df, ("sample_id",), "row-")
    read = [images.read(v) if v is None or isinstance(v, bytes | bytearray)
            else (None, f"expected image bytes, got {type_name(v)}") for v in df["image"]]
    image_problems = [("image", m) if m else None for _, m in read]
    if EXTRA_IMAGES in df.columns:  # caps each extra image; other types are reported by validation
        extra_problems = []
        for value in df[EXTRA_IMAGES]:
            found = None
            for k, v in enumerate(value if isinstance(value, list | tuple | np.ndarray) else [], start=2):
                message = images.read(v)[1] if isinstance(v, bytes | bytearray) else None
                if message:
                    found = (EXTRA_IMAGES, f"image {k}: {message}")
                    break
            extra_problems.append(found)
        image_problems = _first(image_problems, extra_problems)
    return df.assign(sample_id=ids, image=[b for b, _ in read],
                     **{PROBLEM: _first(id_problems, image_problems)})


def _align_anything(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("question", "image", "response_1", "response_2", "overall_response"))
    ids, id_problems = _ids(df, ("sample_id", "id", "question_id"), "aa-")
    data, extra, image_problems = _images(df["image"], images)
    preferred, pref_problems = [], []
    for value in df["overall_response"]:  # 1 or 2: which response is better overall
        ok = isinstance(value, int | np.integer | float | np.floating) and not isinstance(value, bool) and value in (1, 2)
        preferred.append(int(value) - 1 if ok else -1)
        pref_problems.append(None if ok else ("overall_response", f"expected 1 or 2, got {value!r}"))
    return pd.DataFrame({
        "sample_id": ids,
        "question": df["question"],
        "image": data,
        "responses": [[a, b] for a, b in zip(df["response_1"], df["response_2"], strict=True)],
        "preferred": pd.Series(preferred, index=df.index, dtype="int64"),
        PROBLEM: _first(id_problems, pref_problems, image_problems),
        **_extra_column(extra),
    })


def _rlaif_v(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("question", "image", "chosen", "rejected"))
    ids, id_problems = _ids(df, ("sample_id", "idx", "id"), "rlaifv-")
    data, extra, image_problems = _images(df["image"], images)
    return pd.DataFrame({
        "sample_id": ids,
        "question": df["question"],
        "image": data,
        "responses": [[c, r] for c, r in zip(df["chosen"], df["rejected"], strict=True)],
        "preferred": 0,
        PROBLEM: _first(id_problems, image_problems),
        **_extra_column(extra),
    })


def _llava_turns(item: Any) -> tuple[str, str]:
    """(the first human turn, the first gpt turn) of a LLaVA item; ValueError(field, message) when its
    layout is wrong."""
    if not isinstance(item, dict):
        raise ValueError("item", f"expected an object, got {type_name(item)}")
    if "conversations" not in item:
        raise ValueError("conversations", "missing")
    turns = item["conversations"]
    if not isinstance(turns, list):
        raise ValueError("conversations", f"expected a list of turns, got {type_name(turns)}")
    found: dict[str, str] = {}
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError("conversations", f"turn {j}: expected an object, got {type_name(turn)}")
        role, value = turn.get("from"), turn.get("value")
        if role in ("human", "gpt") and role not in found:
            if not isinstance(value, str):
                raise ValueError("conversations", f"turn {j} ({role}) value: expected a string, got {type_name(value)}")
            found[role] = value
    return found.get("human", ""), found.get("gpt", "")


def _llava_json(path: Path, images: ImageFiles) -> pd.DataFrame:
    try:
        items = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, "file", f"not readable JSON ({exc.__class__.__name__})") from exc
    if not isinstance(items, list):
        raise InputError(path, "file", f"expected a JSON list of conversations, got {type_name(items)}")
    has_ids = any(isinstance(it, dict) and "id" in it for it in items)
    frame = pd.DataFrame({"id": [it.get("id") if isinstance(it, dict) else None for it in items]})
    ids, id_problems = _ids(frame, ("id",) if has_ids else (), "llava-")
    rows = []
    for i, item in enumerate(items):
        problem = id_problems[i]
        try:
            human, gpt = _llava_turns(item)
        except ValueError as exc:
            human, gpt, problem = "", "", problem or exc.args
        image, extra, image_problem = _image_list(item.get("image"), images) if isinstance(item, dict) else (None, [], None)
        n_images = (image is not None) + len(extra)
        rows.append({"sample_id": ids.iloc[i], "question": leading_markers_dropped(human.strip(), n_images),
                     "image": image, "responses": [gpt], "preferred": 0, EXTRA_IMAGES: extra,
                     PROBLEM: problem or image_problem})
    frame = pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, EXTRA_IMAGES, PROBLEM])
    return frame.drop(columns=[EXTRA_IMAGES]).assign(**_extra_column(list(frame[EXTRA_IMAGES])))


def _obelics(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("texts", "images"))
    rows = []
    ids, id_problems = _ids(df, ("sample_id", "id", "url"), "obelics-")
    extras = []
    for sid, id_problem, texts, imgs in zip(ids, id_problems, df["texts"], df["images"], strict=True):
        # One record per document: every image and all of its text, in document order; each image stands
        # where it was (a marker), unless all of them precede the text.
        texts, imgs = _as_list(texts), _as_list(imgs)
        pieces: list[str | None] = []  # text, or None for an image
        kept, image_problem = [], None
        for j in range(max(len(texts), len(imgs))):
            value = imgs[j] if j < len(imgs) else None
            if value is not None:
                data, message = images.read(value)
                if message and image_problem is None:
                    image_problem = ("image", message) if not kept else (EXTRA_IMAGES, f"image {len(kept) + 1}: {message}")
                if data is not None:
                    kept.append(data)
                    pieces.append(None)
            text = texts[j] if j < len(texts) else None
            if isinstance(text, str) and text.strip():
                pieces.append(text)
        first_text = next((k for k, p in enumerate(pieces) if p is not None), len(pieces))
        leading = all(p is None for p in pieces[:first_text]) and None not in pieces[first_text:]
        question = "\n".join(p if p is not None else IMAGE_MARKER for p in pieces if p is not None or not leading)
        rows.append({"sample_id": sid, "question": question, "image": kept[0] if kept else None, "responses": [],
                     "preferred": -1, PROBLEM: id_problem or image_problem})
        extras.append(kept[1:])
    return pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, PROBLEM]).assign(**_extra_column(extras))


READERS: dict[str, Callable[[Path, ImageFiles], pd.DataFrame]] = {
    "mmsae": _mmsae,
    "align_anything": _align_anything,
    "rlaif_v": _rlaif_v,
    "llava_json": _llava_json,
    "obelics": _obelics,
}


def read_dataset(path: str | os.PathLike, fmt: str = "mmsae", image_root: str | os.PathLike | None = None,
                 on_bad_row: str = "error", limits: DataParams | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records in the mmsae schema, bad rows: sample_id, field, message). Image paths resolve inside
    `image_root` (default: the data file's folder); `limits` (the 'data' config slice; its schema
    defaults when None) caps image bytes and text length."""
    path = Path(path)
    limits = limits or DataParams.load({})
    if fmt not in READERS:
        raise InputError(path, "data.format", f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise InputError(path, "path", "file does not exist" if not path.exists() else "not a regular file")
    images = ImageFiles(Path(image_root) if image_root else path.parent, limits.max_image_bytes)
    df = READERS[fmt](path, images)
    df["sample_id"] = df["sample_id"].astype(str)
    bad = validate_frame(df, path, check_images=True, on_bad_row=on_bad_row, max_text_chars=limits.max_text_chars,
                         max_images=limits.max_images_per_sample)
    df = df.drop(columns=[PROBLEM], errors="ignore")
    if len(bad):
        df = df[~df["sample_id"].isin(bad["sample_id"])].reset_index(drop=True)
        if len(df) == 0:
            raise InputError(path, bad["field"].iloc[0], f"every row is unreadable ({len(bad)} rows)")
    return df, bad
