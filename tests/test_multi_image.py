"""Multi-image records: schema and validation, readers that keep every image in order, adapters that
build inputs with several images per sample (captured states == hidden_states, image-token counts ==
the processor's per image, `image_index` / per-image `patch` right)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    build_tiny_chameleon,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen2_vl,
    records_frame,
    tiny_records,
)
from PIL import Image

from mmsae.activations import ActivationStore, ActivationWriter, extract
from mmsae.artifacts import Files
from mmsae.data import IMAGE_MARKER, Record, read_records
from mmsae.data.readers import read_dataset
from mmsae.errors import InputError
from mmsae.models import format_prompt, load_model
from mmsae.models.adapters import ChameleonAdapter, LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter
from mmsae.params import DataParams

FAMILIES = {"llava": (build_tiny_llava, LlavaAdapter), "llava_next": (build_tiny_llava_next, LlavaNextAdapter),
            "chameleon": (build_tiny_chameleon, ChameleonAdapter), "qwen2_vl": (build_tiny_qwen2_vl, Qwen2VLAdapter)}
SIZES = [(32, 32), (16, 32), (40, 20)]  # (width, height): different counts for LLaVA-NeXT and Qwen2-VL


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def multi_records() -> list[Record]:
    """Three samples: 2 images placed in the text, 3 images before the text (no markers), 1 image."""
    base = tiny_records(6, sizes=SIZES)
    a, b, c = base[0], base[1], base[2]
    first = Record(a.sample_id, f"{IMAGE_MARKER} left {IMAGE_MARKER} {a.question}", a.image, a.responses, a.preferred,
                   extra_images=[base[3].image])
    second = Record(b.sample_id, b.question, b.image, b.responses, b.preferred,
                    extra_images=[base[4].image, base[5].image])
    return [first, second, c]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    build, cls = FAMILIES[request.param]
    model, processor = build()
    return request.param, cls(model, processor, request.param)


def processor_count(adapter, image: Image.Image) -> int:
    """Image tokens the processor alone expands one image into (placeholder ids in its input_ids)."""
    text = format_prompt(adapter.processor, "red", has_image=True)
    ids = adapter.processor(text=[text], images=[image], return_tensors="pt", **adapter.processor_kwargs())["input_ids"]
    return int((ids == adapter.image_token_id).sum())


def test_adapters_build_several_images(family, tmp_path):
    name, adapter = family
    records = multi_records()
    writer = ActivationWriter(tmp_path / "x", [0, 1], adapter.d_model, chunk_tokens=16, shard_chunks=2)
    extract(adapter, records, [0, 1], 3, writer, progress=False)
    writer.close()
    store = ActivationStore(tmp_path / "x")
    tokens = pq.read_table(tmp_path / "x" / Files.TOKENS).to_pandas()
    assert tokens["image_index"].dtype == np.int16

    # image tokens per image == the processor's count for that image alone; patch restarts per image
    for record in records:
        t = tokens[tokens.sample_id == record.sample_id].reset_index(drop=True)
        img = t[t.modality == "image"]
        assert (t.loc[t.modality != "image", "image_index"] == -1).all()
        assert img["image_index"].is_monotonic_increasing
        want = [processor_count(adapter, im) for im in record.images]
        got = img.groupby("image_index").size()
        assert got.index.tolist() == list(range(len(record.images))), name
        assert got.tolist() == want, name
        for k, n in enumerate(want):
            assert img.loc[img.image_index == k, "patch"].tolist() == list(range(n))

    # placement: the marker record's word "left" stands between its two images
    first = tokens[tokens.sample_id == records[0].sample_id].reset_index(drop=True)
    left = adapter.tokenizer.convert_tokens_to_ids("left")
    pos = int(first.index[first.token_id == left][0])
    img = first[first.modality == "image"]
    assert img.index[img.image_index == 0].max() < pos < img.index[img.image_index == 1].min()

    # captured states == the model's own hidden_states (its processor's inputs, its own image path)
    _, texts = adapter.texts(records, include_response=True)
    native = adapter.processor(text=texts, images=[im for r in records for im in r.images], padding=True,
                               padding_side="right", return_tensors="pt", **adapter.processor_kwargs())
    _, meta = adapter.build_batch(records, include_response=True)
    assert torch.equal(native["attention_mask"].bool(), torch.from_numpy(meta.attention_mask))
    with torch.inference_mode():
        hs = adapter.model(**native, output_hidden_states=True, use_cache=False).hidden_states
    mask = torch.from_numpy(meta.attention_mask)
    np.testing.assert_allclose(store.read(0), hs[1][mask].numpy(), atol=1e-5, rtol=1e-4, err_msg=name)
    # responses are still the suffix after several images
    resp = meta.is_response[0][meta.attention_mask[0]]
    assert resp.any() and not resp[: int(np.argmax(resp))].any() and resp[int(np.argmax(resp)):].all()


def test_single_image_records_unchanged(family):
    """One image, no marker: image_index 0 and patches as before (0..n-1 over the sample)."""
    _, adapter = family
    records = tiny_records(2, sizes=SIZES)
    _, meta = adapter.build_batch(records, include_response=True)
    img = meta.modality == "image"
    assert (meta.image_index[img] == 0).all() and (meta.image_index[~img] == -1).all()
    for b in range(len(records)):
        assert meta.patch[b][img[b]].tolist() == list(range(int(img[b].sum())))


# -- records and validation -----------------------------------------------------------------------
def _frame(extra: list, question: str = "red square") -> pd.DataFrame:
    return pd.DataFrame({"sample_id": ["s0"], "question": [question], "image": [png((255, 0, 0))],
                         "responses": [["a"]], "preferred": [0], "extra_images": [extra]})


def test_mmsae_records_round_trip_in_order(tmp_path):
    path = tmp_path / "d.parquet"
    colors = [(0, 255, 0), (0, 0, 255)]
    _frame([png(c) for c in colors], f"{IMAGE_MARKER} a {IMAGE_MARKER} b {IMAGE_MARKER}").to_parquet(path)
    df, _ = read_dataset(path, "mmsae")
    df.to_parquet(tmp_path / "s.parquet")
    (record,) = read_records(tmp_path / "s.parquet")
    assert [im.getpixel((0, 0)) for im in record.images] == [(255, 0, 0), *colors]
    assert record.segments() == [0, "a", 1, "b", 2] and record.text == "a b"


@pytest.mark.parametrize(("extra", "question", "field", "message"), [
    ([png((0, 0, 1))], f"{IMAGE_MARKER} red", "question", "1 <image> markers for 2 images"),
    ([png((0, 0, 1))] * 3, "red", "extra_images", "4 images, more than data.max_images_per_sample = 3"),
    ([png((0, 0, 1)), b"not an image"], "red", "extra_images", "image 3: undecodable image"),
    (["a string"], "red", "extra_images", "image 2: expected image bytes, got str"),
])
def test_bad_multi_image_rows(tmp_path, extra, question, field, message):
    path = tmp_path / "d.parquet"
    _frame(extra, question).to_parquet(path)
    with pytest.raises(InputError) as err:
        read_dataset(path, "mmsae", limits=DataParams.load({"max_images_per_sample": 3}))
    line = str(err.value)
    assert "\n" not in line and f"field '{field}'" in line and "sample 's0'" in line and message in line, line


def test_too_many_images_is_a_bad_row_with_skip(tmp_path):
    path = tmp_path / "d.parquet"
    ok, many = _frame([png((0, 0, 1))]), _frame([png((0, 0, 1))] * 20)
    pd.concat([ok, many.assign(sample_id=["s1"])]).to_parquet(path)
    df, bad = read_dataset(path, "mmsae", on_bad_row="skip")  # the default cap: 16
    assert list(df.sample_id) == ["s0"] and bad.to_dict("records") == [
        {"sample_id": "s1", "field": "extra_images", "message": "21 images, more than data.max_images_per_sample = 16"}]


# -- readers --------------------------------------------------------------------------------------
def test_obelics_keeps_every_image_in_place(tmp_path):
    path = tmp_path / "ob.parquet"
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    imgs = [{"bytes": png(c), "path": None} for c in colors]
    pd.DataFrame({"id": ["d0", "d1"],
                  "texts": [[None, "first para", None, "second", None], [None, None, "only text"]],
                  "images": [[imgs[0], None, imgs[1], None, imgs[2]], [imgs[2], imgs[0], None]]}).to_parquet(path)
    df, _ = read_dataset(path, "obelics")
    df.to_parquet(tmp_path / "s.parquet")
    d0, d1 = read_records(tmp_path / "s.parquet")
    assert [im.getpixel((0, 0)) for im in d0.images] == colors
    assert d0.segments() == [0, "first para", 1, "second", 2]
    assert [im.getpixel((0, 0)) for im in d1.images] == [colors[2], colors[0]]
    assert d1.question == "only text" and d1.segments() == [0, 1, "only text"]  # all images lead: no markers


def test_obelics_names_an_unreadable_later_image(tmp_path):
    path = tmp_path / "ob.parquet"
    pd.DataFrame({"id": ["d0"], "texts": [["t", None, None]],
                  "images": [[None, {"bytes": png((1, 1, 1)), "path": None}, {"bytes": None, "path": "../x.png"}]]}
                 ).to_parquet(path)
    with pytest.raises(InputError, match=r"field 'extra_images': sample 'd0': image 2: image path '../x.png'"):
        read_dataset(path, "obelics")


def test_llava_json_image_list_with_markers(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name, c in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0))):
        (root / name).write_bytes(png(c))
    os.symlink("/etc/passwd", root / "out.png")
    items = [{"id": "x", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> with <image> please"}, {"from": "gpt", "value": "same"}]},
        {"id": "y", "image": ["b.png", "a.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is red?"}, {"from": "gpt", "value": "the second"}]}]
    path = tmp_path / "l.json"
    path.write_text(json.dumps(items))
    df, _ = read_dataset(path, "llava_json", image_root=root)
    df.to_parquet(tmp_path / "s.parquet")
    x, y = read_records(tmp_path / "s.parquet")
    assert [im.getpixel((0, 0)) for im in x.images] == [(255, 0, 0), (0, 255, 0)]
    assert x.segments() == ["Compare", 0, "with", 1, "please"]
    assert y.question == "Which is red?" and [im.getpixel((0, 0)) for im in y.images] == [(0, 255, 0), (255, 0, 0)]
    items[0]["image"] = ["a.png", "out.png"]  # the second escapes the root: a bad row naming it
    path.write_text(json.dumps(items))
    with pytest.raises(InputError, match=r"field 'extra_images': sample 'x': image 2: .*outside the image root"):
        read_dataset(path, "llava_json", image_root=root)


def test_sample_stage_keeps_extra_images(tmp_path):
    """records_frame -> the mmsae reader: single-image data sets get no extra_images column at all."""
    frame = records_frame(tiny_records(2))
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    df, _ = read_dataset(path, "mmsae")
    assert "extra_images" not in df.columns


# -- fine-tuning rows -----------------------------------------------------------------------------
def multi_frame() -> pd.DataFrame:
    """multi_records() as a samples.parquet frame (with extra_images)."""
    records = multi_records()
    frame = records_frame(records)
    encoded = []
    for r in records:
        blobs = []
        for im in r.extra_images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            blobs.append(buf.getvalue())
        encoded.append(blobs or None)
    return frame.assign(extra_images=encoded)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_finetune_rows_carry_every_image(family, method):
    """TRL's vision collator over our multi-image rows == build_batch (ids, loss positions)."""
    from mmsae import finetune as ft

    name, adapter = family
    frame = multi_frame().assign(responses=lambda d: [[*r, "blue circle"] for r in d["responses"]])
    ds = ft.build_dataset(frame, adapter.processor, method)
    assert [len(ds[i]["images"]) for i in range(len(ds))] == [2, 3, 1]
    processor = ft.text_completion_processor(adapter.processor, type(adapter))
    result = ft.check_layout(adapter.model, processor, frame, method, 3, name)
    assert result["checked"] == (3 if method == "sft" else 6)
    assert result["identical"], (name, result["mismatches"][:1])


