"""features.weights_on / weights_samples: the weight column from the first N samples of the pool, or from
the SAE corpus, on hand-built codes; the rest of features.parquet stays the pool's."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_features import make_codes, make_store, write_encode

from mmsae import cli, features
from mmsae.features import feature_table, first_samples_end

# Two samples of 4 tokens each: image, image, text, text.
MODS = ["image", "image", "text", "text"]
TOKENS = pd.DataFrame({"sample_id": ["s0"] * 4 + ["s1"] * 4, "position": list(range(4)) * 2, "modality": MODS * 2})
STATES = np.array([[1, 0], [0, 1], [1, 0], [1, 1],      # s0: image [1,0], [0,1]; text [1,0], [1,1]
                   [1, 0], [1, 0], [0, 1], [0, 1]], np.float32)  # s1: image along x, text along y
# feature 0 fires on every token, more strongly in s1; feature 1 only on s1's tokens
ENTRIES = sorted([(r, 0, 1.0 + (r >= 4)) for r in range(8)] + [(r, 1, 1.0) for r in range(4, 8)])  # in row order, as encode writes
S0_WEIGHT = ((1 + 0) + (1 + 1) / math.sqrt(2)) / 4  # mean cosine of s0's 2 text x 2 image states
PARAMS = {"top_k": 2, "min_per_modality": 2}


def _run(tmp_path, params, *extra):
    store = make_store(tmp_path / "extract", TOKENS, STATES)
    encode = write_encode(tmp_path / "encode", make_codes(TOKENS, ENTRIES), 0, 2)
    out = tmp_path / "features"
    rc = cli.stage_main(features, ["--encode", str(encode), "--extract", str(store.folder), "--out", str(out),
                                   "--params", json.dumps({**PARAMS, **params}), *extra])
    assert rc == 0
    return pd.read_parquet(out / "features.parquet"), json.loads((out / "manifest.json").read_text())


def test_first_samples_end_streams_across_batches(tmp_path):
    make_store(tmp_path / "extract", TOKENS, STATES)
    for batch_rows in (1, 3, 1 << 20):
        assert first_samples_end(tmp_path / "extract", 1, batch_rows) == (4, 1)
        assert first_samples_end(tmp_path / "extract", 2, batch_rows) == (8, 2)
        assert first_samples_end(tmp_path / "extract", 5, batch_rows) == (8, 2)


def test_weights_from_the_first_samples_of_the_pool(tmp_path):
    whole, _ = _run(tmp_path / "a", {})
    subset, manifest = _run(tmp_path / "b", {"weights_samples": 1})
    # s1's activations are larger, so the whole pool's top tokens are s1's: text y x image x, cosine 0
    assert whole.loc[0, "weight"] == pytest.approx(0.0)
    assert subset.loc[0, "weight"] == pytest.approx(S0_WEIGHT)
    # feature 1 never fires in s0: cross-modal in the pool, no weight on the subset
    assert whole.loc[1, "class"] == subset.loc[1, "class"] == "cross-modal" and np.isnan(subset.loc[1, "weight"])
    # everything but the weight is the pool's
    cols = [c for c in whole.columns if c != "weight"]
    pd.testing.assert_frame_equal(whole[cols], subset[cols])
    assert manifest["counts"]["weights"] == {"on": "pool", "n_samples": 1, "n_weighted": 1}


def test_weights_on_the_corpus(tmp_path):
    # the corpus: one sample whose text and image states coincide (weight 1), encoded by the same SAE
    tokens = TOKENS.iloc[:4].assign(sample_id="c0")
    states = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], np.float32)
    corpus = make_store(tmp_path / "corpus_extract", tokens, states)
    c_encode = write_encode(tmp_path / "corpus_encode", make_codes(tokens, [(r, 0, 1.0) for r in range(4)]), 0, 2)
    df, manifest = _run(tmp_path, {"weights_on": "corpus"}, "--corpus-encode", str(c_encode),
                        "--corpus-extract", str(corpus.folder))
    assert df.loc[0, "weight"] == pytest.approx(1.0) and np.isnan(df.loc[1, "weight"])
    assert df.loc[0, "top_text_rows"].tolist() == [6, 7]  # the pool's store rows
    assert manifest["inputs"]["corpus_encode"].endswith("corpus_encode")
    assert feature_table(make_codes(tokens, [(r, 0, 1.0) for r in range(4)]), corpus, 0, 2, **PARAMS).loc[0, "weight"] \
        == pytest.approx(df.loc[0, "weight"])


def test_weights_on_corpus_without_its_codes_fails(tmp_path, capsys):
    store = make_store(tmp_path / "extract", TOKENS, STATES)
    encode = write_encode(tmp_path / "encode", make_codes(TOKENS, ENTRIES), 0, 2)
    rc = cli.stage_main(features, ["--encode", str(encode), "--extract", str(store.folder), "--out",
                                   str(tmp_path / "f"), "--params", json.dumps({"weights_on": "corpus"})])
    assert rc == 2 and "--corpus-encode" in capsys.readouterr().err
