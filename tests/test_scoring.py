"""Data scoring: every method on hand-built sparse codes, ranks and ties, subsets, the score stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import consistency
from test_features import make_codes, make_store, write_encode

from mmsae.artifacts import write_json, write_manifest
from mmsae.errors import InputError
from mmsae.features import feature_table, write_features
from mmsae.params import ScoreParams
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import METHODS, rank, score_samples
from mmsae.scoring.stage import Inputs, run
from mmsae.scoring.subsets import SUBSET_COLUMNS, read_samples, read_subset, subset_size, write_subsets

# Four samples, each: pos 0 special, pos 1-2 image, pos 3-4 text. s3 has no codes at all.
IDS = ["s0", "s1", "s2", "s3"]
TOKENS = pd.DataFrame({
    "sample_id": np.repeat(IDS, 5),
    "position": np.tile(np.arange(5), 4),
    "modality": np.tile(["special", "image", "image", "text", "text"], 4),
})
R = {(s, p): 5 * i + p for i, s in enumerate(IDS) for p in range(5)}  # (sample, position) -> store row
ENTRIES = [
    # s0: f0 on image + text (co-occurs), f1 image only, f2 image + text (co-occurs, no weight),
    #     f1 on the BOS (position 0: not counted in l0 / l1, not text)
    (R["s0", 1], 0, 2.0), (R["s0", 3], 0, 1.0), (R["s0", 2], 1, 0.5), (R["s0", 2], 2, 3.0), (R["s0", 4], 2, 0.5),
    (R["s0", 0], 1, 9.0),
    # s1: f0 and f1 both on text and image (both co-occur)
    (R["s1", 1], 0, 1.0), (R["s1", 4], 0, 1.0), (R["s1", 2], 1, 4.0), (R["s1", 3], 1, 2.0),
    # s2: f0 text only (no co-occurrence)
    (R["s2", 3], 0, 0.7),
]
WEIGHTS = np.array([0.5, 0.25, 0.0])
# hidden states: s0 image [1,0],[1,0], text [0,1],[1,1]; BOS states huge (must be ignored)
STATES = np.tile(np.array([[100, -100], [1, 0], [1, 0], [0, 1], [1, 1]], np.float32), (4, 1))
STATES[R["s1", 3]] = [-1, 0]
STATES[R["s1", 4]] = [-1, 0]
LOSSES = pd.DataFrame({"sample_id": IDS, "loss": [0.5, 2.0, 1.0, 0.1], "n_tokens": [1, 1, 1, 1]})


def ctx(tmp_path, **kw) -> ScoringContext:
    store = make_store(tmp_path / "extract", TOKENS, STATES)
    args = dict(codes=make_codes(TOKENS, ENTRIES), weights=WEIGHTS, store=store, layer=0, losses=LOSSES)
    args.update(kw)
    return ScoringContext(IDS, **args)


def test_every_configured_method_is_registered():
    from mmsae.config import load_schema

    names = load_schema()["properties"]["score"]["properties"]["methods"]["items"]["enum"]
    assert sorted(names) == sorted(METHODS)


def test_cosine_and_cooc_l0(tmp_path):
    c = ctx(tmp_path)
    np.testing.assert_allclose(METHODS["cosine"](c), [0.5 + 0.0, 0.5 + 0.25, 0.0, 0.0])
    np.testing.assert_allclose(METHODS["cooc_l0"](c), [2, 2, 0, 0])


def test_delta_threshold(tmp_path):
    c = ctx(tmp_path, delta=1.0)  # activation must exceed 1: s0 keeps f0 image only, f2 image only
    np.testing.assert_allclose(METHODS["cosine"](c), [0.0, 0.25, 0.0, 0.0])
    np.testing.assert_allclose(METHODS["cooc_l0"](c), [0, 1, 0, 0])


def test_l0_l1_exclude_position_zero(tmp_path):
    c = ctx(tmp_path)
    # 4 tokens at position > 0 per sample; s0 has 5 active (token, feature) pairs after position 0
    np.testing.assert_allclose(METHODS["l0"](c), [5 / 4, 4 / 4, 1 / 4, 0.0])
    np.testing.assert_allclose(METHODS["l1"](c), [7.0 / 4, 8.0 / 4, 0.7 / 4, 0.0])


def test_release_text_includes_special(tmp_path):
    c = ctx(tmp_path, text_modalities=("text", "special"))
    # s0: f1 fires on the BOS (special) and an image token -> now co-occurs
    np.testing.assert_allclose(METHODS["cooc_l0"](c), [3, 2, 0, 0])


def test_nosae_cosine(tmp_path):
    got = METHODS["nosae_cosine"](ctx(tmp_path))
    # s0: mean image [1,0], mean text [.5,1]; s1: mean text [-1,0] vs mean image [1,0]
    np.testing.assert_allclose(got, [0.5 / math.sqrt(1.25), -1.0, 0.5 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)],
                               atol=1e-6)


def test_model_loss_and_missing_losses(tmp_path):
    np.testing.assert_allclose(METHODS["model_loss"](ctx(tmp_path)), [-0.5, -2.0, -1.0, -0.1])
    with pytest.raises(InputError, match="no loss"):
        METHODS["model_loss"](ctx(tmp_path, losses=LOSSES.iloc[:2]))
    with pytest.raises(InputError, match="losses"):
        METHODS["model_loss"](ctx(tmp_path, losses=None))


def test_random_is_seeded_and_order_independent(tmp_path):
    a = ScoringContext(IDS, seed=3)
    b = ScoringContext(IDS[::-1], seed=3)
    assert np.array_equal(METHODS["random"](a), METHODS["random"](b))
    assert not np.array_equal(METHODS["random"](a), METHODS["random"](ScoringContext(IDS, seed=4)))


def test_score_samples_ranks_and_ties(tmp_path):
    store = make_store(tmp_path / "x", TOKENS, STATES)
    features = feature_table(make_codes(TOKENS, ENTRIES), store, 0, 3, top_k=4, min_per_modality=1)
    df = score_samples(ctx(tmp_path, features=features), list(METHODS))
    assert df["sample_id"].tolist() == IDS
    assert df.notna().all().all()
    # cosine: s1 (.75) > s0 (.5) > s2 = s3 (0): the tie goes to the smaller sample id
    assert df["rank_cosine"].tolist() == [2, 1, 3, 4]
    assert df["rank_model_loss"].tolist() == [2, 4, 3, 1]
    assert rank(np.array([1.0, 1.0, 1.0])).tolist() == [1, 2, 3]
    with pytest.raises(InputError, match="unknown method"):
        score_samples(ctx(tmp_path), ["nope"])


def test_subset_size_and_files(tmp_path):
    assert subset_size(0.3, 10) == 3 and subset_size(0.1, 7) == 1 and subset_size(1.0, 7) == 7
    samples = sample_table()
    pq.write_table(samples, tmp_path / "samples.parquet")
    table = pq.read_table(tmp_path / "samples.parquet")
    scores = score_samples(ctx(tmp_path), ["cosine"])
    written = write_subsets(table, scores, ["cosine"], [0.25, 0.5, 1.0], tmp_path / "subsets")
    assert written == {"cosine": {"top025.parquet": 1, "top050.parquet": 2, "top100.parquet": 4}}
    top50 = pq.read_table(tmp_path / "subsets" / "cosine" / "top050.parquet")
    # an id list, best first: no copy of the records (their images stay in samples.parquet)
    assert top50.column_names == list(SUBSET_COLUMNS)
    assert top50.column("sample_id").to_pylist() == ["s1", "s0"]
    by_rank = scores.sort_values("rank_cosine")
    assert top50.column("rank").to_pylist() == by_rank["rank_cosine"].tolist()[:2] == [1, 2]
    assert read_subset(tmp_path / "subsets" / "cosine" / "top100.parquet") == by_rank["sample_id"].tolist()
    pq.write_table(pa.table({"sample_id": ["s1", "s1"], "rank": [1, 2]}), tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="duplicate id 's1'"):
        read_subset(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"sample_id": ["s1", "s0"], "rank": [2, 1]}), tmp_path / "order.parquet")
    with pytest.raises(InputError, match="rank order"):
        read_subset(tmp_path / "order.parquet")


def test_score_reads_samples_without_their_images(tmp_path):
    pq.write_table(sample_table(), tmp_path / "samples.parquet")
    table = read_samples(tmp_path)
    assert "image" not in table.column_names
    assert table.column("sample_id").to_pylist() == IDS and "corruption" in table.column_names
    bad = sample_table().to_pandas()
    bad.loc[1, "question"] = "  "
    bad.to_parquet(tmp_path / "samples.parquet", index=False)
    with pytest.raises(InputError, match="question"):  # still validated
        read_samples(tmp_path)


def sample_table():
    import pyarrow as pa

    df = pd.DataFrame({
        "sample_id": IDS,
        "question": ["what color is the square ?", "<script>alert(1)</script> describe ?", "q2", "q3"],
        "image": [b"\x89PNG"] * 4,
        "responses": [["red", "blue"], ["blue square red circle", "x"], ["a", "b"], ["c", "d"]],
        "preferred": [0, 0, 1, 0],
        "corruption": pd.array([None, "mismatch", "noise_image", None], dtype="string"),
    })
    return pa.Table.from_pandas(df, preserve_index=False)


def build_artifacts(tmp_path: Path) -> dict[str, Path]:
    """Folders of every stage the score stage / report script read, from the hand-built case above."""
    store = make_store(tmp_path / "extract", TOKENS, STATES)
    codes = make_codes(TOKENS, ENTRIES)
    encode = write_encode(tmp_path / "encode", codes, 0, 3)
    features = tmp_path / "features"
    features.mkdir()
    write_features(feature_table(codes, store, 0, 3, top_k=4, min_per_modality=1), features / "features.parquet")
    write_manifest(features, "features", {"rule": "per_modality", "top_k": 4, "min_per_modality": 1})
    samples = tmp_path / "samples"
    samples.mkdir()
    pq.write_table(sample_table(), samples / "samples.parquet")
    write_manifest(samples, "sample", {})
    loss = tmp_path / "model_loss"
    loss.mkdir()
    LOSSES.to_parquet(loss / "loss.parquet", index=False)
    write_manifest(loss, "model_loss", {})
    train = tmp_path / "train_sae"
    train.mkdir()
    write_json(train / "metrics.json", {"overall": {"l0": 3.0, "centred_fvu": 0.1}, "image": {"l0": 4.0},
                                        "text": {"l0": 2.0, "centred_fvu": 0.2}, "steps": 10})
    write_manifest(train, "train_sae", {})
    return {"extract": store.folder, "encode": encode, "features": features, "samples": samples,
            "model_loss": loss, "train_sae": train}


def run_score(a: dict[str, Path], out: Path, params: dict, with_loss: bool = True, **kw) -> None:
    inputs = Inputs(samples=a["samples"], extract=a["extract"], encode=a["encode"], features=a["features"],
                    model_loss=a["model_loss"] if with_loss else None, **kw)
    run(inputs, ScoreParams.load(params), out)


def test_score_stage(tmp_path):
    a = build_artifacts(tmp_path)
    out = tmp_path / "score"
    run_score(a, out, {"fractions": [0.5, 1.0], "methods": list(METHODS)})
    scores = pd.read_parquet(out / "scores.parquet")
    assert {f"score_{m}" for m in METHODS} | {f"rank_{m}" for m in METHODS} | {"sample_id"} == set(scores.columns)
    for m in METHODS:
        sub = pq.read_table(out / "subsets" / m / "top050.parquet")
        assert sub.num_rows == 2 and sub.column_names == list(SUBSET_COLUMNS)
        best = scores.sort_values(f"rank_{m}")["sample_id"].tolist()[:2]
        assert sub.column("sample_id").to_pylist() == best
    assert json.loads((out / "manifest.json").read_text())["counts"]["subsets"]["l0"]["top100.parquet"] == 4
    # model_loss without --model-loss: an InputError naming it (the script's one-line error, exit 2)
    with pytest.raises(InputError, match="--model-loss"):
        run_score(a, tmp_path / "s2", {}, with_loss=False)
    assert not (tmp_path / "s2").exists()


# ---- cross-modal consistency -----------------------------------------------------------------------
# Four samples, each: pos 0 special, pos 1-2 image, pos 3-4 text "the <word>"; token ids: red 10,
# blue 11, the 12. c0 says red and shows red; c1 says blue and shows red (a mismatch); c2 says red and
# shows red and blue; c3 says blue and its image fires no feature.
CIDS = ["c0", "c1", "c2", "c3"]
RED, BLUE, THE = 10, 11, 12
CTOKENS = pd.DataFrame({
    "sample_id": np.repeat(CIDS, 5),
    "position": np.tile(np.arange(5), 4),
    "modality": np.tile(["special", "image", "image", "text", "text"], 4),
    "token_id": np.array([[1, 4, 4, THE, w] for w in (RED, BLUE, RED, BLUE)]).ravel(),
})
CR = {(s, p): 5 * i + p for i, s in enumerate(CIDS) for p in range(5)}
CENTRIES = [
    # f0 "red" concept and f1 "blue" concept: the only features that pass every XMc criterion
    (CR["c0", 4], 0, 2.0), (CR["c0", 1], 0, 1.0), (CR["c0", 2], 0, 0.5),
    (CR["c1", 4], 1, 2.0), (CR["c1", 1], 0, 1.0),
    (CR["c2", 4], 0, 1.0), (CR["c2", 1], 0, 0.5), (CR["c2", 2], 1, 1.0),
    (CR["c3", 4], 1, 1.0),
    # f2 fires on "the" (in every sample's text: a template word)
    *[(CR[s, 3], 2, 1.0) for s in CIDS],
    # f3 "red" with a tiny image side; f4 as much on "the" as on "red" (selectivity 1/2)
    (CR["c0", 4], 3, 2.0), (CR["c0", 1], 3, 0.2),
    (CR["c0", 3], 4, 1.0), (CR["c0", 4], 4, 1.0),
]


def concept_frame() -> pd.DataFrame:
    """features.parquet, hand-written: top-K rows / acts, counts and weights per feature."""
    rows = [
        # feature, top text rows, top text acts, top image acts, weight
        (0, [CR["c0", 4], CR["c2", 4]], [2.0, 1.0], [1.0, 1.0, 0.5, 0.5], 0.5),  # norms 1.5 / 0.75
        (1, [CR["c1", 4], CR["c3", 4]], [2.0, 1.0], [1.0], 0.4),  # norms 1.5 / 1.0
        (2, [CR[s, 3] for s in CIDS], [1.0] * 4, [1.0], 0.3),  # top token "the": doc freq 1
        (3, [CR["c0", 4]], [2.0], [0.2], 0.6),  # balance 0.2 / 2 = 0.1
        (4, [CR["c0", 3], CR["c0", 4]], [1.0, 1.0], [1.0], 0.2),  # tie: the smaller id (red) is top
        (5, [CR["c0", 4]], [1.0], [1.0], -0.1),  # weight <= 0
    ]
    return pd.DataFrame({
        "feature": [r[0] for r in rows], "n_text": [2, 2, 4, 1, 2, 1], "n_image": [4, 1, 1, 1, 1, 1],
        "top_text_rows": [r[1] for r in rows], "top_text_acts": [r[2] for r in rows],
        "top_image_rows": [[0] * len(r[3]) for r in rows], "top_image_acts": [r[3] for r in rows],
        "weight": [r[4] for r in rows], "class": "cross-modal",
    })


def cctx(tmp_path, **kw) -> ScoringContext:
    states = np.tile(np.array([[1.0, 0.0]], np.float32), (len(CTOKENS), 1))
    states[[CR["c3", 1], CR["c3", 2]]] = [0.0, 1.0]  # c3's image: far from the pool's
    store = make_store(tmp_path / "cextract", CTOKENS, states)
    args = dict(codes=make_codes(CTOKENS, CENTRIES), store=store, layer=0, features=concept_frame(),
                consistency={"min_per_modality": 1})
    args.update(kw)
    args["consistency"] = consistency(args["consistency"])
    return ScoringContext(CIDS, **args)


def test_concept_feature_selection(tmp_path):
    cf = cctx(tmp_path).concept_features
    assert cf["selected"].tolist() == [True, True, False, False, False, False]
    assert cf["top_token"].tolist() == [RED, BLUE, THE, RED, RED, RED]
    np.testing.assert_allclose(cf["norm_text"], [1.5, 1.5, 1.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(cf["norm_image"], [0.75, 1.0, 1.0, 0.2, 1.0, 1.0])
    np.testing.assert_allclose(cf["balance"], [0.5, 2 / 3, 1.0, 0.1, 1.0, 1.0])
    np.testing.assert_allclose(cf["doc_freq"], [0.5, 0.5, 1.0, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(cf["selectivity"], [1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    # the default min_per_modality (5) leaves no feature: every consistency score is 0, not NaN
    c = cctx(tmp_path, consistency={})
    assert not c.concept_features["selected"].any()
    assert np.array_equal(METHODS["consistency"](c), np.zeros(4))
    with pytest.raises(InputError, match="features"):
        METHODS["consistency"](cctx(tmp_path, features=None))


def test_consistency_scores_pm(tmp_path):
    c = cctx(tmp_path)
    # A (text) / B (image), each side / its norm, capped at 1:
    # c0 A{f0: 1} B{f0: 1}; c1 A{f1: 1} B{f0: 1}; c2 A{f0: 2/3} B{f0: 2/3, f1: 1}; c3 A{f1: 2/3} B{}
    np.testing.assert_allclose(METHODS["consistency"](c), [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(METHODS["consistency_image"](c), [1.0, 0.0, 0.4, 0.0])
    np.testing.assert_allclose(METHODS["consistency_cos"](c), [1.0, 0.0, 2 / math.sqrt(13), 0.0])
    # direction: the sample whose image shows what its text says ranks above the mismatched one
    df = score_samples(c, ["consistency", "consistency_image", "consistency_cos"])
    for m in ("consistency", "consistency_image", "consistency_cos"):
        assert df[f"rank_{m}"].tolist()[0] < df[f"rank_{m}"].tolist()[1]


def test_consistency_scores_raw(tmp_path):
    c = cctx(tmp_path, consistency={"min_per_modality": 1, "per_modality_norm": False})
    # c0 A{f0: 2} B{f0: 1}; c1 A{f1: 2} B{f0: 1}; c2 A{f0: 1} B{f0: .5, f1: 1}; c3 A{f1: 1} B{}
    np.testing.assert_allclose(METHODS["consistency"](c), [0.5, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(METHODS["consistency_image"](c), [1.0, 0.0, 1 / 3, 0.0])
    np.testing.assert_allclose(METHODS["consistency_cos"](c), [1.0, 0.0, 0.5 / math.sqrt(1.25), 0.0])


def test_consistency_delta(tmp_path):
    # delta 0.6 drops c0's 0.5 image code and c2's 0.5 (c2: B{f1: 1} only, no overlap with A{f0})
    c = cctx(tmp_path, delta=0.6)
    np.testing.assert_allclose(METHODS["consistency"](c), [1.0, 0.0, 0.0, 0.0])


def test_offdist_and_gate(tmp_path):
    c = cctx(tmp_path)
    # image L0 per image token: c0 3/2, c1 1/2, c2 2/2, c3 0 -> median .75, MAD .5, z = (x - .75) / .7413
    # distance of the mean unit image state from the median [1, 0]: 0, 0, 0, sqrt 2 -> MAD 0, so the
    # scale is 1.2533 x mean absolute deviation (sqrt 2 / 4): c3's z = 4 / 1.2533
    z_l0 = np.abs(np.array([1.5, 0.5, 1.0, 0.0]) - 0.75) / (1.4826 * 0.5)
    z = np.maximum(z_l0, [0, 0, 0, 4 / 1.2533])
    np.testing.assert_allclose(METHODS["offdist"](c), -z, rtol=1e-6)
    assert z[3] > 3 > z[:3].max()
    # gated: consistency minus 2 where |z| > gate_z (c3 is pushed below everything)
    np.testing.assert_allclose(METHODS["consistency_gated"](c), [1.0, 0.0, 1.0, -2.0])
    c = cctx(tmp_path, consistency={"min_per_modality": 1, "gate_z": 4.0})
    np.testing.assert_allclose(METHODS["consistency_gated"](c), [1.0, 0.0, 1.0, 0.0])


def test_offdist_reconstruction_error_and_no_image(tmp_path):
    import torch

    from mmsae.sae.model import SAEConfig, build_sae

    sae = build_sae(SAEConfig(d_in=2, d_sae=2), seed=None)
    with torch.no_grad():  # reconstructs the first coordinate only: error 0 on [1, 0], 1 on [0, 1]
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    c = cctx(tmp_path, sae=sae)
    st = c.image_stats
    np.testing.assert_allclose(st["count"], [2, 2, 2, 2])
    np.testing.assert_allclose(st["error"] / st["count"], [0, 0, 0, 1], atol=1e-7)
    # error z of c3: MAD 0 -> 1 / (1.2533 / 4); the largest of the three statistics
    assert METHODS["offdist"](c)[3] == pytest.approx(-4 / 1.2533, rel=1e-6)
    # a sample without image tokens is never off-distribution: score 0
    tok = pd.concat([CTOKENS, pd.DataFrame({"sample_id": ["c4"], "position": [0], "modality": ["text"],
                                            "token_id": [RED]})], ignore_index=True)
    store = make_store(tmp_path / "c4", tok, np.ones((len(tok), 2), np.float32))
    c = ScoringContext(CIDS + ["c4"], codes=make_codes(tok, CENTRIES), store=store, layer=0)
    assert METHODS["offdist"](c)[4] == 0.0


def test_score_stage_consistency_with_sae(tmp_path):
    from mmsae.sae.io import save_sae
    from mmsae.sae.model import SAEConfig, build_sae

    a = build_artifacts(tmp_path)
    save_sae(build_sae(SAEConfig(d_in=2, d_sae=3, metadata={"hook_layer": 0}), seed=0), tmp_path / "sae")
    params = {"methods": ["consistency", "offdist", "consistency_gated"],
              "consistency": {"min_per_modality": 1, "max_doc_freq": 1.0}}
    run_score(a, tmp_path / "out", params, with_loss=False, sae=str(tmp_path / "sae"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["sae"] == str(tmp_path / "sae")
    assert manifest["counts"]["n_concept_features"] >= 0
    assert pd.read_parquet(tmp_path / "out" / "scores.parquet")["score_offdist"].le(0).all()
    # an SAE for another layer is refused
    save_sae(build_sae(SAEConfig(d_in=2, d_sae=3, metadata={"hook_layer": 2}), seed=0), tmp_path / "sae2")
    with pytest.raises(InputError, match="hook_layer"):
        run_score(a, tmp_path / "out2", params, with_loss=False, sae=str(tmp_path / "sae2"))


# ---- binding-aware consistency ---------------------------------------------------------------------
# Eight samples, each: pos 0 special, pos 1-2 image (two patches), pos 3-6 text. Concept features, one
# per word: f0 red, f1 blue, f2 square, f3 circle (all activations 1 unless stated, norms 1).
BIDS = [f"b{i}" for i in range(8)]
RED_, BLUE_, SQUARE, CIRCLE, THE_ = 10, 11, 12, 13, 14
WORD = {RED_: 0, BLUE_: 1, SQUARE: 2, CIRCLE: 3}  # token id -> its feature
BTEXT = {  # text tokens at positions 3-6
    "b0": [THE_, THE_, RED_, SQUARE], "b1": [THE_, THE_, RED_, SQUARE], "b2": [RED_, SQUARE, BLUE_, CIRCLE],
    "b3": [RED_, CIRCLE, BLUE_, SQUARE], "b4": [THE_, RED_, THE_, SQUARE], "b5": [THE_, THE_, RED_, SQUARE],
    "b6": [THE_, THE_, RED_, SQUARE], "b7": [THE_, THE_, RED_, SQUARE],
}
BIMAGE = {  # (patch 1, patch 2): {feature: activation}
    "b0": ({0: 1, 2: 1}, {1: 1, 3: 1}),  # red square + blue circle: text "red square" is bound
    "b1": ({0: 1, 3: 1}, {1: 1, 2: 1}),  # red circle + blue square: "red square" names both, bound wrongly
    "b2": ({0: 1, 2: 1}, {1: 1, 3: 1}),  # caption "red square blue circle" of this image
    "b3": ({0: 1, 2: 1}, {1: 1, 3: 1}),  # caption "red circle blue square": colours and shapes swapped
    "b4": ({0: 1, 3: 1}, {1: 1, 2: 1}),  # as b1, with "red" and "square" two positions apart
    "b5": ({0: 1, 2: 1}, {}),  # as b0, plus f1 (blue) firing on "the" (not its word) in the text
    "b6": ({0: 1, 2: 0.5}, {2: 1}),  # the square half on the red patch: half bound
    "b7": ({}, {}),  # no codes at all
}
BTOKENS = pd.DataFrame({
    "sample_id": np.repeat(BIDS, 7),
    "position": np.tile(np.arange(7), len(BIDS)),
    "modality": np.tile(["special", "image", "image", "text", "text", "text", "text"], len(BIDS)),
    "token_id": np.array([[1, 4, 4, *BTEXT[s]] for s in BIDS]).ravel(),
})
BR = {(s, p): 7 * i + p for i, s in enumerate(BIDS) for p in range(7)}


def binding_entries() -> list[tuple[int, int, float]]:
    out = []
    for s in BIDS[:-1]:
        for p, acts in zip((1, 2), BIMAGE[s], strict=True):
            out += [(BR[s, p], f, float(a)) for f, a in acts.items()]
        out += [(BR[s, 3 + k], WORD[t], 1.0) for k, t in enumerate(BTEXT[s]) if t in WORD]
    out.append((BR["b5", 4], 1, 1.0))
    return out


def binding_frame() -> pd.DataFrame:
    """features.parquet: top text rows on each feature's own word, every top activation 1 (norms 1)."""
    own = {f: [BR[s, 3 + k] for s in BIDS for k, t in enumerate(BTEXT[s]) if WORD.get(t) == f] for f in range(4)}
    return pd.DataFrame({
        "feature": range(4), "n_text": [len(own[f]) for f in range(4)], "n_image": [5] * 4,
        "top_text_rows": [own[f] for f in range(4)], "top_text_acts": [[1.0] * len(own[f]) for f in range(4)],
        "top_image_rows": [[0]] * 4, "top_image_acts": [[1.0]] * 4, "weight": [0.5] * 4, "class": "cross-modal",
    })


