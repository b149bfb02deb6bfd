"""The score artifact's files and the kept subsets: samples.parquet read as arrow, subset sizes and names,
the best rows of a record frame by a score (`keep_top`), and subsets/{method}/top{pct:03d}.parquet."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmsae.artifacts import Files
from mmsae.data.schema import IMAGE_COLUMNS, REQUIRED_COLUMNS, validate_frame
from mmsae.errors import InputError
from mmsae.features import require_columns
from mmsae.scoring.methods import rank

SUBSETS = "subsets"


def read_samples(folder: str | os.PathLike) -> pa.Table:
    """{folder}/samples.parquet as an arrow table (its exact schema, for the subsets), validated
    without decoding images."""
    path = Path(folder) / Files.SAMPLES
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    table = pq.read_table(path)
    require_columns(path, table.column_names, REQUIRED_COLUMNS)
    meta = table.drop_columns([c for c in IMAGE_COLUMNS if c in table.column_names]).to_pandas()
    validate_frame(meta.assign(image=None), path, check_images=False)
    return table


def subset_size(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to float noise (0.3 * 10 is 3, not 4)."""
    return min(n, math.ceil(round(fraction * n, 9)))


def subset_name(fraction: float) -> str:
    return f"top{int(round(fraction * 100)):03d}.parquet"


def keep_top(frame: pd.DataFrame, fraction: float, by: str, source: str = "--keep-by") -> pd.DataFrame:
    """The best ceil(fraction * N) rows of a record frame, best first. `by` is 'random:SEED' (seeded
    uniform scores over the sorted sample ids: the `random` method's subset for that seed),
    'PATH:COLUMN' (a parquet with sample_id and a score column, higher = kept first, e.g. IFD's
    ifd.parquet:ifd_score) or 'oracle' (clean samples first, from the `corruption` ground truth).
    Ties go by sample_id, as in `rank`."""
    ids = frame["sample_id"].astype(str).to_numpy()
    order = np.argsort(ids, kind="stable")  # the frame's rows in sorted-id order
    if by == "oracle":  # the ground truth as a selection: clean first (the curve's ceiling on the toy world)
        if "corruption" not in frame.columns:
            raise InputError(source, "oracle", "the data have no 'corruption' ground-truth column")
        scores = frame["corruption"].isna().to_numpy(np.float64)[order]
    elif by.startswith("random:"):
        try:
            seed = int(by[len("random:"):])
        except ValueError:
            raise InputError(source, "random seed", f"not an integer in {by!r}") from None
        scores = np.random.default_rng(seed).random(len(ids))
    else:
        path, sep, column = by.rpartition(":")
        if not sep or not path:
            raise InputError(source, "value", f"expected 'random:SEED' or 'PATH:COLUMN', got {by!r}")
        table = pd.read_parquet(path)
        require_columns(path, list(table.columns), ("sample_id", column))
        lookup = pd.Series(table[column].to_numpy(np.float64), index=table["sample_id"].astype(str))
        if lookup.index.has_duplicates:
            raise InputError(path, "sample_id", "duplicate sample ids")
        scores = lookup.reindex(ids[order]).to_numpy()
        if np.isnan(scores).any():
            missing = ids[order][np.isnan(scores)][0]
            raise InputError(path, column, f"no finite score for sample {missing!r}")
    best = order[np.argsort(rank(scores), kind="stable")]
    return frame.iloc[best[:subset_size(fraction, len(ids))]].reset_index(drop=True)


def write_subsets(samples: pa.Table, scores: pd.DataFrame, methods: Sequence[str], fractions: Sequence[float],
                  out: str | os.PathLike) -> dict[str, dict[str, int]]:
    """subsets/{method}/top{pct:03d}.parquet: the best ceil(f*N) samples by rank, in rank order, in the
    samples' own schema (every column, same types). Returns {method: {file name: n rows}}."""
    out = Path(out)
    pos = pd.Index([str(s) for s in samples.column("sample_id").to_pylist()]).get_indexer(scores["sample_id"])
    if (pos < 0).any():
        raise InputError("scores", "sample_id", "scored sample missing from samples.parquet")
    written: dict[str, dict[str, int]] = {}
    for m in methods:
        order = pos[np.argsort(scores[f"rank_{m}"].to_numpy(), kind="stable")]
        (out / m).mkdir(parents=True, exist_ok=True)
        written[m] = {}
        for f in fractions:
            k = subset_size(f, len(order))
            pq.write_table(samples.take(pa.array(order[:k])), out / m / subset_name(f))
            written[m][subset_name(f)] = k
    return written
