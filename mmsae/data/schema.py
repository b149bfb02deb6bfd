"""The one record schema every stage reads, and its validation.

A data set is a parquet file with one row per sample:

| column      | type          | meaning                                                        |
|-------------|---------------|----------------------------------------------------------------|
| sample_id   | string        | unique id                                                      |
| question    | string        | the user turn (non-empty)                                      |
| image       | binary        | encoded image bytes (PNG/JPEG/...), decodable by Pillow        |
| extra_images| list<binary>  | optional: images 2..n of a multi-image sample, in order        |
| responses   | list<string>  | candidate responses, each non-empty (may be empty: documents)  |
| preferred   | int           | index into `responses` of the preferred one (-1 when none)     |
| corruption  | string, null  | optional ground truth: the kind of defect, null when clean     |
| task        | string        | optional: the kind of question (toy world)                     |
| objects     | string (JSON) | optional ground truth: objects and their boxes (toy world)     |

Several images: `image` is the first, `extra_images` the rest, in order (single-image data sets leave the
column out or null, and are byte-identical to before). Where the images go: the question may hold the
marker IMAGE_MARKER (`<image>`) once per image, in order; without markers every image precedes the
question (the single-image layout). Any other marker count is a bad row.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from mmsae.errors import InputError

IMAGE = "image"
EXTRA_IMAGES = "extra_images"
IMAGE_COLUMNS = (IMAGE, EXTRA_IMAGES)  # the columns that hold image bytes (drop them to read the rest)
IMAGE_MARKER = "<image>"  # where an image goes in the question; one per image, or none (all images first)
REQUIRED_COLUMNS = ("sample_id", "question", "image", "responses", "preferred")
OPTIONAL_COLUMNS = ("extra_images", "corruption", "task", "objects")
PROBLEM = "_problem"  # a reader's (field, message) for a row it could not map; never written


@dataclass
class Record:
    sample_id: str
    question: str
    image: Image.Image | None
    responses: list[str]
    preferred: int
    extras: dict = field(default_factory=dict)
    extra_images: list[Image.Image] = field(default_factory=list)  # images 2..n, in order

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the record, in order (empty when it has none)."""
        return [] if self.image is None else [self.image, *self.extra_images]

    def segments(self) -> list[str | int]:
        """The question as text pieces and image indices, in order: IMAGE_MARKERs replaced by 0, 1, ...;
        without markers every image comes first. ValueError when the marker count is neither 0 nor the
        number of images."""
        n = len(self.images)
        pieces = self.question.split(IMAGE_MARKER)
        if len(pieces) == 1:
            return [*range(n), self.question]
        if len(pieces) - 1 != n:
            raise ValueError(f"{len(pieces) - 1} {IMAGE_MARKER} markers in the question for {n} images")
        out: list[str | int] = []
        for i, piece in enumerate(pieces):
            if i:
                out.append(i - 1)
            if piece.strip():
                out.append(piece.strip())
        return out

    @property
    def text(self) -> str:
        """The question without image markers (what a text-only model reads)."""
        if IMAGE_MARKER not in self.question:
            return self.question
        return " ".join(p.strip() for p in self.question.split(IMAGE_MARKER) if p.strip())

    @property
    def preferred_response(self) -> str | None:
        """The preferred response, or None for records without responses (interleaved documents)."""
        return self.responses[self.preferred] if self.responses else None