def bctx(tmp_path, **cfg) -> ScoringContext:
    states = np.tile(np.array([[1.0, 0.0]], np.float32), (len(BTOKENS), 1))
    states[[BR["b5", 1], BR["b5", 2]]] = [0.0, 1.0]  # b5's image: far from the pool's
    store = make_store(tmp_path / "bextract", BTOKENS, states)
    return ScoringContext(BIDS, codes=make_codes(BTOKENS, binding_entries()), store=store, layer=0,
                          features=binding_frame(), consistency=consistency({"min_per_modality": 1, "max_doc_freq": 1.0, **cfg}))


def test_binding_selection_is_the_four_words(tmp_path):
    cf = bctx(tmp_path).concept_features
    assert cf["selected"].tolist() == [True] * 4
    assert cf["top_token"].tolist() == [RED_, BLUE_, SQUARE, CIRCLE]
    np.testing.assert_allclose(cf["selectivity"], [1.0, 2 / 3, 1.0, 1.0])  # blue: 1 of its 3 on "the"


def test_consistency_binding_scores(tmp_path):
    c = bctx(tmp_path)
    bd = c.binding
    # b3: tokens red / circle / blue / square; pairs (red, circle) and (blue, square) unbound (deficit 1),
    # (circle, blue) bound apart (0): each token's deficit is its best neighbour's -> [1, 0, 0, 1], mean 0.5.
    # b6: red on patch 1 only, square half there and whole on patch 2: together 0.5 of 1 -> deficit 0.5.
    np.testing.assert_allclose(bd["deficit"], [0, 1, 0, 0.5, 1, 0, 0.5, 0])
    np.testing.assert_array_equal(bd["n_pairs"], [1, 1, 3, 3, 1, 1, 1, 0])
    np.testing.assert_allclose(bd["coverage"], [1, 1, 1, 1, 1, 1, 1, 0])  # own word: b5's "the" not counted
    np.testing.assert_allclose(METHODS["consistency_binding"](c), [1, 0, 1, 0.5, 0, 1, 0.5, 0])
    # the bag-of-concepts score cannot tell b0 from b1 (or b2 from b3); binding can
    cons = METHODS["consistency"](c)
    np.testing.assert_allclose(cons, [1, 1, 1, 1, 1, 2 / 3, 1, 0])
    df = score_samples(c, ["consistency_binding"])
    r = dict(zip(df["sample_id"], df["rank_consistency_binding"], strict=True))
    assert r["b0"] < r["b1"] and r["b2"] < r["b3"]