# -- browser --------------------------------------------------------------------------------------
def test_browser_shows_the_image_of_the_top_token(tmp_path):
    """Two images of 2x2 patches per sample: a feature whose top token is on image 2 shows image 2, and its
    heat map takes only image 2's tokens (not the same patch index on image 1)."""
    import pyarrow as pa
    from helpers import tiny_tokenizer

    from mmsae.features import FEATURE_SCHEMA
    from mmsae.interpret.browser import build_site, read_tokens
    from mmsae.interpret.browser.images import VEIL_MAX_ALPHA
    from mmsae.models.grid import Grid
    from mmsae.params import BrowserParams
    from mmsae.sae.encode import CODES_SCHEMA

    tok = tiny_tokenizer()
    img_id, rows = tok.convert_tokens_to_ids("<image>"), []
    for sid in ("a", "b"):
        rows.append((sid, "special", tok.bos_token_id, -1, -1))
        rows += [(sid, "image", img_id, p, 0) for p in range(4)]
        rows.append((sid, "text", tok.convert_tokens_to_ids("red"), -1, -1))
        rows += [(sid, "image", img_id, p, 1) for p in range(4)]
    tokens = pd.DataFrame(rows, columns=["sample_id", "modality", "token_id", "patch", "image_index"])
    tokens.insert(0, "row", np.arange(len(tokens), dtype=np.int64))
    tokens["position"] = tokens.groupby("sample_id").cumcount().astype("int32")
    tokens = tokens.astype({"token_id": "int32", "patch": "int32", "image_index": "int16"}).assign(is_response=False)
    tokens.to_parquet(tmp_path / "tokens.parquet")
    # feature 0: sample a, image 2 patch 2 (row 8) = 2.0 and image 1 patch 1 (row 2) = 0.5; sample b image 1 (row 12)
    entries = [(8, 2.0), (2, 0.5), (12, 1.0)]
    codes = pd.DataFrame({"row": [r for r, _ in entries], "sample_id": tokens["sample_id"].to_numpy()[[8, 2, 12]],
                          "position": tokens["position"].to_numpy()[[8, 2, 12]], "modality": "image",
                          "feature": np.zeros(3, np.int32), "activation": np.array([a for _, a in entries], np.float32)})
    pq.write_table(pa.Table.from_pandas(codes, schema=CODES_SCHEMA, preserve_index=False), tmp_path / "codes.parquet")
    features = pa.Table.from_pylist([{"feature": 0, "n_text": 0, "n_image": 3, "n_special": 0, "top_text_rows": [],
                                      "top_text_acts": [], "top_image_rows": [8, 12, 2], "top_image_acts": [2.0, 1.0, 0.5],
                                      "weight": None, "class": "image-only"}], schema=FEATURE_SCHEMA).to_pandas()
    colours = {"a": [(200, 0, 0), (0, 200, 0)], "b": [(0, 0, 200), (9, 9, 9)]}
    pd.DataFrame({"sample_id": ["a", "b"], "question": ["q a", "q b"], "image": [png(colours[s][0]) for s in "ab"],
                  "responses": [["x"], ["y"]], "preferred": [0, 0],
                  "extra_images": [[png(colours[s][1])] for s in "ab"]}).to_parquet(tmp_path / "samples.parquet")
    params = BrowserParams.load({"n_features": 5, "per_class": 1, "n_images": 4, "image_size": 16})
    out = tmp_path / "site"
    build_site(out, features, tmp_path / "codes.parquet", read_tokens(tmp_path / "tokens.parquet"),
               tmp_path / "samples.parquet", tok, Grid(2, 2), params, layer=0, d_sae=1)
    page = (out / "features" / "0.html").read_text()
    assert '../img/0_1.png' in page and '../img/1.png' in page and "image 2" in page
    assert Image.open(out / "img" / "0_1.png").getpixel((4, 4)) == colours["a"][1]
    assert Image.open(out / "img" / "1.png").getpixel((4, 4)) == colours["b"][0]
    assert not (out / "img" / "0.png").exists()  # sample a's first image is not its top image
    alpha = np.asarray(Image.open(out / "heat" / "0_0.png"))[..., 3]
    assert alpha[1, 0] == 0  # patch 2 of image 2: the top activation, no veil
    assert alpha[0, 1] == VEIL_MAX_ALPHA  # patch 1 fired on image 1 only: not drawn over image 2


