"""Image-patch filtering (mmsae.interpret.patches, workflow/scripts/patch_filter.py): patch scores on hand-built
codes, the black-out geometry, the labelled image sets, classification on a tiny LLaVA, the stage script."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import build_tiny_llava, build_tiny_llava_next, tiny_llava, tiny_records
from PIL import Image

from mmsae.artifacts import write_manifest
from mmsae.config import stage_params
from mmsae.data import Record, toyworld
from mmsae.errors import InputError
from mmsae.interpret import patches
from mmsae.models import LlavaAdapter, LlavaNextAdapter
from mmsae.models.grid import Grid, pixel_boxes
from mmsae.models.toy import build_processor
from mmsae.sae.io import hook_name, save_sae
from mmsae.sae.model import SAEConfig, build_sae
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import METHODS as SAMPLE_METHODS

REPO = Path(__file__).resolve().parents[1]
QUESTION = "what shape is on the left ?"


# ---- patch scores: hand-built codes ------------------------------------------------------------------
# 3 patches x 5 features; the prompt's 2 text tokens fire features 1 and 3 (above delta 0.5).
PATCH = np.array([[2.0, 0.0, 1.0, 0.0, 0.2],
                  [0.0, 3.0, 0.6, 0.7, 0.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0]])
TEXT_ACTS = np.array([[0.0, 1.0, 0.4, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 2.0, 0.3]])
WEIGHTS = np.array([0.0, 0.5, 0.0, 0.25, 0.0])
CROSS = np.array([True, True, False, False, False])


def test_sae_patch_scores_hand_built():
    s = patches.sae_patch_scores(PATCH, TEXT_ACTS, WEIGHTS, delta=0.5, cooccurrence="text")
    np.testing.assert_array_equal(s["l0"], [2, 3, 0])  # 0.2 is below delta
    np.testing.assert_allclose(s["l1"], [3.0, 4.3, 0.0])
    np.testing.assert_array_equal(s["cooc_l0"], [0, 2, 0])  # features 1 and 3 also fire on the text
    np.testing.assert_allclose(s["cosine"], [0.0, 0.75, 0.0])
    f = patches.sae_patch_scores(PATCH, TEXT_ACTS, WEIGHTS, delta=0.5, cooccurrence="features", cross_modal=CROSS)
    np.testing.assert_array_equal(f["cooc_l0"], [1, 1, 0])  # features 0 and 1 are cross-modal
    np.testing.assert_allclose(f["cosine"], [0.0, 0.5, 0.0])
    none = patches.sae_patch_scores(PATCH, TEXT_ACTS[:0], WEIGHTS, delta=0.5)
    np.testing.assert_array_equal(none["cooc_l0"], [0, 0, 0])  # no text: nothing co-occurs


def test_patch_scores_are_the_sample_level_definitions_on_prompt_plus_patch():
    """cosine / cooc_l0 of patch p = mmsae.scoring's on the sample (prompt text tokens + patch p);
    l0 / l1 = mmsae.scoring's on the sample made of patch p alone (one token, so per token = total)."""
    delta = 0.5
    ours = patches.sae_patch_scores(PATCH, TEXT_ACTS, WEIGHTS, delta=delta)
    rows, alone = [], []
    for p in range(len(PATCH)):
        for t, acts in enumerate(TEXT_ACTS):
            rows += [{"sample_id": f"p{p}", "position": 1 + t, "modality": "text", "feature": f, "activation": a}
                     for f, a in enumerate(acts) if a > 0]
        img = [{"sample_id": f"p{p}", "position": 3, "modality": "image", "feature": f, "activation": a}
               for f, a in enumerate(PATCH[p]) if a > 0]
        rows += img
        alone += img
    ids = [f"p{p}" for p in range(len(PATCH))]
    ctx = ScoringContext(ids, codes=pd.DataFrame(rows), weights=WEIGHTS, delta=delta)
    np.testing.assert_allclose(SAMPLE_METHODS["cosine"](ctx), ours["cosine"])
    np.testing.assert_allclose(SAMPLE_METHODS["cooc_l0"](ctx), ours["cooc_l0"])
    tokens = pd.DataFrame({"sample_id": ids, "position": 3, "modality": "image"})
    one = ScoringContext(ids, codes=pd.DataFrame(alone), tokens=tokens, delta=delta)
    np.testing.assert_allclose(SAMPLE_METHODS["l0"](one), ours["l0"])
    np.testing.assert_allclose(SAMPLE_METHODS["l1"](one), ours["l1"])