def test_consistency_binding_options(tmp_path):
    # max over tokens: b3's worst token decides
    np.testing.assert_allclose(bctx(tmp_path / "a", bind_aggregate="max").binding["deficit"],
                               [0, 1, 0, 1, 1, 0, 0.5, 0])
    # neighbours at most 1 position apart: b4's "red the square" is no pair, nothing to check
    bd = bctx(tmp_path / "b", bind_max_gap=1).binding
    assert bd["n_pairs"][4] == 0 and bd["deficit"][4] == 0
    # text side on every token: b5's "the" adds blue (absent from the image) -> coverage 2/3, = consistency
    c = bctx(tmp_path / "c", bind_own_word=False)
    np.testing.assert_allclose(c.binding["coverage"], METHODS["consistency"](c))
    assert c.binding["coverage"][5] == pytest.approx(2 / 3)
    # a token needs a concept activation >= bind_min_text: at 1.5 none does, so no pair anywhere
    assert bctx(tmp_path / "d", bind_min_text=1.5).binding["n_pairs"].sum() == 0


def test_consistency_binding_gated(tmp_path):
    c = bctx(tmp_path)
    flagged = c.offdist_z > 3.0
    # b5's image states lie far from the pool's; b7's image fires no feature (image L0 0 vs median 2)
    assert flagged.tolist() == [False] * 5 + [True, False, True]
    np.testing.assert_allclose(METHODS["consistency_binding_gated"](c), [1, 0, 1, 0.5, 0, -1, 0.5, -2])


