"""Model adapters: loading, per-token marks, the response loss."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    build_tiny_chameleon,
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_qwen2_vl,
    records_frame,
    tiny_chameleon,
    tiny_llama,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
    tiny_records,
    tiny_tokenizer,
)

from mmsae import cli
from mmsae.data import Record
from mmsae.errors import InputError
from mmsae.models import (
    CausalLMAdapter,
    ChameleonAdapter,
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    format_prompt,
    load_model,
    loss,
    resolve_dtype,
)
from mmsae.models.loss import response_loss

SIZES = [(32, 32), (16, 32), (40, 20)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load_model(tiny_llava(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    return load_model(tiny_chameleon(tmp_path_factory.mktemp("chameleon")))


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return load_model(tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(tiny_llama(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return load_model(tiny_llava_next(tmp_path_factory.mktemp("llava_next")))


def test_load_model_round_trip(tmp_path):
    path = tiny_llava(tmp_path)
    adapter = load_model(path)
    assert isinstance(adapter, LlavaAdapter) and adapter.family == "llava"
    assert not adapter.model.training and adapter.dtype == torch.float32 and adapter.device.type == "cpu"
    assert adapter.d_model == 32 and adapter.n_layers == 2
    assert adapter.decoder_layers() is adapter.model.model.language_model.layers
    assert adapter.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert adapter.image_grid() == {"rows": 4, "cols": 4, "first": 0}
    original, _ = build_tiny_llava()  # same seed: the weights that were saved
    want, got = original.state_dict(), adapter.model.state_dict()
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:
        assert torch.equal(want[k], got[k]), k
    bf16 = load_model(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert isinstance(load_model(tiny_llava_next(tmp_path)), LlavaNextAdapter)


NEW_FAMILIES = {  # name: (saved builder, in-memory builder, adapter class, decoder layers path, image grid)
    "chameleon": (tiny_chameleon, build_tiny_chameleon, ChameleonAdapter, "model.layers",
                  {"rows": 4, "cols": 4, "first": 0}),
    "qwen2_vl": (tiny_qwen2_vl, build_tiny_qwen2_vl, Qwen2VLAdapter, "model.language_model.layers", None),
    "llama": (tiny_llama, build_tiny_llama, CausalLMAdapter, "model.layers", None),
}


@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
def test_load_model_new_families(name, tmp_path):
    saved, build, cls, layers_path, grid = NEW_FAMILIES[name]
    adapter = load_model(saved(tmp_path))
    assert type(adapter) is cls and adapter.family == cls.family
    assert not adapter.model.training and adapter.dtype == torch.float32
    assert adapter.d_model == 32 and adapter.n_layers == 2
    inner = adapter.model.model
    want_layers = inner.layers if layers_path == "model.layers" else inner.language_model.layers
    assert adapter.decoder_layers() is want_layers
    assert adapter.image_grid() == grid
    original, _ = build()  # same seed: the weights that were saved
    want, got = original.state_dict(), adapter.model.state_dict()
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_load_model_other_text_llms(model_type, tmp_path):
    """Mistral / Qwen2 base LLMs load into the text-only adapter (hook on model.model.layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    adapter = load_model(tmp_path)
    assert isinstance(adapter, CausalLMAdapter) and adapter.n_layers == 1
    assert adapter.decoder_layers() is adapter.model.model.layers
    inputs, meta = adapter.build_batch(tiny_records(2), include_response=True)
    assert adapter.final_hidden(inputs).shape == (*meta.attention_mask.shape, 16)


def test_load_model_errors(tmp_path):
    with pytest.raises(InputError, match="model.path"):
        load_model(tmp_path / "missing")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="unsupported model_type 'bert'"):
        load_model(tmp_path / "bert")
    (tmp_path / "llama").mkdir()  # a supported type, no weights
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="cannot load the model weights"):
        load_model(tmp_path / "llama")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(InputError, match="model.dtype"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False, None])
def test_half_precision_on_a_cpu_without_native_units_is_logged(tmp_path, monkeypatch, caplog, native):
    import mmsae.models as M

    def support():
        if native is None:
            raise RuntimeError("no oneDNN")
        return native

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", support, raising=False)
    cpu = torch.device("cpu")
    assert M.cpu_dtype_warning(torch.float32, cpu) is None
    assert M.cpu_dtype_warning(torch.bfloat16, torch.device("cuda")) is None
    line = M.cpu_dtype_warning(torch.bfloat16, cpu)
    if native:
        assert line is None
    else:
        assert "model.dtype bfloat16 on the CPU" in line and "\n" not in line
        assert ("no native bfloat16" if native is False else "cannot tell") in line
    with caplog.at_level("WARNING", logger="mmsae.models"):
        load_model(tiny_llava(tmp_path), dtype="bfloat16", device="cpu")
    assert any("bfloat16 on the CPU" in r.getMessage() for r in caplog.records) == (not native)