# -- sample -> extract stages ---------------------------------------------------------------------
def test_obelics_through_sample_and_extract_stages(tmp_path):
    """An interleaved data set through the sample and extract stages (tiny LLaVA-NeXT): every image of
    every document reaches tokens.parquet, in order, with its processor count."""
    from helpers import tiny_llava_next

    from mmsae.activations import stage as extract_stage
    from mmsae.data import sample as sample_stage
    from mmsae.params import ExtractParams, SampleParams

    records = tiny_records(5, sizes=SIZES)
    blobs = [{"bytes": records_frame([r])["image"][0], "path": None} for r in records]
    docs = pd.DataFrame({"id": ["d0", "d1"],
                         "texts": [[None, "red square", None, "blue circle"], ["left", None, None]],
                         "images": [[blobs[0], None, blobs[1], None], [None, blobs[2], blobs[3]]]})
    docs.to_parquet(tmp_path / "ob.parquet")
    sample_dir, extract_dir = tmp_path / "sample", tmp_path / "extract"
    sample_stage.run(sample_stage.Inputs(data=tmp_path / "ob.parquet",
                                         data_params=DataParams.load({"format": "obelics"})),
                     SampleParams.load({}), sample_dir)
    model = tiny_llava_next(tmp_path)
    extract_stage.run(extract_stage.Inputs(samples=sample_dir, model=str(model)),
                      ExtractParams.load({"layers": [0], "batch_size": 2, "include_response": False}), extract_dir)
    tokens = pq.read_table(extract_dir / Files.TOKENS).to_pandas()
    samples = read_records(sample_dir / Files.SAMPLES)
    assert [len(r.images) for r in samples] == [2, 2]
    assert samples[0].segments() == [0, "red square", 1, "blue circle"] and samples[1].segments() == ["left", 0, 1]
    adapter = load_model(model)
    for record, order in zip(samples, ([0, 1], [2, 3]), strict=True):
        assert [np.asarray(im).tolist() for im in record.images] == [np.asarray(records[i].image).tolist() for i in order]
        img = tokens[(tokens.sample_id == record.sample_id) & (tokens.modality == "image")]
        want = [processor_count(adapter, records[i].image) for i in order]
        assert img.groupby("image_index").size().tolist() == want


def test_processor_without_per_image_counts():
    """A processor that cannot count tokens per image: one image per sample works, several stop clearly."""
    class Uncounted(LlavaAdapter):
        def image_token_counts(self, images):
            return None if images else []

    adapter = Uncounted(*build_tiny_llava(), "uncounted")
    single = tiny_records(1)
    _, meta = adapter.build_batch(single, include_response=True)
    img = meta.modality == "image"
    assert meta.patch[img].tolist() == list(range(int(img.sum()))) and (meta.image_index[img] == 0).all()
    with pytest.raises(InputError, match=r"field 'extra_images': sample .*image-token counts per image"):
        adapter.build_batch(multi_records()[:1], include_response=True)