def test_score_stage_binding(tmp_path):
    a = build_artifacts(tmp_path)
    out = tmp_path / "score"
    params = {"fractions": [1.0], "methods": ["consistency", "consistency_binding", "consistency_binding_gated"],
              "consistency": {"min_per_modality": 1, "max_doc_freq": 1.0}}
    run_score(a, out, params)
    scores = pd.read_parquet(out / "scores.parquet")
    assert np.isfinite(scores["score_consistency_binding"]).all()
    # no concept token pairs in this case: the binding score is the own-word text coverage, <= 1
    assert scores["score_consistency_binding"].between(0, 1).all()
    assert (scores["score_consistency_binding_gated"] <= scores["score_consistency_binding"]).all()


# ---- memory: co-occurrence settled sample by sample, offdist's SAE in sub-batches --------------------
def _all_pairs_cooc(codes: pd.DataFrame, ids: list[str], delta: float = 0.0) -> set[tuple[int, int]]:
    """Brute force: (sample index, feature) active on >= 1 text and >= 1 image token."""
    c = codes[codes["activation"] > delta]
    s = pd.Index(sorted(ids)).get_indexer(c["sample_id"])
    text = {(a, f) for a, f, m in zip(s, c["feature"], c["modality"], strict=True) if m == "text"}
    image = {(a, f) for a, f, m in zip(s, c["feature"], c["modality"], strict=True) if m == "image"}
    return text & image