def test_modality_marks(llava):
    records = tiny_records(2)
    no_image = Record("noimg", records[0].question, None, ["red square"], 0)
    batch = [records[0], no_image, records[1]]
    tok = tiny_tokenizer()
    llava.tokenizer.padding_side = "left"  # a checkpoint's setting; build_batch right-pads regardless
    _, meta = llava.build_batch(batch, include_response=True)
    frame = meta.tokens_frame()
    for sid, record in zip(meta.sample_ids, batch, strict=True):
        t = frame[frame.sample_id == sid].reset_index(drop=True)
        assert t["position"].tolist() == list(range(len(t)))
        assert t["modality"].iloc[0] == "special" and t["token_id"].iloc[0] == tok.bos_token_id
        assert t["modality"].iloc[-1] == "special" and t["token_id"].iloc[-1] == tok.eos_token_id
        n_img = 16 if record.image is not None else 0
        img = t[t.modality == "image"]
        assert len(img) == n_img and img["patch"].tolist() == list(range(n_img))
        resp = t[t.is_response]
        assert tok.convert_ids_to_tokens(resp["token_id"].tolist()) == [*record.preferred_response.split(), "</s>"]
        assert resp.index[0] == len(t) - len(resp)  # response is the suffix
        prompt = t[~t.is_response]
        assert tok.convert_ids_to_tokens(prompt[prompt.modality == "text"]["token_id"].tolist()) == (
            format_prompt(llava.processor, record.question, has_image=False).split()
        )
    # padding: rows shorter than the longest are right-padded and marked in the attention mask
    lengths = meta.attention_mask.sum(1)
    assert lengths.tolist() == frame.groupby("sample_id", sort=False).size().tolist()
    assert (meta.token_id[~meta.attention_mask] == tok.pad_token_id).all()
    _, prompt_only = llava.build_batch(batch, include_response=False)
    assert not prompt_only.is_response.any()
    assert (prompt_only.attention_mask.sum(1) == lengths - meta.is_response.sum(1)).all()


@pytest.mark.parametrize("which", ["chameleon", "qwen2_vl", "llama"])
def test_modality_marks_new_families(which, request):
    """A batch mixing image and no-image records: image tokens, sentinels, response suffix, prompt tokens."""
    adapter = request.getfixturevalue(which)
    tok = adapter.tokenizer
    records = tiny_records(2, sizes=SIZES)
    no_image = Record("noimg", records[0].question, None, ["red square"], 0)
    batch = [records[0], no_image, records[1]]
    inputs, meta = adapter.build_batch(batch, include_response=True)
    n_expected = {"chameleon": [16, 0, 16], "qwen2_vl": [16, 0, 8], "llama": [0, 0, 0]}[which]
    assert meta.n_image_tokens.tolist() == n_expected
    # what one image placeholder of the prompt leaves behind besides the image tokens
    sentinels = {"chameleon": ["<racm3:break>", "<eoss>"], "qwen2_vl": [], "llama": []}[which]
    frame = meta.tokens_frame()
    for sid, record, n_img in zip(meta.sample_ids, batch, n_expected, strict=True):
        t = frame[frame.sample_id == sid].reset_index(drop=True)
        assert t["position"].tolist() == list(range(len(t)))
        img = t[t.modality == "image"]
        assert img["patch"].tolist() == list(range(n_img))
        assert (np.diff(img.index) == 1).all()  # one contiguous block
        resp = t[t.is_response]
        assert tok.convert_ids_to_tokens(resp["token_id"].tolist()) == [*record.preferred_response.split(), tok.eos_token]
        assert resp.index[0] == len(t) - len(resp)  # response is the suffix
        assert (resp["modality"].iloc[:-1] == "text").all() and resp["modality"].iloc[-1] == "special"
        if which == "llama":  # the image is ignored: the text model's chat template over the question
            prompt = tok.apply_chat_template([{"role": "user", "content": record.question}],
                                             add_generation_prompt=True, tokenize=False)
        else:
            prompt = format_prompt(adapter.processor, record.question, has_image=record.image is not None)
        want = []  # the prompt's tokens with each image placeholder replaced by its sentinels
        for i in tok(prompt)["input_ids"]:
            want.extend(sentinels if i == adapter.image_token_id else tok.convert_ids_to_tokens([i]))
        got = t[(t.modality != "image") & ~t.is_response]
        assert tok.convert_ids_to_tokens(got["token_id"].tolist()) == want
        if n_img and which == "chameleon":
            assert tok.convert_ids_to_tokens(t["token_id"][[img.index[0] - 1, img.index[-1] + 1]].tolist()) == sentinels
        if n_img:  # begin / end of image are special
            assert t.loc[img.index[0] - 1, "modality"] == t.loc[img.index[-1] + 1, "modality"] == "special"
    if which == "chameleon":  # VQ codes replace the placeholders; no pixels left for the model
        assert "pixel_values" not in inputs and not (inputs["input_ids"] == adapter.image_token_id).any()
        image_ids = set(meta.token_id[meta.modality == "image"].tolist())
        assert image_ids <= set(adapter.model.model.vocabulary_mapping.image_tokens)
    if which == "qwen2_vl":
        assert inputs["image_grid_thw"].shape == (2, 3) and inputs["mm_token_type_ids"].shape == meta.token_id.shape
    if which == "llama":
        assert set(frame["modality"]) == {"text", "special"}
        assert (frame["token_id"] != tok.convert_tokens_to_ids("<image>")).all()


