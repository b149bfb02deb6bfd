"""Readers for the data sets researchers bring, each mapped onto the one record schema.

| format          | source                                                   | responses / preferred                 |
|-----------------|----------------------------------------------------------|---------------------------------------|
| mmsae           | our parquet (the toy world writes it)                    | as stored                             |
| align_anything  | PKU-Alignment/align-anything text-image-to-text parquet  | [response_1, response_2], overall_response - 1 |
| rlaif_v         | openbmb/RLAIF-V-Dataset parquet                          | [chosen, rejected], 0                 |
| llava_json      | LLaVA instruction JSON + an image root folder            | [first gpt turn], 0                   |
| obelics         | interleaved documents: parallel `texts` / `images` lists | none (documents have no responses)    |

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

from mmsae.data.schema import PROBLEM, REQUIRED_COLUMNS, type_name, validate_frame
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


def _images(values: Any, images: ImageFiles) -> tuple[list, list]:
    """(bytes per row, per-row problems naming the field 'image')."""
    read = [images.read(v) for v in values]
    return [b for b, _ in read], [("image", m) if m else None for _, m in read]


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
    return df.assign(sample_id=ids, image=[b for b, _ in read], **{PROBLEM: _first(id_problems, image_problems)})


def _align_anything(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("question", "image", "response_1", "response_2", "overall_response"))
    ids, id_problems = _ids(df, ("sample_id", "id", "question_id"), "aa-")
    data, image_problems = _images(df["image"], images)
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
    })


def _rlaif_v(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("question", "image", "chosen", "rejected"))
    ids, id_problems = _ids(df, ("sample_id", "idx", "id"), "rlaifv-")
    data, image_problems = _images(df["image"], images)
    return pd.DataFrame({
        "sample_id": ids,
        "question": df["question"],
        "image": data,
        "responses": [[c, r] for c, r in zip(df["chosen"], df["rejected"], strict=True)],
        "preferred": 0,
        PROBLEM: _first(id_problems, image_problems),
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
        image, image_problem = images.read(item.get("image")) if isinstance(item, dict) else (None, None)
        rows.append({"sample_id": ids.iloc[i], "question": human.replace("<image>", "").strip(), "image": image,
                     "responses": [gpt], "preferred": 0,
                     PROBLEM: problem or (("image", image_problem) if image_problem else None)})
    return pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, PROBLEM])


def _obelics(path: Path, images: ImageFiles) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("texts", "images"))
    rows = []
    ids, id_problems = _ids(df, ("sample_id", "id", "url"), "obelics-")
    for sid, id_problem, texts, imgs in zip(ids, id_problems, df["texts"], df["images"], strict=True):
        # One record per document: its first readable image and all of its text, in document order.
        read = [images.read(v) for v in _as_list(imgs)]
        image = next((b for b, _ in read if b), None)
        image_problem = next((m for b, m in read if m), None) if image is None else None
        text = "\n".join(t for t in _as_list(texts) if isinstance(t, str) and t.strip())
        rows.append({"sample_id": sid, "question": text, "image": image, "responses": [], "preferred": -1,
                     PROBLEM: id_problem or (("image", image_problem) if image_problem else None)})
    return pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, PROBLEM])


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
    bad = validate_frame(df, path, check_images=True, on_bad_row=on_bad_row, max_text_chars=limits.max_text_chars)
    df = df.drop(columns=[PROBLEM], errors="ignore")
    if len(bad):
        df = df[~df["sample_id"].isin(bad["sample_id"])].reset_index(drop=True)
        if len(df) == 0:
            raise InputError(path, bad["field"].iloc[0], f"every row is unreadable ({len(bad)} rows)")
    return df, bad