def test_cooc_stream_holds_only_the_open_sample_and_detects_a_returning_one():
    from mmsae.scoring.streams import CoocStream

    key = lambda s, f: s << 32 | f  # noqa: E731
    st = CoocStream(3)
    # batch 1: sample 0 (f1 text, f1 + f2 image), then sample 1 starts (f5 text)
    assert st.add(np.array([0, 0, 0, 1]), np.array([key(0, 1), key(1, 5)]), np.array([key(0, 1), key(0, 2)]))
    assert st.open == 1 and st.text.tolist() == [key(1, 5)] and st.image.tolist() == []  # sample 0 settled
    # batch 2: sample 1 goes on (f5 image: co-occurs across the batch boundary), an unscored token, sample 2
    assert st.add(np.array([1, -1, 2]), np.zeros(0, np.int64), np.array([key(1, 5), key(2, 7)]))
    assert st.open == 2 and st.text.tolist() == [] and st.image.tolist() == [key(2, 7)]
    assert st.finish().tolist() == [key(0, 1), key(1, 5)]
    # a sample that comes back after the stream moved past it cannot be settled early
    st = CoocStream(3)
    assert st.add(np.array([0, 1]), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert not st.add(np.array([0]), np.zeros(0, np.int64), np.zeros(0, np.int64))


@pytest.mark.parametrize("shuffle", [False, True])
def test_code_stats_streamed_equal_brute_force(tmp_path, shuffle):
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(12)]
    tokens = pd.DataFrame({"sample_id": np.repeat(ids, 6), "position": np.tile(np.arange(6), 12),
                           "modality": np.tile(["special", "image", "image", "image", "text", "text"], 12)})
    entries = [(r, int(f), float(a)) for r in range(len(tokens)) for f, a in
               zip(rng.choice(5, 3, replace=False), rng.uniform(0.0, 1.0, 3), strict=True)]
    codes = make_codes(tokens, entries)  # in row order, as encode writes them: each sample one run
    if shuffle:  # samples interleaved: streaming must give up and keep every pair
        codes = codes.sample(frac=1.0, random_state=0).reset_index(drop=True)
    want = _all_pairs_cooc(codes, ids, delta=0.3)
    for batch_rows in (1, 5, 17, 10_000):  # batches cut inside samples, and one batch
        c = ScoringContext(ids, codes=codes, delta=0.3, batch_rows=batch_rows)
        st = c.code_stats
        assert set(zip(st["cooc_sample"].tolist(), st["cooc_feature"].tolist(), strict=True)) == want
        keys = st["cooc_sample"] << 32 | st["cooc_feature"]
        assert np.array_equal(keys, np.unique(keys))  # sorted, as before
    assert len(want) > 10


