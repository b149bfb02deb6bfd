"""Per-feature statistics: counts, top-K per modality, the cosine weight, classes, release vs per_modality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmsae import cli, features
from mmsae.activations import ActivationStore, ActivationWriter
from mmsae.artifacts import write_manifest
from mmsae.features import FEATURE_SCHEMA, feature_table, feature_weights, write_features
from mmsae.sae.encode import CODES_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def make_store(folder: Path, tokens: pd.DataFrame, states: np.ndarray, layer: int = 0,
               chunk_tokens: int = 4) -> ActivationStore:
    """An extract artifact with `states` [n, d] at `layer` for tokens (sample_id, position, modality, ...)."""
    tokens = tokens.copy()
    for col, default in (("token_id", 0), ("is_response", False), ("patch", -1)):
        if col not in tokens:
            tokens[col] = default
    tokens = tokens.astype({"position": "int32", "token_id": "int32", "patch": "int32", "is_response": bool})
    import torch

    writer = ActivationWriter(folder, [layer], states.shape[1], chunk_tokens=chunk_tokens, shard_chunks=2)
    writer.append({layer: torch.from_numpy(np.asarray(states, np.float32))}, tokens)
    writer.close()
    return ActivationStore(folder)


def make_codes(tokens: pd.DataFrame, entries: list[tuple[int, int, float]]) -> pd.DataFrame:
    """codes.parquet rows from (row, feature, activation) triples, the token columns copied from `tokens`."""
    rows = np.array([e[0] for e in entries], np.int64)
    tok = tokens.reset_index(drop=True)
    return pd.DataFrame({
        "row": rows,
        "sample_id": tok["sample_id"].to_numpy()[rows].astype(str),
        "position": tok["position"].to_numpy()[rows].astype(np.int32),
        "modality": tok["modality"].to_numpy()[rows].astype(str),
        "feature": np.array([e[1] for e in entries], np.int32),
        "activation": np.array([e[2] for e in entries], np.float32),
    })


def write_encode(folder: Path, codes: pd.DataFrame, layer: int, d_sae: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(codes, schema=CODES_SCHEMA, preserve_index=False),
                   folder / "codes.parquet", row_group_size=3)
    write_manifest(folder, "encode", {}, counts={"layer": layer, "d_sae": d_sae})
    return folder


# One sample: pos 0 special, pos 1-4 image, pos 5-8 text, pos 9 special.
MODS = ["special", "image", "image", "image", "image", "text", "text", "text", "text", "special"]
TOKENS = pd.DataFrame({"sample_id": "s0", "position": np.arange(10), "modality": MODS})
STATES = np.array([
    [1, 1], [1, 0], [2, 2], [0, 1], [-1, 0],   # special, image 1..4
    [3, 0], [0, 1], [0, 5], [5, 5], [1, 1],    # text 5..8, special
], np.float32)
ENTRIES = [
    # feature 0: 2 text (rows 5, 6) x 2 image (rows 1, 2) -> pinned cosine
    (5, 0, 2.0), (6, 0, 1.0), (1, 0, 3.0), (2, 0, 0.5),
    # feature 1: text dominates the top activations, weak on 2 image tokens
    (5, 1, 10.0), (7, 1, 9.0), (8, 1, 8.0), (3, 1, 1.0), (4, 1, 1.0),
    # feature 2: image only; feature 4: special only; feature 3 never fires
    (1, 2, 1.0), (2, 2, 2.0), (3, 2, 2.0),
    (0, 4, 7.0), (9, 4, 1.0),
]


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "extract", TOKENS, STATES)


def test_weight_is_mean_cosine_over_all_text_image_pairs(store):
    df = feature_table(make_codes(TOKENS, ENTRIES), store, 0, 5, top_k=2, min_per_modality=2)
    # text states [3,0], [0,1]; image states [1,0], [2,2]: cosines 1, 1/sqrt2, 0, 1/sqrt2
    expected = (1 + 2 / math.sqrt(2)) / 4
    assert df.loc[0, "weight"] == pytest.approx(expected, abs=1e-6)
    assert df.loc[0, "class"] == "cross-modal"
    assert df.loc[0, "top_text_rows"].tolist() == [5, 6]
    assert df.loc[0, "top_image_rows"].tolist() == [1, 2]
    np.testing.assert_allclose(df.loc[0, "top_image_acts"], [3.0, 0.5])


def test_counts_classes_and_special_tokens(store):
    df = feature_table(make_codes(TOKENS, ENTRIES), store, 0, 5, top_k=2, min_per_modality=2)
    assert df["feature"].tolist() == [0, 1, 2, 3, 4]
    assert df[["n_text", "n_image", "n_special"]].to_numpy().tolist() == [[2, 2, 0], [3, 2, 0], [0, 3, 0], [0, 0, 0], [0, 0, 2]]
    assert df["class"].tolist() == ["cross-modal", "cross-modal", "image-only", "dead", "text-only"]
    assert df.loc[[2, 3, 4], "weight"].isna().all()
    # special tokens are on neither side of the per-modality top-K
    assert df.loc[4, "top_text_rows"].tolist() == [] and df.loc[4, "top_image_rows"].tolist() == []
    # feature 2: ties (rows 2 and 3 both 2.0) resolved by the smaller row
    assert df.loc[2, "top_image_rows"].tolist() == [2, 3]


def test_release_rule_differs_when_one_modality_dominates(store):
    codes = make_codes(TOKENS, ENTRIES)
    per = feature_table(codes, store, 0, 5, top_k=2, rule="per_modality", min_per_modality=2)
    rel = feature_table(codes, store, 0, 5, top_k=3, rule="release", min_per_modality=2)
    # feature 1's top-3 over all tokens are all text: the release gives it no weight
    assert per.loc[1, "class"] == "cross-modal" and np.isfinite(per.loc[1, "weight"])
    assert rel.loc[1, "class"] == "text-only" and np.isnan(rel.loc[1, "weight"])
    assert rel.loc[1, "top_text_rows"].tolist() == [5, 7, 8] and rel.loc[1, "top_image_rows"].tolist() == []
    # release "text" includes special tokens: feature 4 keeps them in its text-side top-K
    assert rel.loc[4, "top_text_rows"].tolist() == [0, 9]
    # feature 0 is cross-modal under both (2 text + 2 image in its top-4), same 2x2 weight
    rel4 = feature_table(codes, store, 0, 5, top_k=4, rule="release", min_per_modality=2)
    assert rel4.loc[0, "weight"] == pytest.approx(per.loc[0, "weight"], abs=1e-9)


def test_release_weight_uses_first_m_by_m_tokens(store):
    # feature 1 with top_k=5 over all tokens: 3 text + 2 image; m=2 -> text rows 5, 7 x image rows 3, 4
    rel = feature_table(make_codes(TOKENS, ENTRIES), store, 0, 5, top_k=5, rule="release", min_per_modality=2)
    t = STATES[[5, 7]] / np.linalg.norm(STATES[[5, 7]], axis=1, keepdims=True)
    i = STATES[[3, 4]] / np.linalg.norm(STATES[[3, 4]], axis=1, keepdims=True)
    assert rel.loc[1, "class"] == "cross-modal"
    assert rel.loc[1, "weight"] == pytest.approx(float((t @ i.T).mean()), abs=1e-6)


def test_streaming_batches_give_the_same_table(store):
    codes = make_codes(TOKENS, ENTRIES).sample(frac=1.0, random_state=0)  # order must not matter
    a = feature_table(codes, store, 0, 5, top_k=2, min_per_modality=2, batch_rows=1)
    b = feature_table(codes, store, 0, 5, top_k=2, min_per_modality=2, batch_rows=1000)
    pd.testing.assert_frame_equal(a, b)


def test_feature_weights_and_schema(store, tmp_path):
    df = feature_table(make_codes(TOKENS, ENTRIES), store, 0, 5, top_k=2, min_per_modality=2)
    write_features(df, tmp_path / "f.parquet")
    assert pq.read_schema(tmp_path / "f.parquet").equals(FEATURE_SCHEMA, check_metadata=False)
    w = feature_weights(df)
    assert w.shape == (5,) and w[2] == 0 and w[0] == pytest.approx(df.loc[0, "weight"])


def test_features_script(store, tmp_path):
    encode = write_encode(tmp_path / "encode", make_codes(TOKENS, ENTRIES), 0, 5)
    out = tmp_path / "features"
    rc = cli.stage_main(features, ["--encode", str(encode), "--extract", str(store.folder), "--out", str(out),
                      "--params", json.dumps({"top_k": 2, "min_per_modality": 2})])
    assert rc == 0
    df = pd.read_parquet(out / "features.parquet")
    assert df["class"].tolist() == ["cross-modal", "cross-modal", "image-only", "dead", "text-only"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["layer"] == 0 and manifest["counts"]["classes"]["cross-modal"] == 2


def test_features_script_missing_column(store, tmp_path, capsys):
    encode = write_encode(tmp_path / "encode", make_codes(TOKENS, ENTRIES), 0, 5)
    pq.write_table(pq.read_table(encode / "codes.parquet").drop_columns(["activation"]), encode / "codes.parquet")
    rc = cli.stage_main(features, ["--encode", str(encode), "--extract", str(store.folder), "--out",
                                       str(tmp_path / "f")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'activation'" in err and "missing column" in err
