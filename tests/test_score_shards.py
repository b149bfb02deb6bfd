"""Scoring in shards (score.shards): every method, sharded and gathered, equals one job exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import consistency
from test_sae import synthetic_store, tiny_params

from mmsae.activations import ActivationStore
from mmsae.artifacts import write_manifest
from mmsae.codes import CodesReader
from mmsae.errors import InputError
from mmsae.features import feature_table, feature_weights, iter_codes, write_features
from mmsae.params import ScoreParams
from mmsae.sae.encode import encode_store
from mmsae.sae.io import load_sae
from mmsae.sae.training import train_sae
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import METHODS, score_samples
from mmsae.scoring.shards import (
    CodesRange,
    StoreRows,
    gather_context,
    score_gathered,
    shard_folder,
    shard_samples,
    shard_statistics,
    write_shard,
)
from mmsae.scoring.stage import Inputs, run

N_SAMPLES = 23


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """extract -> train_sae -> encode -> features on a synthetic store: 23 samples of 15 tokens, zarr chunks
    of 8 rows (score's store blocks: 64 rows, so samples straddle blocks), codes written in blocks of 50
    tokens into parts of about 4 samples (many parts and row groups)."""
    tmp = tmp_path_factory.mktemp("chain")
    store = ActivationStore(synthetic_store(tmp / "extract", n_samples=N_SAMPLES, chunk_tokens=8, layers=(0,)))
    train_sae(store, tiny_params(steps=10, checkpoint_every=10, expansion=2, buffer_chunks=16), tmp / "train_sae",
              tmp / "ck", progress=False)
    sae = load_sae(tmp / "train_sae")
    encode = tmp / "encode"
    encode.mkdir()
    # parts of about 4 samples, row groups of 100 codes: batches cut across row groups and parts
    encode_store(sae, store, 0, 0.0, 50, encode / "codes.parquet", progress=False, part_tokens=60, row_group=100)
    write_manifest(encode, "encode", {}, counts={"layer": 0, "d_sae": sae.cfg.d_sae})
    features = tmp / "features"
    features.mkdir()
    table = feature_table(encode / "codes.parquet", store, 0, sae.cfg.d_sae, top_k=6, min_per_modality=2)
    write_features(table, features / "features.parquet")
    write_manifest(features, "features", {"rule": "per_modality"})
    ids = sorted(store.tokens["sample_id"].unique())
    samples = tmp / "samples"
    samples.mkdir()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame({
        "sample_id": ids, "question": "q ?", "image": [b"\x89PNG"] * len(ids), "responses": [["a", "b"]] * len(ids),
        "preferred": 0}), preserve_index=False), samples / "samples.parquet")
    write_manifest(samples, "sample", {})
    loss = tmp / "model_loss"
    loss.mkdir()
    pd.DataFrame({"sample_id": ids, "loss": np.linspace(2.0, 0.5, len(ids)), "n_tokens": 1}).to_parquet(
        loss / "loss.parquet")
    write_manifest(loss, "model_loss", {})
    return {"store": store, "sae": sae, "codes": encode / "codes.parquet", "features": table, "ids": ids,
            "dirs": {"extract": store.folder, "encode": encode, "features": features, "samples": samples,
                     "model_loss": loss, "sae": tmp / "train_sae"}}


def test_shard_samples_partition_rows_in_store_order():
    tokens = pd.DataFrame({"row": np.arange(9), "sample_id": ["b", "b", "a", "a", "a", "c", "d", "d", "d"]})
    assert shard_samples(tokens, ["a", "b", "c", "d"], 2) == [(["b", "a"], 0, 5), (["c", "d"], 5, 9)]
    # more shards than samples: empty shards; a scored sample without tokens goes to the last shard
    assert shard_samples(tokens, ["a", "b", "x"], 3) == [([], 0, 0), (["b"], 0, 2), (["a", "x"], 2, 9)]
    with pytest.raises(InputError, match="not contiguous"):
        shard_samples(pd.DataFrame({"row": np.arange(3), "sample_id": ["a", "b", "a"]}), ["a", "b"], 2)


def test_codes_range_yields_the_batches_of_one_pass(chain):
    """CodesRange cuts batches as iter_codes over the whole file does (across row groups), keeping only
    those that hold the shard's rows; all rows of the range are in them."""
    codes = chain["codes"]
    reader = CodesReader(codes)
    assert len(reader.files) > 3 and sum(len(reader._group_starts(i)) - 1 for i in range(len(reader.files))) > 10
    full = list(iter_codes(codes, ("row", "feature", "activation"), 37))
    rows = pq.read_table(codes, columns=["row"]).column("row").to_numpy()
    for row0, row1 in [(0, 100), (100, 101), (130, 345), (300, 10**9), (50, 50)]:
        got = list(CodesRange(codes, row0, row1).iter_codes(("row", "feature", "activation"), 37))
        want = [b for b in full if ((b["row"] >= row0) & (b["row"] < row1)).any()]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert all(np.array_equal(g[c], w[c]) for c in w)
        n_in = sum(int(((b["row"] >= row0) & (b["row"] < row1)).sum()) for b in got)
        assert n_in == int(((rows >= row0) & (rows < row1)).sum())


def test_store_rows_yields_the_blocks_holding_its_rows(chain):
    store = chain["store"]
    blocks = dict(store.iter_blocks(0, 64))
    view = dict(StoreRows(store, 100, 200).iter_blocks(0, 64))
    assert sorted(view) == [64, 128, 192]
    assert all(np.array_equal(view[s], blocks[s]) for s in view)
    assert dict(StoreRows(store, 5, 5).iter_blocks(0, 64)) == {}


@pytest.mark.parametrize("n_shards", [3, 7])
def test_sharded_scores_equal_one_job(chain, tmp_path, n_shards):
    """Every method; small codes batches (37 rows) and 64-row store blocks, so samples straddle both."""
    methods = list(METHODS)
    losses = pd.read_parquet(chain["dirs"]["model_loss"] / "loss.parquet")
    context = dict(codes=chain["codes"], weights=feature_weights(chain["features"], chain["sae"].cfg.d_sae),
                   store=chain["store"], layer=0, losses=losses, seed=3, features=chain["features"], sae=chain["sae"],
                   consistency=consistency({"min_per_modality": 2, "min_selectivity": 0.0, "max_doc_freq": 1.0}),
                   batch_rows=37)
    one = ScoringContext(chain["ids"], **context)
    want = score_samples(one, methods)
    shards = []
    for k in range(n_shards):
        result = shard_statistics(chain["store"], chain["codes"], 0, chain["ids"], methods, k, n_shards,
                                  sae=chain["sae"], batch_rows=37)
        shards.append(tmp_path / f"{k:04d}")
        shards[-1].mkdir()
        write_shard(shards[-1], result, k, n_shards)
    ctx, done = gather_context(shards, chain["ids"], **context)
    got = score_gathered(ctx, methods, done)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert (want["score_cosine"] != 0).any() and (want["score_offdist"] != 0).any()
    assert int(one.concept_features["selected"].sum()) > 0  # the consistency path is exercised
    for key in ("l0", "l1", "image_l0", "cooc_sample", "cooc_feature", "modalities"):
        assert np.array_equal(ctx.code_stats[key], one.code_stats[key]), key
    for key in ("count", "unit_sum", "error"):
        assert np.array_equal(ctx.image_stats[key], one.image_stats[key]), key
    with pytest.raises(InputError, match="expected 0 of"):
        gather_context(shards[1:], chain["ids"], **context)


def _run(chain, out: Path, shards: int = 1, **mode) -> None:
    d = chain["dirs"]
    inputs = Inputs(samples=d["samples"], extract=d["extract"], encode=d["encode"], features=d["features"],
                    model_loss=d["model_loss"], sae=d["sae"], **mode)
    run(inputs, ScoreParams.load({"fractions": [0.3, 1.0], "shards": shards}), out)


def test_score_stage_sharded_equals_unsharded(chain, tmp_path):
    _run(chain, tmp_path / "score-one")
    out = tmp_path / "score-three"
    for k in range(3):
        _run(chain, out, shards=3, shard=k)
        assert (shard_folder(out, k) / "manifest.json").exists()
    assert not out.exists()
    _run(chain, out, shards=3, gather=True)
    one, three = (pd.read_parquet(d / "scores.parquet") for d in (tmp_path / "score-one", out))
    pd.testing.assert_frame_equal(three, one, check_exact=True)
    files = sorted(p.relative_to(out) for p in (out / "subsets").rglob("*.parquet"))
    assert len(files) == 2 * len(json.loads((out / "manifest.json").read_text())["params"]["methods"])
    for f in files:
        assert pq.read_table(out / f).equals(pq.read_table(tmp_path / "score-one" / f)), f
    assert json.loads((out / "manifest.json").read_text())["counts"]["n_shards"] == 3
    # a missing shard: an InputError naming it (the script's one-line error, exit 2)
    _run(chain, tmp_path / "score-x", shards=2, shard=0)
    with pytest.raises(InputError, match="score-x.shards/0001/shard.json"):
        _run(chain, tmp_path / "score-x", shards=2, gather=True)
    with pytest.raises(InputError, match="outside 0..1"):
        _run(chain, tmp_path / "score-x", shards=2, shard=2)