def test_offdist_runs_the_sae_in_sub_batches_with_the_same_result(tmp_path, monkeypatch):
    import torch

    import mmsae.scoring.offdist as S
    from mmsae.sae.model import SAEConfig, build_sae

    assert S.sae_rows(1024) == 4096 and S.sae_rows(65536) == 256 and S.sae_rows(1 << 30) == 64
    sae = build_sae(SAEConfig(d_in=2, d_sae=8, architecture="topk", k=2), seed=0)
    calls: list[int] = []
    forward, encode_sparse = sae.forward, sae.encode_sparse  # TopK: offdist encodes sparse (k pairs per token)
    monkeypatch.setattr(sae, "encode_sparse", lambda x: (calls.append(len(x)), encode_sparse(x))[1])
    c = cctx(tmp_path / "a", sae=sae)
    whole = c.image_stats  # 8 image tokens in one SAE call
    assert calls == [8]
    calls.clear()
    monkeypatch.setattr(S, "SAE_MAX_ROWS", 3)
    monkeypatch.setattr(S, "SAE_MIN_ROWS", 1)
    split = cctx(tmp_path / "b", sae=sae).image_stats
    assert calls == [3, 3, 2]
    for key in ("count", "unit_sum", "error"):
        assert np.array_equal(split[key], whole[key]), key
    with torch.no_grad():
        x = torch.from_numpy(c.store.read(0)[CTOKENS["modality"].to_numpy() == "image"])
        recon, _ = forward(x)
    rel = ((recon - x) ** 2).sum(1) / (x**2).sum(1)
    np.testing.assert_allclose(split["error"].sum(), rel.sum().item(), rtol=1e-6)


