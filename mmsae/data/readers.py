"""Readers for the data sets researchers bring, each mapped onto the one record schema.

| format          | source                                                   | responses / preferred                 |
|-----------------|----------------------------------------------------------|---------------------------------------|
| mmsae           | our parquet (the toy world writes it)                    | as stored                             |
| align_anything  | PKU-Alignment/align-anything text-image-to-text parquet  | [response_1, response_2], overall_response - 1 |
| rlaif_v         | openbmb/RLAIF-V-Dataset parquet                          | [chosen, rejected], 0                 |
| llava_json      | LLaVA instruction JSON + an image root folder            | [first gpt turn], 0                   |
| obelics         | interleaved documents: parallel `texts` / `images` lists | none (documents have no responses)    |

Images may come as raw bytes, as a Hugging Face image struct {bytes, path}, or as a path relative to
`image_root`. Unreadable rows either stop the read (on_bad_row="error", one line naming file, field
and sample) or are dropped *and reported* with their ids (on_bad_row="skip").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from mmsae.data.schema import REQUIRED_COLUMNS, validate_frame
from mmsae.errors import InputError

FORMATS = ("mmsae", "align_anything", "rlaif_v", "llava_json", "obelics")


def _image_bytes(value: Any, image_root: Path | None) -> bytes | None:
    """Bytes of an image given as bytes, an HF {bytes, path} struct, or a path (relative to image_root)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    path = Path(value)
    if image_root is not None and not path.is_absolute():
        path = image_root / path
    try:
        return path.read_bytes()
    except OSError:
        return None  # reported by validation as "no image bytes"


def _require(df: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for col in columns:
        if col not in df.columns:
            raise InputError(path, col, "missing column")


def _ids(df: pd.DataFrame, candidates: tuple[str, ...], prefix: str) -> pd.Series:
    for col in candidates:
        if col in df.columns and df[col].notna().all() and df[col].astype(str).is_unique:
            return df[col].astype(str)
    return pd.Series([f"{prefix}{i}" for i in range(len(df))], index=df.index)


def _as_list(value: Any) -> list:
    return [] if value is None else list(value)  # parquet list columns arrive as numpy arrays


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:
        raise InputError(path, "file", f"not a readable parquet file ({exc.__class__.__name__})") from exc


def _mmsae(path: Path, image_root: Path | None) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, REQUIRED_COLUMNS)
    return df


def _align_anything(path: Path, image_root: Path | None) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("question", "image", "response_1", "response_2", "overall_response"))
    pref = pd.to_numeric(df["overall_response"], errors="coerce") - 1
    return pd.DataFrame({
        "sample_id": _ids(df, ("sample_id", "id", "question_id"), "aa-"),
        "question": df["question"],
        "image": [_image_bytes(v, image_root) for v in df["image"]],
        "responses": [[a, b] for a, b in zip(df["response_1"], df["response_2"], strict=True)],
        "preferred": pref.where(pref.isin([0, 1]), other=-2).astype("int64"),  # -2: out of range, reported
    })


def _rlaif_v(path: Path, image_root: Path | None) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("question", "image", "chosen", "rejected"))
    return pd.DataFrame({
        "sample_id": _ids(df, ("sample_id", "idx", "id"), "rlaifv-"),
        "question": df["question"],
        "image": [_image_bytes(v, image_root) for v in df["image"]],
        "responses": [[c, r] for c, r in zip(df["chosen"], df["rejected"], strict=True)],
        "preferred": 0,
    })


def _llava_json(path: Path, image_root: Path | None) -> pd.DataFrame:
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "file", f"not readable JSON ({exc.__class__.__name__})") from exc
    if not isinstance(items, list):
        raise InputError(path, "file", "expected a JSON list of conversations")
    root = image_root if image_root is not None else path.parent
    rows = []
    for i, item in enumerate(items):
        if "conversations" not in item:
            raise InputError(path, "conversations", f"item {i}: missing")
        turns = item["conversations"]
        human = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
        gpt = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), "")
        rows.append({
            "sample_id": str(item.get("id", f"llava-{i}")),
            "question": human.replace("<image>", "").strip(),
            "image": _image_bytes(item.get("image"), root),
            "responses": [gpt],
            "preferred": 0,
        })
    return pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))


def _obelics(path: Path, image_root: Path | None) -> pd.DataFrame:
    df = _read_parquet(path)
    _require(df, path, ("texts", "images"))
    rows = []
    ids = _ids(df, ("sample_id", "id", "url"), "obelics-")
    for sid, texts, images in zip(ids, df["texts"], df["images"], strict=True):
        # One record per document: its first image and all of its text, in document order.
        image = next((b for b in (_image_bytes(v, image_root) for v in _as_list(images)) if b), None)
        text = "\n".join(t for t in _as_list(texts) if isinstance(t, str) and t.strip())
        rows.append({"sample_id": sid, "question": text, "image": image, "responses": [], "preferred": -1})
    return pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))


READERS: dict[str, Callable[[Path, Path | None], pd.DataFrame]] = {
    "mmsae": _mmsae,
    "align_anything": _align_anything,
    "rlaif_v": _rlaif_v,
    "llava_json": _llava_json,
    "obelics": _obelics,
}


def read_dataset(path: str | os.PathLike, fmt: str = "mmsae", image_root: str | os.PathLike | None = None,
                 on_bad_row: str = "error") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records in the mmsae schema, bad rows: sample_id, field, message)."""
    path = Path(path)
    if fmt not in READERS:
        raise InputError(path, "data.format", f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    df = READERS[fmt](path, Path(image_root) if image_root else None)
    df["sample_id"] = df["sample_id"].astype(str)
    bad = validate_frame(df, path, check_images=True, on_bad_row=on_bad_row)
    if len(bad):
        df = df[~df["sample_id"].isin(bad["sample_id"])].reset_index(drop=True)
        if len(df) == 0:
            raise InputError(path, bad["field"].iloc[0], f"every row is unreadable ({len(bad)} rows)")
    return df, bad