def test_random_scores_and_keep_masks():
    a = patches.random_scores("img-1", 16, seed=0)
    np.testing.assert_array_equal(a, patches.random_scores("img-1", 16, seed=0))  # a function of (seed, id)
    assert not np.array_equal(a, patches.random_scores("img-1", 16, seed=1))
    assert not np.array_equal(a, patches.random_scores("img-2", 16, seed=0))
    scores = np.arange(16, dtype=float)  # patch 15 best
    ties = patches.tiebreak("img-1", 16, 0)
    for fraction, k in ((0.75, 12), (0.5, 8), (0.25, 4), (0.3, 5)):  # ceil(f * 16)
        keep = patches.keep_mask(scores, fraction, ties)
        assert keep.sum() == k and keep[16 - k :].all()
    # ties go by the seeded order, not by position
    flat = np.zeros(16)
    keep = patches.keep_mask(flat, 0.25, ties)
    np.testing.assert_array_equal(np.nonzero(keep)[0], np.sort(np.argsort(ties)[:4]))
    other = patches.keep_mask(flat, 0.25, patches.tiebreak("img-2", 16, 0))
    assert not np.array_equal(keep, other)  # another image, another order


# ---- geometry ----------------------------------------------------------------------------------------
def test_black_out_equals_processing_a_picture_blacked_out_in_the_same_boxes():
    """The toy processor (32x32, 8 px patches): masking pixel_values = masking the picture first."""
    proc = build_processor()
    image = tiny_records(1)[0].image
    keep = np.zeros(16, bool)
    keep[[0, 5, 6, 15]] = True
    arr = np.asarray(image).copy()
    for x0, y0, x1, y1 in pixel_boxes(4, 4, 32, 32)[~keep]:
        arr[y0:y1, x0:x1] = 0
    expected = proc.image_processor(images=[Image.fromarray(arr)], return_tensors="pt")["pixel_values"][0]
    pv = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    fill = patches.black_pixel(SimpleNamespace(processor=proc))
    got = patches.black_out(pv, keep, 4, 4, fill)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got[:, 8:16, 8:16], pv[:, 8:16, 8:16])  # cell 5 kept untouched
    assert not torch.equal(got, pv) and torch.equal(patches.black_out(pv, np.ones(16, bool), 4, 4, fill), pv)
    with pytest.raises(ValueError, match="keep mask"):
        patches.black_out(pv, np.ones(9, bool), 4, 4, fill)


def test_only_fixed_grid_llava_is_supported():
    model, proc = build_tiny_llava()
    assert patches.patch_grid(LlavaAdapter(model, proc)) == Grid(4, 4, 0)
    nxt = LlavaNextAdapter(*build_tiny_llava_next())
    with pytest.raises(InputError, match="anyres"):
        patches.patch_grid(nxt)
    for family, word in (("chameleon", "VQ"), ("qwen2_vl", "merges")):
        with pytest.raises(InputError, match=word):
            patches.patch_grid(SimpleNamespace(family=family, path="m"))


