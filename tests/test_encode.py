"""encode: sparse codes of every token of a store, and the encode stage's command line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_sae import D, random_sae, synthetic_store

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.codes import CodesReader
from mmsae.sae import encode
from mmsae.sae.encode import CODES_SCHEMA, encode_store
from mmsae.sae.io import load_sae, save_sae


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_encode_store_keeps_only_above_delta(tmp_path, normalize):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=12, layers=(0, 1)))
    sae = random_sae(d_in=D, d_sae=24, seed=1, normalize_activations=normalize)
    delta = 0.3
    counts = encode_store(sae, store, 1, delta, batch_tokens=50, out_path=tmp_path / "codes.parquet", progress=False)
    reader = CodesReader(tmp_path / "codes.parquet")
    assert all(pq.read_schema(f) == CODES_SCHEMA for f in reader.files)
    codes = pq.read_table(tmp_path / "codes.parquet").to_pandas()
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(store.read(1))).numpy()
    t, i = np.nonzero(f > delta)
    assert counts == {"n_tokens": store.n_tokens, "nnz": len(t), "n_parts": 1, "codes_dropped": 0,
                      "tokens_capped": 0} and len(codes) == len(t)
    assert np.array_equal(codes["row"].to_numpy(), t) and np.array_equal(codes["feature"].to_numpy(), i)
    np.testing.assert_allclose(codes["activation"].to_numpy(), f[t, i], rtol=1e-6)
    assert (codes["activation"] > delta).all()
    tok = store.tokens.set_index("row").loc[codes["row"]]
    assert (codes["sample_id"].to_numpy() == tok["sample_id"].to_numpy()).all()
    assert (codes["position"].to_numpy() == tok["position"].to_numpy()).all()
    assert (codes["modality"].to_numpy() == tok["modality"].to_numpy()).all()
    assert set(codes["modality"]) == {"image", "text", "special"}  # every modality is encoded


def test_encode_script_and_d_in_mismatch(tmp_path, capsys):
    store = synthetic_store(tmp_path / "x", n_samples=6, layers=(0, 3))
    sae = random_sae(d_in=D, d_sae=20, seed=2, metadata={"hook_name": "blocks.3.hook_resid_post", "hook_layer": 3})
    save_sae(sae, tmp_path / "train_sae-a" / "sae")
    out = tmp_path / "encode-a"
    rc = cli.stage_main(encode, ["--extract", str(store), "--sae", str(tmp_path / "train_sae-a"), "--out", str(out),
                                 "--params", json.dumps({"delta": 0.1, "batch_tokens": 32, "device": "cpu"})])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "encode"
    codes = pq.read_table(out / "codes.parquet").to_pandas()
    assert {k: man["counts"][k] for k in ("n_tokens", "nnz", "layer", "d_sae")} == {
        "n_tokens": 6 * 15, "nnz": len(codes), "layer": 3, "d_sae": 20}
    with torch.no_grad():
        f = load_sae(tmp_path / "train_sae-a").encode(torch.from_numpy(ActivationStore(store).read(3)))
    assert len(codes) == int((f > 0.1).sum())

    save_sae(random_sae(d_in=D + 1, d_sae=20, metadata={"hook_layer": 3}), tmp_path / "train_sae-b" / "sae")
    capsys.readouterr()
    rc = cli.stage_main(encode, ["--extract", str(store), "--sae", str(tmp_path / "train_sae-b"), "--out",
                                 str(tmp_path / "encode-b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "encode-b").exists()
    assert len(err) == 1 and "cfg.json" in err[0] and "'d_in'" in err[0] and f"d_model={D}" in err[0]


def test_encode_store_topk_through_the_registry(tmp_path):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=8, layers=(0,)))
    sae = random_sae(d_in=D, d_sae=24, seed=3, architecture="topk", k=3, apply_b_dec_to_input=True)
    sae.input_scale = 0.8
    save_sae(sae, tmp_path / "train_sae-t" / "sae")
    loaded = load_sae(tmp_path / "train_sae-t")  # as the encode stage loads it
    counts = encode_store(loaded, store, 0, 0.0, batch_tokens=40, out_path=tmp_path / "codes.parquet", progress=False)
    codes = pq.read_table(tmp_path / "codes.parquet").to_pandas()
    assert counts["nnz"] == len(codes) and codes.groupby("row").size().max() <= 3  # at most k per token
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(store.read(0))).numpy()  # the unsaved SAE, scale not folded
    t, i = np.nonzero(f > 0)
    assert np.array_equal(codes["row"].to_numpy(), t) and np.array_equal(codes["feature"].to_numpy(), i)
    np.testing.assert_allclose(codes["activation"].to_numpy(), f[t, i], rtol=1e-5)
