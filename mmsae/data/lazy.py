"""Records read lazily: memory bounded by a batch of images, never by the data set's size.

- `LazyRecords`: the records of an in-memory samples frame, decoded when sliced (extraction's parts).
- `ParquetRecords`: the records of a samples.parquet, the image bytes streamed from the file batch by
  batch as the records are sliced in order (model_loss, baseline_scores): the text columns are held, the
  images (encoded or decoded) of one batch only.
- `read_meta` / `read_meta_table`: samples.parquet without its image bytes (pandas / arrow); `read_rows`: its records for a list of ids only
  (finetune on a kept subset), streamed, so the other rows' images are never held.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmsae.data.schema import IMAGE_COLUMNS, REQUIRED_COLUMNS, records_from_frame, validate_frame
from mmsae.errors import InputError

STREAM_ROWS = 64  # rows per streamed batch of samples.parquet (about 64 encoded images in memory)
STREAM_BUFFER = 1 << 20  # bytes: the file is read through a buffered stream, not a column chunk at a time


class LazyRecords(Sequence):
    """The records of a samples frame, decoded when sliced: an extraction job holds the images of one
    part at a time, not those of the whole data set (nor of the other shards)."""

    def __init__(self, frame: pd.DataFrame, path: str | os.PathLike = "<memory>") -> None:
        self.frame, self.path = frame.reset_index(drop=True), path
        self.sample_ids = self.frame["sample_id"].astype(str).tolist()

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return records_from_frame(self.frame.iloc[i], self.path)
        return records_from_frame(self.frame.iloc[[i]], self.path)[0]


def _open(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    try:
        return pq.ParquetFile(path, buffer_size=STREAM_BUFFER, pre_buffer=False)
    except Exception as exc:
        raise InputError(path, "file", f"not a readable parquet file ({exc.__class__.__name__})") from exc


def read_meta_table(path: str | os.PathLike) -> pa.Table:
    """samples.parquet's columns but the image bytes, as arrow (the ids and texts of a 40K-sample pool;
    its images are tens of GB), validated without decoding images."""
    path = Path(path)
    names = _open(path).schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(path, missing[0], "missing column")
    table = pq.read_table(path, columns=[c for c in names if c not in IMAGE_COLUMNS])
    validate_frame(table.to_pandas().assign(image=None), path, check_images=False)
    return table


def read_meta(path: str | os.PathLike) -> pd.DataFrame:
    """`read_meta_table` as a frame with string sample ids; `image` is absent."""
    df = read_meta_table(path).to_pandas()
    df["sample_id"] = df["sample_id"].astype(str)
    return df


class ParquetRecords(Sequence):
    """The records of a samples.parquet file; images read and decoded per slice. Slices taken in order (as
    every batch loop does) stream the file once; going back restarts the stream."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path).reset_index(drop=True)
        self.sample_ids = self.meta["sample_id"].tolist()
        names = _open(self.path).schema_arrow.names
        self._columns = [c for c in IMAGE_COLUMNS if c in names]  # the first image, and any further ones
        self._stream = None
        self._buf: pa.Table | None = None
        self._buf_start = 0  # file row of self._buf[0]

    def __len__(self) -> int:
        return len(self.meta)

    def _images(self, a: int, b: int) -> dict[str, list]:
        """The image columns of rows [a, b)."""
        if self._stream is None or a < self._buf_start:
            self._stream = _open(self.path).iter_batches(STREAM_ROWS, columns=self._columns)
            self._buf, self._buf_start = None, 0
        while self._buf_start + (0 if self._buf is None else self._buf.num_rows) < b:
            batch = pa.Table.from_batches([next(self._stream)])
            if self._buf is None:
                self._buf = batch
                continue
            drop = min(max(0, a - self._buf_start), self._buf.num_rows)  # rows before a are never needed again
            self._buf = pa.concat_tables([self._buf.slice(drop), batch.cast(self._buf.schema)])
            self._buf_start += drop
        part = self._buf.slice(a - self._buf_start, b - a)
        return {c: part.column(c).to_pylist() for c in self._columns}

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                raise ValueError("ParquetRecords: only contiguous slices")
            if b <= a:
                return []
            frame = self.meta.iloc[a:b].assign(**self._images(a, b))
            return records_from_frame(frame, self.path)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self[i : i + 1][0]


def read_rows(path: str | os.PathLike, ids: Sequence[str], source: str | os.PathLike = "<ids>") -> pd.DataFrame:
    """The rows of samples.parquet whose sample_id is in `ids`, in the order of `ids`, every column (images
    as bytes), validated with their images; the file is streamed, so only the kept rows' images are held.
    An id not in the file is an InputError naming `source`."""
    path = Path(path)
    wanted = pd.Index([str(i) for i in ids])
    pf = _open(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(path, missing[0], "missing column")
    pieces = []
    for batch in pf.iter_batches(STREAM_ROWS):
        sid = pd.Index([str(s) for s in batch.column("sample_id").to_pylist()])
        keep = sid.isin(wanted)
        if keep.any():
            pieces.append(pa.Table.from_batches([batch]).filter(pa.array(keep)))
    table = pa.concat_tables(pieces) if pieces else pf.schema_arrow.empty_table()
    df = table.to_pandas()
    df["sample_id"] = df["sample_id"].astype(str)
    validate_frame(df, path)
    got = pd.Index(df["sample_id"])
    absent = wanted[~wanted.isin(got)]
    if len(absent):
        raise InputError(source, "sample_id", f"sample {absent[0]!r} is not in {path}")
    return df.iloc[got.get_indexer(wanted)].reset_index(drop=True)


__all__ = ["LazyRecords", "ParquetRecords", "read_meta", "read_rows"]