# ---- labelled images ---------------------------------------------------------------------------------
def _png(colour=(200, 30, 30), size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_set_and_its_errors(tmp_path):
    root = tmp_path / "imgs"
    for label, n in (("red_fox", 3), ("cat", 2)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(_png())
    (root / "cat" / "notes.txt").write_text("not an image")
    s = patches.image_folder_set(root)
    assert s.label_set == ["cat", "red fox"] and len(s) == 5
    assert sorted(s.labels) == ["cat", "cat", "red fox", "red fox", "red fox"]
    assert s.ids[0] == "cat/0.png" and s.images[0].mode == "RGB"
    assert len(patches.image_folder_set(root, max_images=2, seed=0)) == 2
    with pytest.raises(InputError, match="does not exist") as e:
        patches.image_folder_set(tmp_path / "nope")
    assert "nope" in str(e.value)
    (root / "dog").mkdir()
    with pytest.raises(InputError, match="class 'dog' has no images") as e:
        patches.image_folder_set(root)
    assert str(root / "dog") in str(e.value)
    (root / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="undecodable") as e:
        patches.image_folder_set(root)
    assert str(root / "dog" / "bad.png") in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no class folders"):
        patches.image_folder_set(empty)


def _heldout(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "heldout.parquet"
    toyworld.generate(0, 10, 0.0, [], 10, n)["heldout"].to_parquet(path)
    return path


def test_toy_image_set_labels_from_the_objects(tmp_path):
    path = _heldout(tmp_path)
    df = pd.read_parquet(path)
    s = patches.toy_image_set(path, QUESTION)
    assert s.label_set == sorted(toyworld.SHAPES) and len(s) == len(df)
    left = {sid: json.loads(o)[0]["shape"] for sid, o in zip(df["sample_id"], df["objects"], strict=True)}
    assert s.labels == [left[i] for i in s.ids]
    c = patches.toy_image_set(path, "what color is the circle ?")
    with_circle = {sid for sid, o in zip(df["sample_id"], df["objects"], strict=True)
                   if any(x["shape"] == "circle" for x in json.loads(o))}
    assert set(c.ids) == with_circle and c.label_set == sorted(toyworld.COLOURS)
    with pytest.raises(InputError, match="one-word colour or shape"):
        patches.toy_image_set(path, "describe ?")
    with pytest.raises(InputError, match="applies to none"):
        patches.toy_image_set(path, "is red a color or a shape ?")
    with pytest.raises(InputError, match="does not exist"):
        patches.toy_image_set(tmp_path / "missing.parquet", QUESTION)


# ---- on a tiny LLaVA -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)
    model, proc = build_tiny_llava(seed=0)
    return LlavaAdapter(model, proc)


def _sae(d_in: int = 32, d_sae: int = 64, layer: int = 0, seed: int = 0):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, normalize_activations="constant_norm_rescale",
                    metadata={"hook_layer": layer, "hook_name": hook_name(layer)})
    sae = build_sae(cfg, seed=seed)
    with torch.no_grad():
        sae.W_enc.mul_(10.0)  # tokens rescaled to norm sqrt(d): codes of order 1, about half of them active
    return sae


def _image_set(n: int = 3) -> patches.ImageSet:
    recs = tiny_records(n)
    return patches.ImageSet([r.sample_id for r in recs], [r.image for r in recs], ["circle"] * n,
                            sorted(toyworld.SHAPES), "memory")


def test_score_patches_match_an_independent_forward(adapter):
    images, sae, layer = _image_set(2), _sae(), 0
    weights = np.linspace(-0.2, 0.8, 64)
    cross = weights > 0.3
    scores = patches.score_patches(adapter, sae, layer, images, "describe ?", weights, cross, patches.METHODS,
                                   delta=0.1, batch_size=2, progress=False)
    assert len(scores) == 2 * 16 and list(scores["patch"][:16]) == list(range(16))
    np.testing.assert_array_equal(scores["row"][:16], np.repeat(np.arange(4), 4))
    assert adapter.model.config._attn_implementation == "sdpa"  # restored after the eager pass

    recs = [Record(i, "describe ?", im, [], -1) for i, im in zip(images.ids, images.images, strict=True)]
    inputs, meta = adapter.build_batch(recs, include_response=False)
    model = adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    for b, image_id in enumerate(images.ids):
        got = scores[scores["image_id"] == image_id]
        img = np.nonzero(meta.modality[b] == "image")[0]
        txt = np.nonzero(meta.modality[b] == "text")[0]
        with torch.no_grad():
            codes = sae.encode(out.hidden_states[layer + 1][b]).numpy()
        active = codes[img] > 0.1
        assert 0 < active.sum() < active.size  # a real mix of active and silent features
        np.testing.assert_array_equal(got["score_l0"], active.sum(1))
        np.testing.assert_allclose(got["score_l1"], (codes[img] * active).sum(1), rtol=1e-4)
        cooc = active & (codes[txt] > 0.1).any(0)
        np.testing.assert_array_equal(got["score_cooc_l0"], cooc.sum(1))
        np.testing.assert_allclose(got["score_cosine"], cooc @ weights, rtol=1e-4, atol=1e-6)
        last = int(meta.attention_mask[b].sum()) - 1
        attn = torch.stack([a[b, :, last, img].mean(0) for a in out.attentions]).mean(0).numpy()
        np.testing.assert_allclose(got["score_attention"], attn, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(got["score_random"], patches.random_scores(image_id, 16, 0))


def test_likelihood_classification_and_masked_inputs(adapter):
    images = _image_set(1)
    image_id, image = images.ids[0], images.images[0]
    grid = patches.patch_grid(adapter)
    fill = patches.black_pixel(adapter)
    keep = np.zeros(16, bool)
    keep[:4] = True
    views = [patches.View("none", 1.0, np.ones(16, bool)), patches.View("x", 0.25, keep)]
    labels = images.label_set
    recs = [Record(image_id, QUESTION, image, [label], 0) for label in labels] * 2
    inputs, meta = patches.masked_batch(adapter, recs, [views[0]] * 3 + [views[1]] * 3, grid, fill, True)
    plain, _ = adapter.build_batch(recs[:1], include_response=False)
    assert torch.equal(inputs["pixel_values"][0], plain["pixel_values"][0])
    assert torch.equal(inputs["pixel_values"][3], patches.black_out(plain["pixel_values"][0], keep, 4, 4, fill))
    lp = patches.response_logprob(adapter, inputs, meta)
    with torch.no_grad():
        logp = F.log_softmax(adapter.model(**inputs, use_cache=False).logits.float(), -1)
    for i in range(len(recs)):  # independent: sum of log p(token | prefix) over the response (EOS included)
        pos = np.nonzero(meta.is_response[i])[0]
        assert len(pos) == 2  # the label word + </s>
        ref = sum(float(logp[i, p - 1, inputs["input_ids"][i, p]]) for p in pos)
        assert lp[i].item() == pytest.approx(ref, abs=1e-4)
    preds = patches.classify_views(adapter, image_id, image, QUESTION, views, labels, grid, fill, "likelihood",
                                   batch_size=4)
    assert preds == [labels[int(lp[:3].argmax())], labels[int(lp[3:].argmax())]]


def test_greedy_classification_is_the_models_generated_answer(adapter):
    from mmsae.evaluation.llava_bench import generate_answer

    images = _image_set(1)
    grid, fill = patches.patch_grid(adapter), patches.black_pixel(adapter)
    views = [patches.View("none", 1.0, np.ones(16, bool))] * 2
    preds = patches.classify_views(adapter, images.ids[0], images.images[0], QUESTION, views, images.label_set,
                                   grid, fill, "greedy", max_new_tokens=3)
    assert preds == [generate_answer(adapter, QUESTION, images.images[0], 3)] * 2
    assert patches.normalise_answer("  Red_Fox. ") == "red fox"


def test_accuracy_table_counts_and_order():
    pred = pd.DataFrame({
        "method": ["none", "none", "l0", "l0", "l0", "l0"],
        "fraction": [1.0, 1.0, 0.25, 0.25, 0.75, 0.75],
        "correct": [True, False, True, True, False, True],
    })
    acc = patches.accuracy_table(pred)
    assert acc[["method", "fraction"]].values.tolist() == [["none", 1.0], ["l0", 0.75], ["l0", 0.25]]
    assert acc["accuracy"].tolist() == [0.5, 0.5, 1.0] and acc["n_images"].tolist() == [2, 2, 2]


# ---- the stage script ----------------------------------------------------------------------------------
def _artifacts(tmp_path: Path) -> dict[str, Path]:
    model = tiny_llava(tmp_path)
    sae_dir = tmp_path / "train_sae"
    save_sae(_sae(), sae_dir / "sae")
    feats = tmp_path / "features"
    feats.mkdir()
    cls = np.array(["cross-modal", "text-only", "image-only", "dead"])[np.arange(64) % 4]
    pd.DataFrame({"feature": np.arange(64), "weight": np.where(cls == "cross-modal", 0.5, np.nan),
                  "class": cls}).to_parquet(feats / "features.parquet")
    write_manifest(feats, "features", {"rule": "per_modality"}, counts={"layer": 0, "d_sae": 64})
    toy = tmp_path / "toyworld"
    toy.mkdir()
    _heldout(toy, 8)
    return {"model": model, "sae": sae_dir, "features": feats, "toyworld": toy}


def _run(args: list[str], capsys) -> tuple[int, str]:
    """The stage's command line in this process (a subprocess pays ~10 s of imports per call)."""
    from mmsae import cli
    from mmsae.interpret.patches import stage

    capsys.readouterr()
    rc = cli.stage_main(stage, args)
    return rc, capsys.readouterr().err


def test_stage_script_end_to_end_and_bad_input(tmp_path, capsys):
    a = _artifacts(tmp_path)
    out = tmp_path / "patch_filter"
    params = {"max_images": 5, "fractions": [0.75, 0.25]}
    common = ["--model", str(a["model"]), "--sae", str(a["sae"]), "--features", str(a["features"])]
    rc, err = _run(["--toyworld", str(a["toyworld"]), *common, "--out", str(out), "--params", json.dumps(params)], capsys)
    assert rc == 0, err[-3000:]
    acc = pd.read_parquet(out / "accuracy.parquet")
    assert acc[["method", "fraction"]].values.tolist() == [["none", 1.0]] + [
        [m, f] for m in patches.METHODS for f in (0.75, 0.25)]
    assert (acc["n_images"] == 5).all() and acc["accuracy"].between(0, 1).all()
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == 5 * 13 and set(pred["prediction"]) <= set(toyworld.SHAPES)
    assert set(pred.loc[pred["fraction"] == 0.25, "n_kept"]) == {4}
    assert len(pd.read_parquet(out / "patch_scores.parquet")) == 5 * 16
    for png in ("accuracy.png", "examples.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["n_images"] == 5 and man["counts"]["grid"] == {"rows": 4, "cols": 4, "first": 0}
    assert man["params"] == stage_params("patch_filter", params)

    # bad input: one line naming the file, exit 2, no folder left behind
    bad_out = tmp_path / "bad"
    rc, err = _run(["--toyworld", str(tmp_path), *common, "--out", str(bad_out)], capsys)
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'heldout.parquet'}: field 'path': file does not exist")
    assert not bad_out.exists()
    rc, err = _run(["--images", str(tmp_path / "no_such_dir"), *common, "--out", str(bad_out)], capsys)
    assert rc == 2 and "no_such_dir: field 'patch_filter.images'" in err.strip().splitlines()[-1]
