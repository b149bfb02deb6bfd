"""The layout of the encode stage's codes, written and read in one place.

codes.parquet is a folder (a parquet data set that pandas / pyarrow open as one table):

  codes.parquet/part-00000.parquet ...   the codes of a contiguous run of whole samples each, in store-row
                                         order, row groups of at most ROW_GROUP codes
  codes.parquet/_index.json              per part: file, n_codes, row0 / row1 (store rows [row0, row1)),
                                         sample0 / sample1 (samples [sample0, sample1) in store order)

(`_`-prefixed files are skipped by pyarrow's data set discovery.) A single parquet file with the same
columns (older artifacts, hand-built test inputs) is read as one part.

`CodesReader.iter_codes` yields the codes in batches of `batch_rows` codes cut at the same code offsets
as one pass over the concatenated parts, whichever parts a caller reads: a score shard's batches are
exactly one job's batches (`rows=`), so every per-sample sum is accumulated in the same order. `select`
yields only the codes of given row ranges, opening only the parts and row groups that hold them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmsae.activations.store import TOKEN_SCHEMA
from mmsae.errors import InputError

INDEX = "_index.json"
ROW_GROUP = 1 << 20  # codes per row group: one streaming batch (features / score read 2^20 at a time)

# a code's token key (the token index's first columns, one home: TOKEN_SCHEMA), then the code
CODES_SCHEMA = pa.schema([*(TOKEN_SCHEMA.field(c) for c in ("row", "sample_id", "position", "modality")),
                          ("feature", pa.int32()), ("activation", pa.float32())])


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


class CodesWriter:
    """Append code tables (store-row order); a new part starts at a sample boundary once the current part
    holds `part_tokens` tokens. `close()` writes the index."""

    def __init__(self, folder: str | os.PathLike, part_tokens: int, row_group: int = ROW_GROUP) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.part_tokens, self.row_group = max(1, int(part_tokens)), int(row_group)
        self.parts: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_n = 0

    def _flush(self) -> None:
        if self._pending:
            assert self._writer is not None
            self._writer.write_table(pa.concat_tables(self._pending).combine_chunks(), row_group_size=self.row_group)
            self._pending, self._pending_n = [], 0

    def start_part(self, row0: int, sample0: int) -> None:
        self.close_part()
        name = part_name(len(self.parts))
        self._writer = pq.ParquetWriter(str(self.folder / name), CODES_SCHEMA)
        self.parts.append({"file": name, "n_codes": 0, "row0": int(row0), "row1": int(row0),
                           "sample0": int(sample0), "sample1": int(sample0)})

    def needs_new_part(self) -> bool:
        p = self.parts[-1] if self.parts else None
        return p is None or p["row1"] - p["row0"] >= self.part_tokens

    def write(self, table: pa.Table, row1: int, sample1: int) -> None:
        """Codes of store rows up to row1 (exclusive) and samples up to sample1 (exclusive)."""
        p = self.parts[-1]
        p["n_codes"] += len(table)
        p["row1"], p["sample1"] = int(row1), int(sample1)
        self._pending.append(table)
        self._pending_n += len(table)
        if self._pending_n >= self.row_group:  # whole row groups; the rest waits for the next table
            self._flush()

    def close_part(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[dict]:
        self.close_part()
        (self.folder / INDEX).write_text(json.dumps({"parts": self.parts}, indent=1))
        return self.parts


class CodesReader:
    """Codes of an encode artifact (codes.parquet folder or a single parquet file); see the module docstring."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "path", "file does not exist")
        if self.path.is_dir():
            index = self.path / INDEX
            try:
                self.parts = json.loads(index.read_text())["parts"]
            except (OSError, ValueError, KeyError) as e:
                raise InputError(index, "parts", f"unreadable codes index ({e})") from None
            self.files = [self.path / p["file"] for p in self.parts]
        else:
            self.files, self.parts = [self.path], [None]
        self._pf: dict[int, pq.ParquetFile] = {}
        self._groups: dict[int, np.ndarray] = {}
        if self.parts and self.parts[0] is None:
            n_codes = [self._file(0).metadata.num_rows]
        else:
            n_codes = [int(p["n_codes"]) for p in self.parts]
        self.starts = np.cumsum([0, *n_codes]).astype(np.int64)  # code offset of each part (len + 1)

    def _file(self, i: int) -> pq.ParquetFile:
        """Part i, opened (its footer read) on first use only."""
        if i not in self._pf:
            if not self.files[i].exists():
                raise InputError(self.files[i], "path", "file does not exist")
            # pre_buffer off: with it, arrow caches the column chunks of every row group it will read
            self._pf[i] = pq.ParquetFile(self.files[i], pre_buffer=False)
        return self._pf[i]

    @property
    def names(self) -> list[str]:
        if not self.files:
            return CODES_SCHEMA.names
        if not self.files[0].exists():
            raise InputError(self.files[0], "path", "file does not exist")
        return pq.read_schema(self.files[0]).names  # the footer only; the part is not kept open

    @property
    def opened(self) -> list[int]:
        """The parts opened so far (the selective reads' test hook)."""
        return sorted(self._pf)

    def _group_starts(self, i: int) -> np.ndarray:
        """Code offsets (within part i) of its row groups (len + 1)."""
        if i not in self._groups:
            md = self._file(i).metadata
            self._groups[i] = np.cumsum([0, *(md.row_group(g).num_rows for g in range(md.num_row_groups))]).astype(np.int64)
        return self._groups[i]

    def _stats(self, i: int, g: int) -> tuple[int, int] | None:
        pf = self._pf[i]
        st = pf.metadata.row_group(g).column(pf.schema_arrow.get_field_index("row")).statistics
        return (int(st.min), int(st.max)) if st is not None and st.has_min_max else None

    def _check_sorted(self, i: int) -> None:
        if "row" not in self._pf[i].schema_arrow.names:
            return  # require_columns names the missing column
        last = -1
        for g in range(self._pf[i].metadata.num_row_groups):
            st = self._stats(i, g)
            if st is None:
                continue
            if st[0] < last:
                raise InputError(self.files[i], "row", "codes are not ordered by row (needed to read them by row range)")
            last = st[1]

    def _first_at_least(self, value: int) -> int:
        """Offset (over all parts) of the first code whose row is >= value."""
        for i, part in enumerate(self.parts):
            if self.starts[i + 1] == self.starts[i] or (part is not None and part["row1"] <= value):
                continue  # empty, or the index says the whole part is below
            if part is not None and part["row0"] >= value:
                return int(self.starts[i])  # the index says the whole part is at or above
            gs = self._group_starts(i)
            self._check_sorted(i)  # a range read relies on row order (hand-built unsorted codes stream fine)
            for g in range(len(gs) - 1):
                st = self._stats(i, g)
                if st is not None and st[1] < value:
                    continue
                rows = self._file(i).read_row_group(g, columns=["row"]).column("row").to_numpy()
                j = int(np.searchsorted(rows, value, side="left"))
                if j < len(rows):
                    return int(self.starts[i] + gs[g]) + j
        return int(self.starts[-1])

    def iter_codes(self, columns: Sequence[str], batch_rows: int = ROW_GROUP,
                   rows: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Column arrays, batch_rows codes at a time, cut at global code offsets. With rows=(row0, row1):
        only the batches that hold codes of store rows [row0, row1), whole (codes of other rows included)."""
        columns = list(columns)
        from mmsae.features import require_columns  # the one 'missing column' error

        if self.files:
            require_columns(self.files[0], self.names, [*columns, *(["row"] if rows else [])])
        total = int(self.starts[-1])
        if rows is None:
            c0, c1 = 0, total
        else:
            c0, c1 = self._first_at_least(int(rows[0])), self._first_at_least(int(rows[1]))
        yield from self._span(columns, batch_rows, c0, c1, aligned=True)

    def _span(self, columns: list[str], batch_rows: int, c0: int, c1: int, aligned: bool) -> Iterator[dict[str, np.ndarray]]:
        """Batches over codes [c0, c1): cut at global multiples of batch_rows and whole (aligned), or cut
        from c0 and ending at c1."""
        if c0 >= c1:
            return
        total = int(self.starts[-1])
        cached: tuple[tuple[int, int], pa.Table] | None = None
        for b0 in range((c0 // batch_rows) * batch_rows if aligned else c0, c1, batch_rows):
            b1 = min(b0 + batch_rows, total if aligned else c1)
            pieces = []
            for i in range(int(np.searchsorted(self.starts, b0, side="right")) - 1, len(self.files)):
                p0 = int(self.starts[i])
                if p0 >= b1:
                    break
                if int(self.starts[i + 1]) <= b0:
                    continue
                gs = self._group_starts(i) + p0
                for g in range(max(0, int(np.searchsorted(gs, b0, side="right")) - 1), len(gs) - 1):
                    g0, g1 = int(gs[g]), int(gs[g + 1])
                    if g0 >= b1:
                        break
                    if cached is None or cached[0] != (i, g):
                        cached = ((i, g), self._file(i).read_row_group(g, columns=columns))
                    lo, hi = max(b0, g0), min(b1, g1)
                    pieces.append(cached[1].slice(lo - g0, hi - lo))
            batch = pa.concat_tables(pieces).combine_chunks()
            yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}

    def select(self, ranges: Sequence[tuple[int, int]], columns: Sequence[str],
               batch_rows: int = ROW_GROUP) -> Iterator[dict[str, np.ndarray]]:
        """Only the codes of store rows in the (sorted, disjoint) `ranges`, reading only the parts and row
        groups that hold them (a features subset, a sample range of the browser)."""
        columns = list(columns)
        need = list(dict.fromkeys([*columns, "row"]))
        from mmsae.features import require_columns

        if self.files:
            require_columns(self.files[0], self.names, need)
        for row0, row1 in ranges:
            c0, c1 = self._first_at_least(int(row0)), self._first_at_least(int(row1))
            for batch in self._span(need, batch_rows, c0, c1, aligned=False):
                yield {c: batch[c] for c in columns}


def sample_row_ranges(sample_id: pd.Series, wanted: Iterable[str]) -> list[tuple[int, int]]:
    """The store-row ranges [row0, row1) of the `wanted` samples, adjacent ones merged, from tokens.parquet's
    sample_id column in row order (a categorical from ActivationStore.token_columns, or strings): what
    `CodesReader.select` takes to read a sample subset's codes only."""
    codes, cats = pd.factorize(sample_id, sort=False)
    n = len(codes)
    if n == 0:
        return []
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], n]
    keep = np.isin(np.asarray(cats.astype(str))[codes[starts]], list({str(w) for w in wanted}))
    out: list[tuple[int, int]] = []
    for a, b in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
