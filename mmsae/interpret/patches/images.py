"""Labelled images for patch filtering: an ImageFolder, or the toy world's held-out split labelled by the
answer to a question."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from mmsae.data import decode_image, sample_frame, toyvocab, toyworld
from mmsae.errors import InputError

log = logging.getLogger("mmsae.patches")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