@pytest.mark.parametrize("cfg", [{}, {"bind_own_word": False, "per_modality_norm": False}])
def test_concept_and_binding_streamed_equal_whole_pool(tmp_path, cfg):
    from mmsae.scoring.binding import binding_pass
    from mmsae.scoring.concepts import concept_pass
    from mmsae.scoring.streams import Unsorted, sample_groups

    ref = bctx(tmp_path / "ref", **cfg)
    want_b, want_c = binding_pass(ref, stream=False), concept_pass(ref, stream=False)  # one whole-pool pass
    assert want_b["n_pairs"].sum() > 0 and want_c["min"].sum() > 0
    # in row order, as encode writes them (binding_entries appends b5's extra code at the end)
    codes = make_codes(BTOKENS, binding_entries()).sort_values("row", kind="stable").reset_index(drop=True)
    for batch_rows in (1, 3, 7, 10_000):  # batches cut inside samples, and one batch
        c = bctx(tmp_path / f"s{batch_rows}", **cfg)
        c.codes, c.batch_rows = codes, batch_rows
        # each group of the stream holds whole samples: no sample is in two groups
        seen = [set(s[s >= 0].tolist()) for _, s, _, _ in sample_groups(c, ("feature",), stream=True)]
        assert sum(len(x) for x in seen) == len(set().union(*seen)) == 7  # b7 has no codes
        for k, v in want_b.items():
            assert np.array_equal(c.binding[k], v), (batch_rows, k)  # bit-identical
        for k, v in want_c.items():
            assert np.array_equal(c.concept_sums[k], v), (batch_rows, k)
    # interleaved samples: the stream gives up, and the whole-pool pass gives the same answer
    shuffled = bctx(tmp_path / "shuf", **cfg)
    shuffled.codes, shuffled.batch_rows = codes.sample(frac=1.0, random_state=0).reset_index(drop=True), 5
    with pytest.raises(Unsorted):
        list(sample_groups(shuffled, ("feature",), stream=True))
    for k, v in want_b.items():
        assert np.array_equal(shuffled.binding[k], v), k
    for k, v in want_c.items():
        np.testing.assert_allclose(shuffled.concept_sums[k], v, rtol=1e-12)


