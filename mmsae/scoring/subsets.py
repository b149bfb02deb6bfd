"""The score artifact's files and the kept subsets: samples.parquet's columns without the image bytes,
subset sizes and names, the best rows of a record frame by a score (`keep_top`), and the id lists
subsets/{method}/top{pct:03d}.parquet (sample_id, rank; the finetune stage reads the records from
samples.parquet: no copy of the images per method x fraction)."""

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
from mmsae.data.lazy import read_meta_table
from mmsae.errors import InputError
from mmsae.features import require_columns
from mmsae.scoring.methods import rank

SUBSETS = "subsets"
SUBSET_COLUMNS = ("sample_id", "rank")  # a subset file: the kept ids, best first, and their rank


def read_samples(folder: str | os.PathLike) -> pa.Table:
    """{folder}/samples.parquet without its image bytes (score needs the ids and texts only), validated."""
    return read_meta_table(Path(folder) / Files.SAMPLES)


def subset_size(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to float noise (0.3 * 10 is 3, not 4)."""
    return min(n, math.ceil(round(fraction * n, 9)))


def subset_name(fraction: float) -> str:
    return f"top{int(round(fraction * 100)):03d}.parquet"


def keep_top(frame: pd.DataFrame, fraction: float, by: str, source: str = "--keep-by") -> pd.DataFrame:
    """The best ceil(fraction * N) rows of a record frame, best first. `by` is 'random:SEED' (seeded
    uniform scores over the sorted sample ids: the `random` method's subset for that seed),
    'PATH:COLUMN' (a parquet with sample_id and a score column, higher = kept first, e.g. IFD's
    ifd.parquet:ifd_score), 'oracle' (clean samples first, from the `corruption` ground truth) or
    'clean' (the clean samples only: the best ceil(fraction * N_clean) of them in sample-id order; at 1
    every clean sample, the clean-pool ceiling). Ties go by sample_id, as in `rank`."""
    if by == "clean":
        if "corruption" not in frame.columns:
            raise InputError(source, "clean", "the data have no 'corruption' ground-truth column")
        frame = frame[frame["corruption"].isna()]
        by = "oracle"  # every row left is clean: sample-id order
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
    """subsets/{method}/top{pct:03d}.parquet: the ids (sample_id, rank) of the best ceil(f*N) samples by
    rank, best first. `samples` (its sample_id column) checks that every scored sample is in
    samples.parquet. Returns {method: {file name: n rows}}."""
    out = Path(out)
    known = pd.Index([str(s) for s in samples.column("sample_id").to_pylist()])
    if (known.get_indexer(scores["sample_id"]) < 0).any():
        raise InputError("scores", "sample_id", "scored sample missing from samples.parquet")
    ids = scores["sample_id"].astype(str).to_numpy()
    written: dict[str, dict[str, int]] = {}
    for m in methods:
        ranks = scores[f"rank_{m}"].to_numpy(np.int64)
        order = np.argsort(ranks, kind="stable")
        (out / m).mkdir(parents=True, exist_ok=True)
        written[m] = {}
        for f in fractions:
            k = subset_size(f, len(order))
            table = pa.table({"sample_id": pa.array(ids[order[:k]], pa.string()),
                              "rank": pa.array(ranks[order[:k]], pa.int64())})
            pq.write_table(table, out / m / subset_name(f))
            written[m][subset_name(f)] = k
    return written


def read_subset(path: str | os.PathLike) -> list[str]:
    """The sample ids of a subset file, best first (checked: the columns, no null or duplicate id)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    table = pq.read_table(path)
    require_columns(path, table.column_names, ("sample_id",))
    ids = table.column("sample_id").to_pylist()
    if any(i is None for i in ids):
        raise InputError(path, "sample_id", "null id")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = pd.Index(ids)[pd.Index(ids).duplicated()][0]
        raise InputError(path, "sample_id", f"duplicate id {dup!r}")
    if "rank" in table.column_names:
        rank_ = table.column("rank").to_numpy()
        if len(rank_) > 1 and (np.diff(rank_) < 0).any():
            raise InputError(path, "rank", "ids are not in rank order (best first)")
    return ids
