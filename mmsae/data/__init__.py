"""Data sets: one record schema, readers that validate it, deterministic sampling, the toy world."""

from mmsae.data.sample import sample_frame
from mmsae.data.schema import (
    EXTRA_IMAGES,
    IMAGE,
    IMAGE_MARKER,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    Record,
    decode_image,
    read_records,
    records_from_frame,
    validate_frame,
)

__all__ = [
    "EXTRA_IMAGES",
    "IMAGE",
    "IMAGE_MARKER",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "Record",
    "decode_image",
    "read_records",
    "records_from_frame",
    "sample_frame",
    "validate_frame",
]