@pytest.mark.parametrize(("architecture", "norm"), [("topk", "none"), ("topk", "constant_norm_rescale"), ("relu", "none")])
def test_offdist_error_equals_the_sae_forward(architecture, norm):
    """offdist's per-token reconstruction error (TopK decoded from its k pairs, no dense codes) is the one
    of the SAE's own forward, bit for bit."""
    import torch

    from mmsae.sae.model import SAEConfig, build_sae
    from mmsae.scoring.offdist import relative_error

    cfg = SAEConfig(d_in=16, d_sae=64, architecture=architecture, k=5 if architecture == "topk" else None,
                    apply_b_dec_to_input=architecture == "topk", normalize_activations=norm)
    sae = build_sae(cfg, seed=3).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(1)) * 3
    norms = x.norm(dim=1)
    with torch.no_grad():
        recon, _ = sae(x)
    expected = ((recon - x).pow(2).sum(1) / norms.pow(2).clamp_min(1e-12)).double().numpy()
    assert np.array_equal(relative_error(sae, x, norms), expected)


def test_store_passes_cap_their_block_in_bytes_with_the_same_result(tmp_path, monkeypatch):
    """offdist and nosae_cosine read the store 8 chunks at a time, fewer when that passes STORE_BLOCK_BYTES of
    float32 (1 GiB at d 4,096: score's peak was 4.3 GB); cut into 1-chunk blocks (samples straddle them),
    the scores and image statistics are the same."""
    import mmsae.scoring.methods as M
    import mmsae.scoring.offdist as S

    class Wide:
        chunk_tokens, d_model = 8192, 4096

    assert S.store_block_tokens(Wide()) == 2 * 8192  # 2 chunks of 128 MiB fit 256 MiB
    Wide.d_model = 128
    assert S.store_block_tokens(Wide()) == 8 * 8192  # a narrow store keeps 8 chunks (one shard file)
    Wide.d_model = 1 << 20
    assert S.store_block_tokens(Wide()) == 8192  # at least one chunk
    whole = cctx(tmp_path / "a")
    assert S.store_block_tokens(whole.store) == 8 * whole.store.chunk_tokens >= len(CTOKENS)
    monkeypatch.setattr(S, "STORE_BLOCK_BYTES", 1)
    monkeypatch.setattr(M, "NOSAE_ROWS", 3)
    cut = cctx(tmp_path / "b")
    assert S.store_block_tokens(cut.store) == cut.store.chunk_tokens < 5  # a sample's 5 tokens span 2 blocks
    for key in ("count", "unit_sum"):
        np.testing.assert_allclose(cut.image_stats[key], whole.image_stats[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(M.METHODS["nosae_cosine"](cut), M.METHODS["nosae_cosine"](whole), rtol=1e-12)
