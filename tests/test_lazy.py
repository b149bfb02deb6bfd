"""Records read lazily (mmsae.data.lazy) and the finetune stage's data: an id list over samples.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmsae.data import lazy
from mmsae.data.schema import read_frame, read_records
from mmsae.errors import InputError
from mmsae.finetune import Inputs, read_data
from mmsae.scoring.subsets import keep_top


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """A toy-world samples.parquet of 23 records in several row groups, with a corruption column."""
    from mmsae.data import toyworld

    df = toyworld.generate(0, 23, 0.4, ["mismatch", "noise_image"], 10, 10)["pool"]
    path = tmp_path_factory.mktemp("samples") / "samples.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=10)
    return path


def _same(got, want) -> None:
    assert [r.sample_id for r in got] == [r.sample_id for r in want]
    for a, b in zip(got, want, strict=True):
        assert (a.question, a.responses, a.preferred, a.extras.keys()) == (b.question, b.responses, b.preferred,
                                                                           b.extras.keys())
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_parquet_records_equal_the_decoded_records_batch_by_batch(samples, monkeypatch):
    monkeypatch.setattr(lazy, "STREAM_ROWS", 4)  # batches of the stream cut across the slices
    want = read_records(samples)
    rec = lazy.ParquetRecords(samples)
    assert len(rec) == 23 and rec.sample_ids == [r.sample_id for r in want]
    got = [r for a in range(0, 23, 5) for r in rec[a : a + 5]]  # in order: one pass over the file
    _same(got, want)
    assert len(rec._buf) <= 5 + 4  # the stream holds at most one slice plus one batch of image bytes
    _same(rec[2:4], want[2:4])  # going back restarts the stream
    _same([rec[-1]], want[-1:])
    assert rec[7:7] == []


def test_parquet_records_stream_every_image_of_multi_image_records(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "STREAM_ROWS", 3)
    df = pd.read_parquet(samples)
    # rows 1, 4, 7, ...: two more images each (other rows' images), placed after the question
    df["extra_images"] = [[df["image"][(i + 1) % len(df)], df["image"][(i + 2) % len(df)]] if i % 3 == 1 else []
                          for i in range(len(df))]
    path = tmp_path / "multi.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=5)
    want = read_records(path)
    rec = lazy.ParquetRecords(path)
    assert not {"image", "extra_images"} & set(rec.meta.columns)  # no image bytes held beyond a batch
    got = [r for a in range(0, len(df), 4) for r in rec[a : a + 4]]
    _same(got, want)
    assert [len(r.images) for r in got] == [3 if i % 3 == 1 else 1 for i in range(len(df))]
    for a, b in zip(got, want, strict=True):
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))


def test_read_rows_keeps_only_the_ids_in_their_order(samples):
    full = read_frame(samples)
    ids = [full["sample_id"][i] for i in (17, 3, 9)]
    rows = lazy.read_rows(samples, ids)
    pd.testing.assert_frame_equal(rows, full.iloc[[17, 3, 9]].reset_index(drop=True))
    with pytest.raises(InputError, match="'nope' is not in"):
        lazy.read_rows(samples, [ids[0], "nope"], "subset.parquet")
    meta = lazy.read_meta(samples)
    assert "image" not in meta.columns
    pd.testing.assert_frame_equal(meta, full.drop(columns="image"))


def test_finetune_reads_an_id_list_or_a_kept_fraction_as_the_whole_frame_would(samples, tmp_path):
    """The subset, read from samples.parquet + ids, is the frame the finetune stage had from a copied subset
    (same rows, same order), and --keep-by chooses on the columns without images the rows it chose before."""
    full = read_frame(samples)
    order = full.sample(frac=1.0, random_state=0)["sample_id"].tolist()[:9]
    ids = tmp_path / "top040.parquet"
    pq.write_table(pa.table({"sample_id": order, "rank": list(range(1, 10))}), ids)
    got = read_data(Inputs(model="m", data=samples, ids=ids))
    pd.testing.assert_frame_equal(got, full.set_index("sample_id").loc[order].reset_index()[full.columns])
    for by in ("random:3", "oracle"):
        got = read_data(Inputs(model="m", data=samples, keep_fraction=0.4, keep_by=by))
        pd.testing.assert_frame_equal(got, keep_top(full, 0.4, by))
    pd.testing.assert_frame_equal(read_data(Inputs(model="m", data=samples)), full)
    with pytest.raises(InputError, match="exclude"):
        read_data(Inputs(model="m", data=samples, ids=ids, keep_fraction=0.5, keep_by="oracle"))


def test_the_sample_stage_writes_small_row_groups(samples, tmp_path):
    """samples.parquet in row groups of SAMPLE_ROW_GROUP rows: a reader streams one group's images at a time
    (within a row group, parquet reads a column chunk whole)."""
    from mmsae.data import sample
    from mmsae.params import SampleParams

    sample.run(sample.Inputs(data=samples), SampleParams.load({"n": None}), tmp_path / "sample-x")
    md = pq.ParquetFile(tmp_path / "sample-x" / "samples.parquet").metadata
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    assert sum(sizes) == 23 and max(sizes) <= sample.SAMPLE_ROW_GROUP