def test_text_llm_prompt_without_chat_template_and_bos(llama):
    """No chat template: the plain question + response; a template that writes BOS gets no second BOS."""
    tok = llama.tokenizer
    template = tok.chat_template
    record = tiny_records(1)[0]
    words = [*record.question.split(), *record.preferred_response.split(), "</s>"]
    try:
        tok.chat_template = None
        assert llama.prompt(record) == record.question
        _, meta = llama.build_batch([record], include_response=True)
        ids = meta.token_id[0][meta.attention_mask[0]].tolist()
        assert tok.convert_ids_to_tokens(ids) == ["<s>", *words]
        assert meta.is_response[0].sum() == len(record.preferred_response.split()) + 1
        tok.chat_template = "<s> " + template
        _, meta = llama.build_batch([record], include_response=True)
        got = tok.convert_ids_to_tokens(meta.token_id[0][meta.attention_mask[0]].tolist())
        assert got[:2] == ["<s>", "USER:"] and got.count("<s>") == 1
        assert meta.is_response[0].sum() == len(record.preferred_response.split()) + 1
    finally:
        tok.chat_template = template


def _manual_loss(adapter, record):
    """Mean CE of the response tokens from the model's full logits (its own forward: Chameleon's VQ path
    and image-logit mask included), one sample, prompt length from the prompt alone."""
    eos = adapter.tokenizer.eos_token
    if isinstance(adapter, CausalLMAdapter):  # text only: chat template over the question, image ignored
        prompt = adapter.tokenizer.apply_chat_template([{"role": "user", "content": record.question}],
                                                       add_generation_prompt=True, tokenize=False)

        def encode(text):
            return adapter.tokenizer([text], return_tensors="pt")
    else:
        prompt = format_prompt(adapter.processor, record.question, has_image=True)

        def encode(text):
            return adapter.processor(text=[text], images=[record.image], return_tensors="pt",
                                     **adapter.processor_kwargs())
    full = prompt + f" {record.preferred_response} {eos}"
    p_ids = encode(prompt)["input_ids"]
    enc = encode(full)
    with torch.no_grad():
        logits = adapter.model(**enc).logits[0]
    ids = enc["input_ids"][0]
    start = p_ids.shape[1]
    assert torch.equal(ids[:start], p_ids[0])
    nll = F.cross_entropy(logits[start - 1 : -1], ids[start:], reduction="none")
    return nll.mean().item(), len(ids) - start


@pytest.mark.parametrize("which", ["llava", "llava_next", "chameleon", "qwen2_vl", "llama"])
def test_response_loss_matches_manual_cross_entropy(which, request):
    adapter = request.getfixturevalue(which)
    records = tiny_records(3, sizes=SIZES)
    df = response_loss(adapter, records, batch_size=2, progress=False)
    assert list(df.columns) == ["sample_id", "loss", "n_tokens"]
    assert df["sample_id"].tolist() == [r.sample_id for r in records]
    for record, row in zip(records, df.itertuples(), strict=True):
        want, n = _manual_loss(adapter, record)
        assert row.n_tokens == n == len(record.preferred_response.split()) + 1
        assert row.loss == pytest.approx(want, abs=1e-5)
    # a near-uniform random model: loss close to log(vocab)
    assert np.all(np.abs(df["loss"] - np.log(adapter.text_config.vocab_size)) < 1.5)
    one = response_loss(adapter, records, batch_size=1, progress=False)
    np.testing.assert_allclose(one["loss"], df["loss"], atol=1e-5)


def test_model_loss_script(tmp_path):
    samples = tmp_path / "sample-x"
    samples.mkdir()
    records = tiny_records(3)
    records_frame(records).to_parquet(samples / "samples.parquet")
    out = tmp_path / "model_loss-x"
    rc = cli.stage_main(loss, ["--samples", str(samples), "--model", str(tiny_llava(tmp_path)), "--out", str(out),
                               "--params", '{"batch_size": 2}'])
    assert rc == 0
    df = pd.read_parquet(out / "loss.parquet")
    assert df["sample_id"].tolist() == [r.sample_id for r in records]
    assert (df["n_tokens"] > 1).all() and np.isfinite(df["loss"]).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "model_loss" and manifest["counts"]["n_samples"] == 3
    assert manifest["params"]["batch_size"] == 2 and manifest["params"]["model"]["dtype"] == "auto"
