"""Automatic explanations: masks, IoU, text contexts, the OpenAI-compatible client against a stub
server on localhost, and the explain / explain_score scripts on a hand-built toy world."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from helpers import Stub, completion, tiny_tokenizer
from PIL import Image, ImageDraw
from test_features import make_codes, make_store, write_encode

from mmsae import cli
from mmsae.artifacts import write_manifest
from mmsae.data.toyworld import object_mask
from mmsae.errors import InputError
from mmsae.features import FEATURE_SCHEMA, write_features
from mmsae.interpret.explain import (
    DEFAULT_PROMPT,
    ChatError,
    ExplainerConfig,
    FileMasks,
    ToyMasks,
    activation_grid,
    activation_index,
    activation_mask,
    chat,
    explain_features,
    image_activations,
    iou,
    masked_image,
    parse_explanation,
    render_context,
    score_explanations,
    score_stage,
    select_features,
    top_images,
)
from mmsae.interpret.explain import stage as explain_stage
from mmsae.models.grid import Grid


def check_request(body: dict, prompt: str = DEFAULT_PROMPT) -> tuple[list[Image.Image], str]:
    """The request is an OpenAI chat request with the prompt and the images as PNG data URIs."""
    assert body["temperature"] == 0 and body["model"] == "explainer-x"
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    texts = [c["text"] for c in msg["content"] if c["type"] == "text"]
    assert texts[0] == prompt
    images = []
    for c in msg["content"]:
        if c["type"] == "image_url":
            url = c["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return images, texts[-1]


# --------------------------------------------------------------------------------------------------
# Masks and IoU on hand-built cases
# --------------------------------------------------------------------------------------------------


def test_iou_hand_built():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True          # 4 pixels
    b[1:3, 1:3] = True        # 4 pixels, 1 shared
    assert iou(a, b) == pytest.approx(1 / 7)
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    assert math.isnan(iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))
    with pytest.raises(ValueError):
        iou(a, np.zeros((2, 2), bool))


def test_activation_mask_is_relative_to_the_feature_reference():
    cells = np.array([[2.0, 0.9], [1.0, 0.0]], np.float32)
    assert activation_mask(cells, ref=2.0, threshold=0.5).tolist() == [[True, False], [True, False]]
    # the same image is weak for a feature whose top activation is 10: nothing passes
    assert not activation_mask(cells, ref=10.0, threshold=0.5).any()
    # threshold 0: every active cell, never an inactive one
    assert activation_mask(cells, ref=2.0, threshold=0.0).tolist() == [[True, True], [True, False]]


def test_masked_image_dims_outside_the_mask():
    img = Image.new("RGB", (2, 1), (100, 200, 50))
    out = np.asarray(masked_image(img, np.array([[True, False]]), dim=0.2))
    assert out[0, 0].tolist() == [100, 200, 50]
    assert out[0, 1].tolist() == [20, 40, 10]
    assert np.asarray(masked_image(img, np.array([[False, False]]), dim=0.0)).max() == 0


def test_select_features_top_n_by_weight_or_explicit():
    f = pd.DataFrame({"feature": [0, 1, 2, 3, 4], "class": ["cross-modal", "text-only", "cross-modal", "cross-modal", "dead"],
                      "weight": [0.2, None, 0.7, 0.7, None]})
    assert select_features(f, 2) == [2, 3]  # tie at 0.7 broken by id
    assert select_features(f, 10) == [2, 3, 0]
    assert select_features(f, 2, [4, 1, 4]) == [4, 1]
    with pytest.raises(InputError, match="explain.features"):
        select_features(f, 2, [9])
    with pytest.raises(InputError, match="no cross-modal"):
        select_features(f.assign(**{"class": "dead"}), 2)


def test_top_images_and_activation_grid():
    acts = pd.DataFrame({"feature": [7, 7, 7, 7, 3], "sample_id": ["a", "a", "b", "c", "a"],
                         "cell": [0, 3, 1, 2, 0], "activation": [1.0, 1.0, 1.5, 0.5, 9.0]})
    g = Grid(2, 2)
    assert top_images(acts, 2, "max", g) == {3: ["a"], 7: ["b", "a"]}
    assert top_images(acts, 3, "mean", g)[7] == ["a", "b", "c"]  # a: 2/4 > b: 1.5/4 > c
    assert top_images(acts, 3, "max", g, allowed={"a", "c"})[7] == ["a", "c"]
    assert activation_grid(acts, 7, "a", g).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    index = activation_index(acts)
    assert activation_grid(acts, 7, "a", g, index).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert activation_grid(acts, 7, "zz", g, index).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_image_activations_maps_rows_to_grid_cells():
    # one sample: CLS-like first image token (patch 0) outside a grid that starts at patch 1
    tokens = pd.DataFrame({"row": range(6), "sample_id": "s", "position": range(6),
                           "modality": ["special", "image", "image", "image", "image", "image"],
                           "patch": [-1, 0, 1, 2, 3, 4]})
    codes = make_codes(tokens, [(1, 5, 9.0), (2, 5, 1.0), (5, 5, 2.0), (3, 6, 4.0), (0, 5, 3.0)])
    acts = image_activations(codes, tokens, [5], Grid(2, 2, first=1))
    assert sorted(zip(acts["cell"], acts["activation"], strict=True)) == [(0, 1.0), (3, 2.0)]


# --------------------------------------------------------------------------------------------------
# Text contexts
# --------------------------------------------------------------------------------------------------


def test_render_context_marks_the_token_and_folds_images():
    tok = tiny_tokenizer()
    words = ["USER:", "describe", "?", "ASSISTANT:", "red", "square", "blue", "circle"]
    ids = tok.convert_tokens_to_ids(words)
    bos = tok.convert_tokens_to_ids("<s>")
    img = tok.convert_tokens_to_ids("<image>")
    window = pd.DataFrame({
        "position": range(13),
        "modality": ["special", "text", "image", "image", "image", "image", *["text"] * 7],
        "token_id": [bos, ids[0], img, img, img, img, *ids[1:]],
    })
    assert render_context(tok, window, 9) == "USER: <image> describe ? ASSISTANT: <<red>> square blue circle"
    assert render_context(tok, window.iloc[9:11], 10) == "red <<square>>"


def test_parse_explanation():
    assert parse_explanation("\n  **Red squares.**\nBecause ...") == "Red squares"
    assert parse_explanation('Explanation: "blue circle"') == "blue circle"
    with pytest.raises(ChatError):
        parse_explanation("  \n ")


# --------------------------------------------------------------------------------------------------
# The client against a stub server
# --------------------------------------------------------------------------------------------------


def cfg_for(url: str, **kw) -> ExplainerConfig:
    return ExplainerConfig(base_url=url, model="explainer-x", **{"backoff_s": 0.0, "retries": 2, "timeout_s": 10, **kw})


def test_explain_features_request_shape_and_key(monkeypatch):
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(png, format="PNG")
    monkeypatch.setenv("EXPLAIN_TEST_KEY", "sk-secret")
    with Stub(lambda n, body: completion(["red things", "circles"][n])) as stub:
        df = explain_features([7, 3], {7: [png.getvalue()] * 2, 3: []}, {7: ["a <<red>> b"], 3: []},
                              DEFAULT_PROMPT, cfg_for(stub.url, api_key_env="EXPLAIN_TEST_KEY"))
    assert [r["path"] for r in stub.requests] == ["/v1/chat/completions"] * 2
    assert stub.requests[0]["headers"]["Authorization"] == "Bearer sk-secret"
    images, last = check_request(stub.requests[0]["body"])
    assert len(images) == 2 and images[0].getpixel((0, 0)) == (255, 0, 0)
    assert last == "Text passages:\n1. a <<red>> b"
    images, last = check_request(stub.requests[1]["body"])
    assert images == [] and last == "Text passages:\n(none)"
    assert df["explanation"].tolist() == ["red things", "circles"]
    assert df["n_images"].tolist() == [2, 0] and df["n_texts"].tolist() == [1, 0]
    assert df["error"].isna().all() and df["raw_response"].tolist() == ["red things", "circles"]
    assert "sk-secret" not in df.to_json()


def test_server_500_is_retried_then_recorded():
    sleeps = []
    with Stub(lambda n, body: (500, {"error": "boom"})) as stub, \
            pytest.raises(ChatError, match="after 3 attempts: HTTP 500"):
        chat(cfg_for(stub.url, backoff_s=0.25), [{"role": "user", "content": "x"}], sleep=sleeps.append)
    assert len(stub.requests) == 3 and sleeps == [0.25, 0.5]
    # recovers on the 3rd attempt
    with Stub(lambda n, body: (503, {}) if n < 2 else completion("ok")) as stub:
        assert chat(cfg_for(stub.url), [{"role": "user", "content": "x"}]) == "ok"
    # through explain_features: the first feature's attempts all fail, the second succeeds
    with Stub(lambda n, body: (500, {"error": "boom"}) if n < 3 else completion("blue")) as stub:
        df = explain_features([1, 2], {}, {}, "p", cfg_for(stub.url))
    assert df["explanation"].isna().tolist() == [True, False] and df.loc[1, "explanation"] == "blue"
    assert "HTTP 500" in df.loc[0, "error"] and pd.isna(df.loc[0, "raw_response"])


def test_client_errors_are_not_retried():
    with Stub(lambda n, body: (400, {"error": "bad model"})) as stub, pytest.raises(ChatError, match="HTTP 400"):
        chat(cfg_for(stub.url), [{"role": "user", "content": "x"}])
    assert len(stub.requests) == 1
    with Stub(lambda n, body: (200, {"nothing": 1})) as stub, \
            pytest.raises(ChatError, match="unexpected response shape"):
        chat(cfg_for(stub.url), [{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------------------------------
# Concept masks: toy-world ground truth and a segmenter's file
# --------------------------------------------------------------------------------------------------

RED_SQUARE_TL = {"side": "left", "colour": "red", "shape": "square", "bbox": [2, 2, 14, 14]}
BLUE_CIRCLE_BR = {"side": "right", "colour": "blue", "shape": "circle", "bbox": [18, 18, 30, 30]}


def test_toy_masks_match_colour_and_shape_words():
    samples = pd.DataFrame({"sample_id": ["a", "n"], "objects": [json.dumps([RED_SQUARE_TL, BLUE_CIRCLE_BR])] * 2,
                            "corruption": [None, "noise_image"]})
    m = ToyMasks(samples)
    red = m.mask("a", 0, "Red squares", (32, 32))
    assert red.sum() == 11 * 11 and red[3:14, 3:14].all()  # drawn as render draws it: [x0+1, x1-1]
    assert (m.mask("a", 0, "blue", (32, 32)) == object_mask([BLUE_CIRCLE_BR])).all()
    assert m.mask("a", 0, "red circle", (32, 32)).sum() == 0  # both kinds must match one object
    assert m.mask("a", 0, "red or blue", (32, 32)).sum() == red.sum() + object_mask([BLUE_CIRCLE_BR]).sum()
    assert m.mask("a", 0, "a dog", (32, 32)).sum() == 0 and m.labels(0, "a dog") == []
    assert m.labels(0, "triangles, green") == ["green", "triangle"]
    assert m.mask("n", 0, "red", (32, 32)).sum() == 0  # a noise image shows none of its objects
    assert m.mask("zzz", 0, "red", (32, 32)) is None
    assert m.labels(0, "credit squares") == ["square"]  # whole words only


def png_mask(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def test_file_masks_boxes_pngs_and_feature_rows(tmp_path):
    m = np.zeros((8, 8), bool)
    m[0:2, 0:4] = True
    path = tmp_path / "masks.parquet"
    pd.DataFrame({"sample_id": ["a", "a", "a", "b"], "concept": ["dog", "red ball", "cat", "dog"],
                  "mask": [png_mask(m), None, None, None],
                  "box": [None, [4, 4, 8, 8], [0, 0, 8, 8], [0, 0, 2, 2]],
                  "feature": [None, None, 5, None]}).to_parquet(path)
    fm = FileMasks(path)
    assert (fm.mask("a", 1, "Dogs", (8, 8)) == m).all()
    ball = fm.mask("a", 1, "a red ball", (8, 8))
    assert ball.sum() == 16 and ball[4:, 4:].all()
    assert fm.mask("a", 1, "cat", (8, 8)).sum() == 0      # the cat row is for feature 5 only
    assert fm.mask("a", 5, "cat", (8, 8)).sum() == 64
    assert fm.mask("c", 1, "dog", (8, 8)) is None         # not covered: not scored
    assert fm.labels(1, "dogs and a red ball") == ["dog", "red ball"]
    with pytest.raises(InputError, match="mask is 8x8, the image 16x16"):
        fm.mask("a", 1, "dog", (16, 16))


@pytest.mark.parametrize("frame, match", [
    (pd.DataFrame({"sample_id": ["a"], "label": ["dog"], "box": [[0, 0, 1, 1]]}), "field 'concept': missing column"),
    (pd.DataFrame({"sample_id": ["a"], "concept": ["dog"]}), "field 'mask': missing column"),
    (pd.DataFrame({"sample_id": ["a"], "concept": ["dog"], "mask": [b"not a png"]}), "not a decodable image"),
    (pd.DataFrame({"sample_id": ["a"], "concept": ["dog"], "box": [[0, 0, 1]]}), "field 'box'"),
    (pd.DataFrame({"sample_id": ["a"], "concept": ["dog"], "box": [None]}), "neither mask nor box"),
])
def test_bad_masks_file_is_one_input_error(tmp_path, frame, match):
    path = tmp_path / "masks.parquet"
    frame.to_parquet(path)
    with pytest.raises(InputError, match=match):
        FileMasks(path)


def test_score_explanations_hand_built():
    # grid 2 over 32 px: cell 0 = pixels [0, 16) x [0, 16)
    objects = {"t": [RED_SQUARE_TL, BLUE_CIRCLE_BR], "r1": [RED_SQUARE_TL], "r2": [BLUE_CIRCLE_BR]}
    m = ToyMasks(pd.DataFrame({"sample_id": list(objects), "objects": [json.dumps(o) for o in objects.values()]}))
    acts = pd.DataFrame({"feature": [7, 7, 7], "sample_id": ["t", "r1", "r2"], "cell": [0, 3, 3],
                         "activation": [2.0, 1.5, 0.4]})
    images = {s: Image.new("RGB", (32, 32)) for s in objects}
    expl = pd.DataFrame({"feature": [7, 8], "explanation": ["red square", None], "image_samples": [["t"], []]})
    out = score_explanations(expl, m, acts, images, Grid(2, 2), {7: 2.0}, 0.5, ["r1", "r2", "t"], 5, 0)
    assert len(out) == 1  # the failed explanation (None) is not scored
    row = out.iloc[0]
    # top image t: red square (121 px) inside the active cell 0 (256 px)
    assert row["iou_top"] == pytest.approx(121 / 256) and row["n_top"] == 1
    # r1: active cell 3 vs red square in cell 0 -> 0; r2: 0.4 < 0.5 x 2.0, no red square -> no IoU
    each = list(row["iou_random_each"])
    assert len(each) == 2 and each.count(0.0) == 1 and sum(math.isnan(x) for x in each) == 1
    assert row["n_random"] == 1 and row["iou_random"] == 0.0
    assert row["iou_gain"] == pytest.approx(121 / 256) and list(row["concepts"]) == ["red", "square"]


# --------------------------------------------------------------------------------------------------
# The scripts on a hand-built toy world (grid 2, 16-pixel patches)
# --------------------------------------------------------------------------------------------------

GREEN_TRI_TL = {"side": "left", "colour": "green", "shape": "triangle", "bbox": [2, 2, 14, 14]}
RED_SQUARE_BR = {"side": "right", "colour": "red", "shape": "square", "bbox": [18, 18, 30, 30]}
BLUE_CIRCLE_TL = {"side": "left", "colour": "blue", "shape": "circle", "bbox": [2, 2, 14, 14]}
GREEN_SQUARE_TL = {"side": "left", "colour": "green", "shape": "square", "bbox": [2, 2, 14, 14]}
RED_CIRCLE_BR = {"side": "right", "colour": "red", "shape": "circle", "bbox": [18, 18, 30, 30]}
SCENES = {"s0": [RED_SQUARE_TL, BLUE_CIRCLE_BR], "s1": [GREEN_TRI_TL, RED_SQUARE_BR],
          "s2": [BLUE_CIRCLE_TL, {**RED_SQUARE_BR, "colour": "yellow", "shape": "triangle"}],
          "s3": [GREEN_SQUARE_TL, RED_CIRCLE_BR]}


def draw(objects) -> bytes:
    img = Image.new("RGB", (32, 32), (30, 30, 30))
    d = ImageDraw.Draw(img)
    for o in objects:
        d.rectangle(o["bbox"], fill=(200, 40, 40) if o["colour"] == "red" else (40, 40, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def toy_world(tmp_path):
    """Artifacts for 4 samples; feature 7 fires on red-square patches and on the word 'red'."""
    tok = tiny_tokenizer()
    rows = []
    for sid, objs in SCENES.items():
        words = ["USER:"] + ["<image>"] * 4 + ["describe", "?", "ASSISTANT:"] + [w for o in objs for w in (o["colour"], o["shape"])]
        mods = ["text"] + ["image"] * 4 + ["text"] * (len(words) - 5)
        rows += [{"sample_id": sid, "position": i + 1, "modality": m, "token_id": tok.convert_tokens_to_ids(w),
                  "patch": i - 1 if m == "image" else -1} for i, (w, m) in enumerate(zip(words, mods, strict=True))]
        rows.insert(len(rows) - len(words), {"sample_id": sid, "position": 0, "modality": "special",
                                             "token_id": tok.bos_token_id, "patch": -1})
    tokens = pd.DataFrame(rows)
    tokens["row"] = np.arange(len(tokens))
    red_word = tokens[(tokens["token_id"] == tok.convert_tokens_to_ids("red")) & (tokens["modality"] == "text")]
    patch_row = {(r.sample_id, r.patch): r.row for r in tokens.itertuples() if r.modality == "image"}
    entries = [(patch_row["s0", 0], 7, 2.0), (patch_row["s1", 3], 7, 1.5), (patch_row["s3", 0], 7, 1.2),
               (patch_row["s2", 1], 3, 1.0)]
    entries += [(int(r), 7, 3.0) for r in red_word["row"]]
    codes = make_codes(tokens, entries)
    store = make_store(tmp_path / "extract", tokens.drop(columns="row"), np.zeros((len(tokens), 2), np.float32))
    write_manifest(store.folder, "extract", {}, counts={"image_grid": {"rows": 2, "cols": 2, "first": 0}})
    encode = write_encode(tmp_path / "encode", codes, 0, 8)
    feats = pd.DataFrame({"feature": np.arange(8, dtype=np.int32), "n_text": 0, "n_image": 0, "n_special": 0,
                          "top_text_rows": [[] for _ in range(8)], "top_text_acts": [[] for _ in range(8)],
                          "top_image_rows": [[] for _ in range(8)], "top_image_acts": [[] for _ in range(8)],
                          "weight": [None] * 8, "class": ["dead"] * 8})
    feats.at[7, "top_text_rows"] = [int(r) for r in red_word["row"]]
    feats.at[7, "top_text_acts"] = [3.0] * len(red_word)
    feats.loc[[3, 7], "class"] = "cross-modal"
    feats.loc[[3, 7], "weight"] = [0.4, 0.9]
    (tmp_path / "features").mkdir()
    write_features(feats[FEATURE_SCHEMA.names], tmp_path / "features" / "features.parquet")
    sdir = tmp_path / "samples"
    sdir.mkdir()
    pd.DataFrame({"sample_id": list(SCENES), "question": "describe ?", "image": [draw(o) for o in SCENES.values()],
                  "responses": [["x"]] * 4, "preferred": 0, "objects": [json.dumps(o) for o in SCENES.values()],
                  "corruption": [None] * 4}).to_parquet(sdir / "samples.parquet", index=False)
    model = tmp_path / "model"
    tok.save_pretrained(model)
    return {"--samples": sdir, "--extract": store.folder, "--encode": encode, "--features": tmp_path / "features",
            "--model": model}


def argv(paths: dict, keys: tuple[str, ...], out, params: dict) -> list[str]:
    return [x for k in keys for x in (k, str(paths[k]))] + ["--out", str(out), "--params", json.dumps(params)]


EXPLAIN_ARGS = ("--samples", "--extract", "--encode", "--features", "--model")
SCORE_ARGS = ("--samples", "--extract", "--encode", "--explain")


def test_explain_and_score_scripts_end_to_end(tmp_path):
    paths = toy_world(tmp_path)

    def reply(n, body):
        images, texts = check_request(body)
        return completion("Red squares." if "<<red>>" in texts else "nothing")

    params = {"top_n": 1, "n_images": 2, "n_texts": 5, "context_tokens": 3, "dim": 0.0, "min_side": 64, "backoff_s": 0}
    with Stub(reply) as stub:
        rc = cli.stage_main(explain_stage, argv(paths, EXPLAIN_ARGS, tmp_path / "explain",
                                              {**params, "base_url": stub.url, "model": "explainer-x"}))
    assert rc == 0
    (req,) = stub.requests  # top_n 1: the highest-weight cross-modal feature only
    images, texts = check_request(req["body"])
    # s0 (2.0) and s1 (1.5) before s3 (1.2); upscaled 2x; only the active quarter is left unblacked
    assert [im.size for im in images] == [(64, 64)] * 2
    a0 = np.asarray(images[0].convert("RGB"))
    assert a0[32:, :].max() == 0 and a0[:, 32:].max() == 0 and a0[:32, :32].max() > 0
    assert texts.startswith("Text passages:\n1. describe ? ASSISTANT: <<red>> square blue")
    e = pd.read_parquet(tmp_path / "explain" / "explanations.parquet")
    assert e["feature"].tolist() == [7] and e["explanation"].tolist() == ["Red squares"]
    assert list(e.loc[0, "image_samples"]) == ["s0", "s1"] and e.loc[0, "ref_activation"] == 2.0
    assert e.loc[0, "n_images"] == 2 and e.loc[0, "n_texts"] == 3 and e.loc[0, "weight"] == 0.9
    assert e.loc[0, "model"] == "explainer-x" and len(e.loc[0, "prompt_hash"]) == 16
    assert sorted(p.name for p in (tmp_path / "explain" / "images").iterdir()) == ["feature7_0.png", "feature7_1.png"]

    paths["--explain"] = tmp_path / "explain"
    rc = cli.stage_main(score_stage, argv(paths, SCORE_ARGS, tmp_path / "score", {"n_random": 5}))
    assert rc == 0
    s = pd.read_parquet(tmp_path / "score" / "explanation_scores.parquet").iloc[0]
    # top images s0 and s1: the red square (121 px) inside the active 256-px quarter
    assert s["iou_top"] == pytest.approx(121 / 256) and s["n_top"] == 2
    # random s2 (no red square, inactive: no IoU) and s3 (active on its green square: IoU 0)
    assert s["n_random"] == 1 and s["iou_random"] == 0.0
    manifest = json.loads((tmp_path / "score" / "manifest.json").read_text())
    assert manifest["counts"]["mean_iou_top"] == pytest.approx(121 / 256)


def test_explain_script_errors_are_one_line(tmp_path, capsys):
    paths = toy_world(tmp_path)
    assert cli.stage_main(explain_stage, argv(paths, EXPLAIN_ARGS, tmp_path / "x", {})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: explain params: field 'explain.base_url': not set: give the explainer's "
                   "OpenAI-compatible endpoint, e.g. http://host:8000/v1"]
    # every request fails: exit 2, nothing written
    with Stub(lambda n, body: (500, {"error": "down"})) as stub:
        rc = cli.stage_main(explain_stage, argv(paths, EXPLAIN_ARGS, tmp_path / "x", {"base_url": stub.url, "retries": 1, "backoff_s": 0}))
    assert rc == 2 and not (tmp_path / "x").exists() and len(stub.requests) == 4  # 2 features x 2 attempts
    assert "every request failed" in capsys.readouterr().err


def test_explain_score_bad_masks_file_is_one_line(tmp_path, capsys):
    paths = toy_world(tmp_path)
    (tmp_path / "explain").mkdir()
    write_manifest(tmp_path / "explain", "explain", {"mask_threshold": 0.5, "center_crop": False})
    pd.DataFrame({"feature": [7], "explanation": ["red"], "image_samples": [["s0"]], "ref_activation": [2.0]}
                 ).to_parquet(tmp_path / "explain" / "explanations.parquet")
    paths["--explain"] = tmp_path / "explain"
    bad = tmp_path / "masks.parquet"
    pd.DataFrame({"sample_id": ["s0"], "concept": ["red"], "mask": [b"garbage"]}).to_parquet(bad)
    rc = cli.stage_main(score_stage, argv(paths, SCORE_ARGS, tmp_path / "score", {"masks": str(bad)}))
    assert rc == 2 and not (tmp_path / "score").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {bad}: field 'mask': row 0 (sample s0): not a decodable image")
    # a good file: the box of the red object on s0 is exactly the active quarter -> IoU 1
    good = tmp_path / "good.parquet"
    pd.DataFrame({"sample_id": ["s0", "s3"], "concept": ["red", "red"], "box": [[0, 0, 16, 16], [16, 16, 32, 32]]}
                 ).to_parquet(good)
    rc = cli.stage_main(score_stage, argv(paths, SCORE_ARGS, tmp_path / "score", {"masks": str(good)}))
    assert rc == 0
    s = pd.read_parquet(tmp_path / "score" / "explanation_scores.parquet").iloc[0]
    assert s["iou_top"] == 1.0 and s["n_top"] == 1
    assert s["n_random"] == 1 and s["iou_random"] == 0.0  # s3: active top-left, box bottom-right


def test_explain_rules_are_opt_in_and_plan_their_chain(tmp_path):
    from test_workflow import REPO, planned_jobs, smk

    cfg = tmp_path / "explain.yaml"
    cfg.write_text("explain:\n  base_url: http://127.0.0.1:9/v1\nexplain_score:\n  masks: masks.parquet\n")
    pd.DataFrame({"sample_id": ["a"], "concept": ["red"], "box": [[0, 0, 1, 1]]}).to_parquet(tmp_path / "masks.parquet")
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"), str(cfg),
            "--", "explain_score")
    jobs = planned_jobs(r)
    assert {"explain", "explain_score", "features", "encode", "sample"} <= jobs and "report" not in jobs
    section = (r.stdout + r.stderr).split("rule explain_score:")[1].split("rule ")[0]
    assert "masks.parquet" in section  # a segmenter's masks file is an input: a new file reruns the score


def test_premise_localization_on_the_hand_built_world(tmp_path):
    from mmsae.interpret.explain import premise_localization

    paths = toy_world(tmp_path)
    prem = tmp_path / "premise"
    prem.mkdir()
    (prem / "premise.json").write_text(json.dumps({"concepts": [{"word": "red", "feature": 7},
                                                                {"word": "yellow", "feature": None}]}))
    write_manifest(prem, "premise", {}, {"samples": paths["--samples"], "extract": paths["--extract"],
                                         "encode": paths["--encode"]})
    t = premise_localization(prem, n_images=3, n_random=5)
    assert t["explanation"].tolist() == ["red"] and t["feature"].tolist() == [7]
    # s0, s1: red square inside the active quarter (121/256); s3: active on its green square, red circle elsewhere
    assert list(t.loc[0, "iou_top_each"]) == pytest.approx([121 / 256, 121 / 256, 0.0])
    # the only other image, s2, has neither a red object nor an activation: nothing to score
    assert t.loc[0, "n_random"] == 0 and math.isnan(t.loc[0, "iou_random"])
