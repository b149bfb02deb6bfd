"""AUROC (ties, direction), the AUROC table per corruption kind, and the premise check on a synthetic world."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_features import make_codes, make_store, write_encode

from mmsae import cli
from mmsae.artifacts import write_manifest
from mmsae.errors import InputError
from mmsae.evaluation import premise
from mmsae.evaluation.auroc import auroc, auroc_table, average_ranks
from mmsae.evaluation.premise import patch_grid, premise_check, word_token_ids


def brute_auroc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_hand_computed():
    assert auroc([0.9, 0.8, 0.7, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.1], [False, False, True, True]) == 0.0
    # positives {1, 2}, negatives {1, 0}: pairs 0.5 + 1 + 1 + 1 = 3.5 of 4
    assert auroc([1, 2, 1, 0], [True, True, False, False]) == pytest.approx(0.875)
    assert auroc([3, 3, 3, 3], [True, False, True, False]) == 0.5
    assert np.isnan(auroc([1, 2], [True, True]))


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=40).astype(float)
    y = rng.random(40) < 0.4
    assert auroc(s, y) == pytest.approx(brute_auroc(s, y))


def test_average_ranks_columns():
    x = np.array([[0, 5], [2, 5], [0, 1], [1, 5]], float)
    np.testing.assert_allclose(average_ranks(x), [[1.5, 3], [4, 3], [1.5, 1], [3, 3]])
    np.testing.assert_allclose(average_ranks(np.array([2.0, 2.0, 1.0])), [2.5, 2.5, 1])


def test_auroc_table_direction_and_counts():
    samples = pd.DataFrame({"sample_id": list("abcdef"),
                            "corruption": [None, None, "mismatch", "noise_image", "mismatch", None]})
    # higher = kept first; mismatch scores below every clean one, noise_image above every clean one
    scores = pd.DataFrame({"sample_id": list("abcdef"), "score_x": [5.0, 6.0, 1.0, 9.0, 2.0, 5.0]})
    t = auroc_table(scores, samples).set_index("kind")
    assert t.loc["mismatch", "auroc"] == 1.0
    assert t.loc["noise_image", "auroc"] == 0.0  # ranks bad data as good
    assert t.loc["any", "auroc"] == pytest.approx(6 / 9)
    assert t.loc["mismatch", "n_corrupted"] == 2 and t.loc["any", "n_corrupted"] == 3 and t.loc["any", "n_clean"] == 3
    assert auroc_table(scores, samples.drop(columns="corruption")).empty


# Synthetic toy world, grid 2 (16-pixel patches): patch 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
WORD_IDS = {"red": 10, "green": 11, "blue": 12, "yellow": 13, "square": 20, "circle": 21, "triangle": 22}
SCENES = {
    "s0": [("red", "square", [2, 2, 14, 14]), ("blue", "circle", [18, 18, 30, 30])],   # patches 0, 3
    "s1": [("blue", "triangle", [2, 18, 14, 30]), ("green", "square", [18, 2, 30, 14])],  # patches 2, 1
    "s2": [("blue", "circle", [2, 2, 14, 14]), ("red", "square", [18, 18, 30, 30])],    # noise image: excluded
}
CORRUPTION = {"s0": None, "s1": None, "s2": "noise_image"}


def premise_world(word_ids=WORD_IDS):
    objects = {s: json.dumps([{"colour": c, "shape": sh, "bbox": b} for c, sh, b in objs]) for s, objs in SCENES.items()}
    samples = pd.DataFrame({"sample_id": list(SCENES), "objects": [objects[s] for s in SCENES],
                            "corruption": [CORRUPTION[s] for s in SCENES]})
    rows = []
    for s, objs in SCENES.items():
        rows += [{"sample_id": s, "modality": "special", "token_id": 1, "patch": -1}]
        rows += [{"sample_id": s, "modality": "image", "token_id": 4, "patch": p} for p in range(4)]
        rows += [{"sample_id": s, "modality": "text", "token_id": word_ids[w], "patch": -1} for o in objs for w in o[:2]]
    tokens = pd.DataFrame(rows)
    tokens["position"] = tokens.groupby("sample_id").cumcount()
    tokens["row"] = np.arange(len(tokens))
    blue_patch = {"s0": 3, "s1": 2, "s2": 1}  # s2: a patch its (wrong) objects say is empty
    red_patch = {"s0": 0, "s2": 3}
    entries = []
    for r in tokens.itertuples():
        if r.modality == "text" and r.token_id == word_ids["blue"]:
            entries.append((r.row, 7, 2.0))
        if r.modality == "image" and r.patch == blue_patch[r.sample_id]:
            entries.append((r.row, 7, 0.5))
        if r.modality == "text" and r.token_id == word_ids["red"]:
            entries.append((r.row, 3, 1.0))  # red word only
        if r.modality == "image" and red_patch.get(r.sample_id) == r.patch:
            entries.append((r.row, 5, 1.0))  # red patches only
    return samples, tokens, make_codes(tokens, entries)


def test_premise_check_synthetic():
    samples, tokens, codes = premise_world()
    assert patch_grid(tokens) == 2
    t = premise_check(codes, tokens, samples, 2, WORD_IDS, d_sae=8).set_index("word")
    assert t.attrs["n_samples"] == 2  # the noise-image sample is left out
    assert t.loc["blue", "feature"] == 7
    assert t.loc["blue", "text_auroc"] == 1.0 and t.loc["blue", "image_auroc"] == 1.0
    # red: one feature for the word, another for the patches; no shared one
    assert t.loc["red", "best_text_feature"] == 3 and t.loc["red", "best_text_auroc"] == 1.0
    assert t.loc["red", "best_image_feature"] == 5 and t.loc["red", "best_image_auroc"] == 1.0
    assert t.loc["red", "min_auroc"] == 0.5
    assert t.loc["blue", "kind"] == "colour" and t.loc["circle", "kind"] == "shape"
    assert t.loc["yellow", "n_text_pos"] == 0 and np.isnan(t.loc["yellow", "text_auroc"])


def test_patch_grid_rejects_non_square():
    tokens = pd.DataFrame({"modality": ["image"] * 3, "patch": [0, 1, 2]})
    with pytest.raises(InputError, match="square"):
        patch_grid(tokens)


def test_word_token_ids_and_premise_script(tmp_path):
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = word_token_ids(tok, ["red", "circle", "zebra"])
    assert set(ids) == {"red", "circle"} and ids["red"] == tok.convert_tokens_to_ids("red")

    samples, tokens, codes = premise_world(word_token_ids(tok, list(WORD_IDS)))
    store = make_store(tmp_path / "extract", tokens.drop(columns="row"), np.zeros((len(tokens), 2), np.float32))
    encode = write_encode(tmp_path / "encode", codes, 0, 8)
    model = tmp_path / "model"
    tok.save_pretrained(model)
    sdir = tmp_path / "samples"
    sdir.mkdir()
    samples.assign(question="describe ?", image=b"x", responses=[["a"]] * 3, preferred=0).to_parquet(
        sdir / "samples.parquet", index=False)
    write_manifest(sdir, "sample", {})
    out = tmp_path / "premise"
    rc = cli.stage_main(premise, ["--samples", str(sdir), "--extract", str(store.folder), "--encode", str(encode),
                                  "--model", str(model), "--out", str(out), "--params", '{"max_samples": 10}'])
    assert rc == 0
    result = json.loads((out / "premise.json").read_text())
    blue = next(c for c in result["concepts"] if c["word"] == "blue")
    assert blue["feature"] == 7 and blue["text_auroc"] == 1.0 and blue["image_auroc"] == 1.0
    assert result["grid"] == 2 and result["layer"] == 0