def decode_image(data: bytes | None, path: str | os.PathLike, sample_id: str, index: int = 0) -> Image.Image:
    """Image `index` (0: the `image` column, 1..: `extra_images`) of a sample; errors name the index."""
    field_name, which = (IMAGE, "") if index == 0 else (EXTRA_IMAGES, f"image {index + 1}: ")
    if data is None or len(data) == 0:
        raise InputError(path, field_name, f"sample {sample_id!r}: {which}no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # Pillow raises many types for broken files
        raise InputError(path, field_name,
                         f"sample {sample_id!r}: {which}undecodable image ({exc.__class__.__name__})") from exc


def extra_image_bytes(value: object) -> list:
    """The `extra_images` cell as a list (null or a missing column: no extra images)."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(value)


def image_problem(row: dict, check_images: bool = True, max_images: int | None = None) -> tuple[str, str] | None:
    """(field, message) for the first problem with a record's images: a wrong type, more than
    `max_images`, a marker count that is neither 0 nor the image count, an undecodable image."""
    extra = row.get(EXTRA_IMAGES)
    if extra is not None and not (isinstance(extra, float) and extra != extra) and not isinstance(
            extra, list | tuple | np.ndarray):
        return EXTRA_IMAGES, f"expected a list of image bytes, got {type_name(extra)}"
    extra = extra_image_bytes(extra)
    n = 1 + len(extra)
    if max_images is not None and n > max_images:
        return EXTRA_IMAGES, f"{n} images, more than data.max_images_per_sample = {max_images}"
    markers = row["question"].count(IMAGE_MARKER)
    if markers and markers != n:
        return "question", f"{markers} {IMAGE_MARKER} markers for {n} images (one per image, or none)"
    if check_images:
        for i, data in enumerate([row.get(IMAGE), *extra]):
            if i and not isinstance(data, bytes | bytearray):
                return EXTRA_IMAGES, f"image {i + 1}: expected image bytes, got {type_name(data)}"
            try:
                decode_image(data, "", str(row.get("sample_id")), i)
            except InputError as exc:
                return exc.field, exc.message.split(": ", 1)[-1]
    return None


def type_name(value: object) -> str:
    """How a message names a value's type: 'null', 'int', 'str', 'list', ..."""
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    if isinstance(value, np.ndarray):
        return "list"
    return type(value).__name__


def text_problem(value: object, max_chars: int | None) -> str | None:
    """Why `value` is not usable text: a wrong type, blank, or longer than `max_chars`."""
    if not isinstance(value, str):
        return f"expected a string, got {type_name(value)}"
    if not value.strip():
        return "empty text"
    if max_chars is not None and len(value) > max_chars:
        return f"{len(value)} characters, more than data.max_text_chars = {max_chars}"
    return None


def row_problem(row: dict, check_images: bool = True, max_text_chars: int | None = None,
                max_images: int | None = None) -> tuple[str, str] | None:
    """(field, message) for the first problem of one record, or None when it is valid."""
    problem = text_problem(row.get("question"), max_text_chars)
    if problem:
        return "question", problem
    responses, pref = row.get("responses"), row.get("preferred")
    if responses is None:
        responses = []
    if not isinstance(responses, list | tuple | np.ndarray):
        return "responses", f"expected a list of strings, got {type_name(responses)}"
    for i, r in enumerate(responses):
        problem = text_problem(r, max_text_chars)
        if problem:
            return "responses", f"response {i}: {problem}"
    if len(responses):
        if isinstance(pref, bool) or not isinstance(pref, int | np.integer):
            return "preferred", f"expected an integer index, got {type_name(pref)}"
        if not 0 <= int(pref) < len(responses):
            return "preferred", f"index {int(pref)} out of range for {len(responses)} responses"
    return image_problem(row, check_images, max_images)


def validate_frame(df: pd.DataFrame, path: str | os.PathLike, check_images: bool = True,
                   on_bad_row: str = "error", max_text_chars: int | None = None,
                   max_images: int | None = None) -> pd.DataFrame:
    """Check the schema; return a frame of bad rows (sample_id, field, message).

    on_bad_row="error" raises InputError naming file, field and sample for the first bad row;
    "skip" collects every bad row so the caller can drop, count and report them (never silently).
    A duplicated id is a bad row for every row that carries it (no way to tell which one is meant).
    A reader's own findings (an image path outside the root, a field of the wrong type) come in the
    optional column PROBLEM as (field, message) and are reported first.
    Responses may be empty (interleaved documents have none); then `preferred` is ignored.
    """
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise InputError(path, col, "missing column")
    if len(df) == 0:
        raise InputError(path, "sample_id", "data set has no rows")
    ids = df["sample_id"].astype(str)
    duplicated = set(ids[ids.duplicated()])
    found = df[PROBLEM] if PROBLEM in df.columns else pd.Series([None] * len(df), index=df.index)
    bad = []
    columns = [*REQUIRED_COLUMNS, *([EXTRA_IMAGES] if EXTRA_IMAGES in df.columns else [])]
    for row, reader_problem in zip(df[columns].to_dict("records"), found, strict=True):
        sid = str(row["sample_id"])
        problem = reader_problem or (("sample_id", f"duplicate id {sid!r}") if sid in duplicated else None)
        problem = problem or row_problem(row, check_images, max_text_chars, max_images)
        if problem is None:
            continue
        if on_bad_row == "error":
            raise InputError(path, problem[0], f"sample {sid!r}: {problem[1]}")
        bad.append({"sample_id": sid, "field": problem[0], "message": problem[1]})
    return pd.DataFrame(bad, columns=["sample_id", "field", "message"])


def read_frame(path: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise InputError(path, "file", f"not a readable parquet file ({exc.__class__.__name__})") from exc
    validate_frame(df, path, check_images=check_images)
    df["sample_id"] = df["sample_id"].astype(str)
    return df


def records_from_frame(df: pd.DataFrame, path: str | os.PathLike = "<memory>") -> list[Record]:
    extras_cols = [c for c in df.columns if c not in (*REQUIRED_COLUMNS, EXTRA_IMAGES)]
    out = []
    for row in df.itertuples(index=False):
        r = row._asdict()
        out.append(
            Record(
                sample_id=str(r["sample_id"]),
                question=r["question"],
                image=decode_image(r["image"], path, r["sample_id"]),
                responses=list(r["responses"]) if r["responses"] is not None else [],
                preferred=int(r["preferred"]) if r["responses"] is not None and len(r["responses"]) else -1,
                extras={c: r[c] for c in extras_cols},
                extra_images=[decode_image(b, path, r["sample_id"], i)
                              for i, b in enumerate(extra_image_bytes(r.get(EXTRA_IMAGES)), start=1)],
            )
        )
    return out


def read_records(path: str | os.PathLike) -> list[Record]:
    return records_from_frame(read_frame(path), path)
