"""Bounded memory at real widths, checked at toy widths: codes in parts read selectively, dense code blocks
cut by a byte budget with unchanged results, the streaming top-k and cosine sums against brute force, and
the per-token code cap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from pandas.testing import assert_frame_equal
from test_sae import D, random_sae, synthetic_store

from mmsae.activations import ActivationStore
from mmsae.codes import CodesReader
from mmsae.features import TopK, feature_table, iter_codes, mean_pair_cosine
from mmsae.sae import blocks
from mmsae.sae.encode import encode_store
from mmsae.sae.metrics import evaluate


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    # 20 samples of 15 tokens, zarr chunks of 8 rows
    return ActivationStore(synthetic_store(tmp_path_factory.mktemp("b") / "x", n_samples=20, chunk_tokens=8,
                                           layers=(0,)))


def _codes(path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def test_parts_and_byte_budget_leave_the_codes_unchanged(store, tmp_path, monkeypatch):
    sae = random_sae(d_in=D, d_sae=24, seed=1)
    one = encode_store(sae, store, 0, 0.1, 64, tmp_path / "one", progress=False)
    # 3 rows of codes per dense block (at d_sae 24, fp32) and parts of about 3 samples
    monkeypatch.setattr(blocks, "DENSE_BYTES", 3 * 4 * 24)
    calls = []
    real = type(sae).encode
    monkeypatch.setattr(type(sae), "encode", lambda self, x: calls.append(len(x)) or real(self, x))
    cut = encode_store(sae, store, 0, 0.1, 64, tmp_path / "cut", progress=False, part_tokens=40, row_group=50)
    assert max(calls) == 3 and sum(calls) == store.n_tokens
    assert one["nnz"] == cut["nnz"] and one["n_parts"] == 1 and cut["n_parts"] == 7  # 20 samples / 3
    assert_frame_equal(_codes(tmp_path / "one"), _codes(tmp_path / "cut"))
    # each part: whole samples, its rows and samples as the index says
    reader = CodesReader(tmp_path / "cut")
    tokens = store.tokens
    order = tokens["sample_id"].drop_duplicates().tolist()
    for part, f in zip(reader.parts, reader.files, strict=True):
        rows = pq.read_table(f, columns=["row"])["row"].to_numpy()
        assert len(rows) == part["n_codes"] and rows.min() >= part["row0"] and rows.max() < part["row1"]
        span = tokens.iloc[part["row0"] : part["row1"]]["sample_id"].unique().tolist()
        assert span == order[part["sample0"] : part["sample1"]]
        assert part["row0"] == 0 or tokens["sample_id"].iloc[part["row0"] - 1] != tokens["sample_id"].iloc[part["row0"]]


def test_row_ranges_open_only_their_parts(store, tmp_path):
    sae = random_sae(d_in=D, d_sae=24, seed=1)
    encode_store(sae, store, 0, 0.1, 64, tmp_path / "c", progress=False, part_tokens=40, row_group=50)
    whole = _codes(tmp_path / "c")
    reader = CodesReader(tmp_path / "c")
    p = reader.parts[3]
    got = pd.concat([pd.DataFrame(b) for b in reader.select([(p["row0"], p["row1"])], ["row", "feature", "activation"])])
    want = whole[(whole["row"] >= p["row0"]) & (whole["row"] < p["row1"])][["row", "feature", "activation"]]
    assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert reader.opened == [3]
    # a range inside one part, batches cut as one pass over everything cuts them
    full = list(iter_codes(tmp_path / "c", ["row", "feature"], 37))
    r0, r1 = p["row0"] + 2, p["row1"] - 2
    sub = CodesReader(tmp_path / "c")
    got = list(sub.iter_codes(["row", "feature"], 37, rows=(r0, r1)))
    want = [b for b in full if ((b["row"] >= r0) & (b["row"] < r1)).any()]
    assert len(got) == len(want) and all(np.array_equal(g["row"], w["row"]) for g, w in zip(got, want, strict=True))
    assert set(sub.opened) <= {2, 3, 4}


def test_topk_streaming_equals_a_full_sort():
    rng = np.random.default_rng(0)
    n, n_keys, k = 5000, 40, 7
    key = rng.integers(0, n_keys, n)
    act = rng.integers(0, 20, n).astype(np.float32)  # many ties: broken by the smaller row
    row = rng.permutation(n)
    extra = rng.integers(0, 2, n)
    tracker = TopK(k, n_keys)
    for s in range(0, n, 333):
        tracker.update(key[s : s + 333], act[s : s + 333], row[s : s + 333], extra[s : s + 333])
    got = pd.DataFrame(dict(zip(("key", "act", "row", "extra"), tracker.entries(), strict=True)))
    df = pd.DataFrame({"key": key, "act": act, "row": row, "extra": extra})
    want = (df.assign(neg=-df["act"]).sort_values(["key", "neg", "row"]).groupby("key").head(k)
            .drop(columns="neg").reset_index(drop=True))
    assert_frame_equal(got, want.astype(got.dtypes.to_dict()))


def test_cosine_groups_and_chunks_equal_brute_force(store):
    rng = np.random.default_rng(1)
    text = [rng.choice(store.n_tokens, rng.integers(0, 6), replace=False) for _ in range(9)]
    image = [rng.choice(store.n_tokens, rng.integers(1, 6), replace=False) for _ in range(9)]
    x = store.read(0).astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = [float(unit[t].mean(0) @ unit[i].mean(0)) if len(t) else 0.0 for t, i in zip(text, image, strict=True)]
    # groups of 2 features (max_bytes) and store chunks of 8 rows
    got = mean_pair_cosine(store, 0, text, image, max_bytes=2 * 2 * D * 8)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean_pair_cosine(store, 0, text, image), want, rtol=1e-12, atol=1e-12)


def test_cosine_reads_each_shared_row_once_in_pieces(store, monkeypatch):
    """Rows asked for by many features (a chunk holding many features' top tokens) are read and normalised
    once, in pieces of COSINE_ROWS; the sums are those of brute force."""
    import mmsae.features as F

    rng = np.random.default_rng(2)
    hot = rng.choice(store.n_tokens, 5, replace=False)  # every feature's top tokens include these
    text = [np.r_[hot[:3], rng.choice(store.n_tokens, 3, replace=False)] for _ in range(12)]
    image = [np.r_[hot[3:], rng.choice(store.n_tokens, 2, replace=False)] for _ in range(12)]
    x = store.read(0).astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = [float(unit[t].mean(0) @ unit[i].mean(0)) for t, i in zip(text, image, strict=True)]
    asked: list[int] = []
    iter_rows = store.iter_rows
    monkeypatch.setattr(store, "iter_rows", lambda layer, rows: (asked.extend(rows.tolist()), iter_rows(layer, rows))[1])
    monkeypatch.setattr(F, "COSINE_ROWS", 3)
    got = mean_pair_cosine(store, 0, text, image)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert len(asked) == len(set(asked)) == len(np.unique(np.concatenate(text + image)))


def test_features_from_parts_equal_features_from_one_file(store, tmp_path):
    sae = random_sae(d_in=D, d_sae=24, seed=4)
    encode_store(sae, store, 0, 0.0, 64, tmp_path / "parts", progress=False, part_tokens=40, row_group=50)
    pq.write_table(pq.read_table(tmp_path / "parts"), tmp_path / "one.parquet")
    a = feature_table(tmp_path / "parts", store, 0, 24, top_k=5, min_per_modality=2, batch_rows=61)
    b = feature_table(tmp_path / "one.parquet", store, 0, 24, top_k=5, min_per_modality=2)
    assert (a["class"] == "cross-modal").any()
    assert_frame_equal(a, b)
    # features.cosine_memory_mb: one cross-modal feature's sums per group, one store read each: the same table
    one_per_group = feature_table(tmp_path / "parts", store, 0, 24, top_k=5, min_per_modality=2,
                                  cosine_bytes=2 * D * 8)
    assert_frame_equal(one_per_group, b)


def test_code_cap_keeps_each_tokens_largest(store, tmp_path):
    sae = random_sae(d_in=D, d_sae=24, seed=1)
    full = encode_store(sae, store, 0, 0.0, 64, tmp_path / "all", progress=False)
    capped = encode_store(sae, store, 0, 0.0, 64, tmp_path / "cap", progress=False, max_codes_per_token=3)
    a, c = _codes(tmp_path / "all"), _codes(tmp_path / "cap")
    per_token = a.groupby("row").size()
    assert per_token.max() > 3  # the cap bites
    assert capped["codes_dropped"] == int((per_token - 3).clip(lower=0).sum()) == full["nnz"] - capped["nnz"]
    assert capped["tokens_capped"] == int((per_token > 3).sum())
    want = (a.sort_values(["row", "activation"], ascending=[True, False]).groupby("row").head(3)
            .sort_values(["row", "feature"]).reset_index(drop=True))
    assert_frame_equal(c, want)


def test_evaluation_blocks_bounded_and_unchanged(monkeypatch):
    sae = random_sae(d_in=D, d_sae=24, seed=2)
    x = torch.randn(50, D)
    modality = np.array(["image", "text"] * 25)
    want = evaluate(sae, x, modality)
    monkeypatch.setattr(blocks, "DENSE_BYTES", 4 * 4 * 24)
    sizes = []
    real = type(sae).forward
    monkeypatch.setattr(type(sae), "forward", lambda self, v: sizes.append(len(v)) or real(self, v))
    got = evaluate(sae, x, modality)
    assert max(sizes) == 4
    for part in want:
        for key, value in want[part].items():
            assert got[part][key] == pytest.approx(value, rel=1e-6), (part, key)  # fp32 GEMMs of other shapes
    recon = blocks.reconstruct(sae, x)
    monkeypatch.setattr(type(sae), "forward", real)
    torch.testing.assert_close(recon, sae(x)[0])


def test_evaluate_sae_reads_only_its_samples_and_decodes_per_batch(tmp_path, monkeypatch):
    import pyarrow as pa

    from mmsae.activations.extraction import LazyRecords
    from mmsae.data import schema
    from mmsae.sae.evaluate_sae import read_head

    ids = [f"s{i}" for i in range(10)]
    frame = pd.DataFrame({"sample_id": ids, "question": "q ?", "image": [b"\x89PNG"] * 10,
                          "responses": [["a", "b"]] * 10, "preferred": 0})
    path = tmp_path / "samples.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=3)
    assert read_head(path, 4)["sample_id"].tolist() == ids[:4]
    assert read_head(path, 0)["sample_id"].tolist() == ids
    assert read_head(path, 50)["sample_id"].tolist() == ids
    decoded = []
    monkeypatch.setattr(schema, "decode_image", lambda image, p, sid: decoded.append(sid) or image)
    records = LazyRecords(read_head(path, 4), path)
    assert len(records) == 4 and not decoded
    assert [r.sample_id for r in records[2:4]] == ids[2:4] and decoded == ids[2:4]


def test_token_columns_as_categoricals_give_the_same_split(store):
    from mmsae.sae.training.tokens import select_tokens

    cols = ActivationStore(store.folder).token_columns(["row", "sample_id", "modality"])  # nothing cached
    assert isinstance(cols["modality"].dtype, pd.CategoricalDtype) and list(cols.columns) == ["row", "sample_id", "modality"]
    for scope, special in (("all", False), ("text", True)):
        a = select_tokens(cols, scope, special, 0.3)
        b = select_tokens(store.tokens, scope, special, 0.3)
        assert a.n_eval_samples == b.n_eval_samples > 0
        for field in ("train_rows", "eval_rows", "eval_modality", "eval_in_scope"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_features_of_a_sample_subset_read_only_its_codes(store, tmp_path):
    from mmsae.codes import sample_row_ranges

    sae = random_sae(d_in=D, d_sae=24, seed=4)
    encode_store(sae, store, 0, 0.0, 64, tmp_path / "c", progress=False, part_tokens=40, row_group=50)
    tokens = ActivationStore(store.folder).token_columns(["row", "sample_id"])
    order = tokens["sample_id"].drop_duplicates().astype(str).tolist()
    subset = order[3:6] + order[12:13]  # the samples of parts 1 and 4 only (3 samples per part)
    ranges = sample_row_ranges(tokens["sample_id"], subset)
    assert len(ranges) == 2 and sample_row_ranges(tokens["sample_id"].astype(str), subset) == ranges
    reader = CodesReader(tmp_path / "c")
    got = feature_table(reader, store, 0, 24, top_k=4, min_per_modality=1, row_ranges=ranges)
    assert reader.opened == [1, 4]
    whole = _codes(tmp_path / "c")
    want = feature_table(whole[whole["sample_id"].isin(subset)], store, 0, 24, top_k=4, min_per_modality=1)
    assert_frame_equal(got, want)
    assert_frame_equal(feature_table(whole, store, 0, 24, top_k=4, min_per_modality=1, row_ranges=ranges), want)


def test_offdist_centre_distance_by_column_blocks_equals_the_whole_array(monkeypatch):
    """offdist's distance to the pool's median mean-unit vector, a block of columns at a time (a 40K x 4,096
    float64 array and its median copies were ~5 GB), equals the formula on the whole array."""
    from mmsae.scoring import offdist

    rng = np.random.default_rng(0)
    unit = rng.normal(size=(50, 23))
    count = rng.integers(0, 4, 50).astype(float)
    has = count > 0
    c = np.maximum(count, 1.0)
    mean = unit / c[:, None]
    want = np.linalg.norm(mean - np.median(mean[has], axis=0), axis=1)
    monkeypatch.setattr(offdist, "CENTRE_COLUMNS", 5)  # 5 blocks, the last one short
    np.testing.assert_allclose(offdist.centre_distance(unit, c, has), want, rtol=1e-12)
