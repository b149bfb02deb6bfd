"""The explain and explain_score artifacts: file names, parquet schemas, the default explainer prompt."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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


def write_table(df: pd.DataFrame, path: str | os.PathLike, schema: pa.Schema) -> None:
    pq.write_table(pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False), path)
