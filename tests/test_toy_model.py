"""The toy model stage: tokenizer/processor, prompt layout, alignment loss, a tiny end-to-end run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmsae import cli
from mmsae.data import toyvocab, toyworld
from mmsae.models import toy
from mmsae.models.prompts import format_prompt, format_response
from mmsae.params import ToyModelParams

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 16, "num_layers": 1, "vision_layers": 1, "batch_size": 8, "steps_text": 3,
        "steps_vision": 3, "steps_joint": 2, "eval_samples": 8, "seed": 3}


@pytest.fixture(scope="module")
def world():
    return toyworld.generate(seed=0, n_samples=10, corruption_rate=0.0, corruption_kinds=[], n_train=40, n_heldout=12)


@pytest.fixture(scope="module")
def processor():
    return toy.build_processor()


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_chat_template_layout(processor):
    assert format_prompt(processor, "what color is the circle ?", True) == "<s> <image> what color is the circle ? answer :"
    assert format_prompt(processor, "is red a color or a shape ?", False) == "<s> is red a color or a shape ? answer :"
    assert format_response(processor, "red square") == " red square </s>"
    tok = processor.tokenizer
    ids = tok("<s> is red a color or a shape ? answer : color </s>", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    for word in toyvocab.VOCAB_WORDS:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "is red a color or a shape ? answer : color"


def test_image_token_count(processor, world):
    row = world["heldout"].iloc[0]
    prompt = format_prompt(processor, row["question"], True)
    inputs = processor(text=[prompt], images=[_image(row["image"])], return_tensors="pt")
    n_image = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert n_image == toy.N_IMAGE_TOKENS == 16
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    # the training path (expanded by hand, images normalised in torch) sees exactly the same inputs
    ids = processor.tokenizer(toy.expand_image_tokens(processor, prompt), add_special_tokens=False)["input_ids"]
    assert ids == inputs["input_ids"][0].tolist()
    pixels = toy.normalize_images(toy.decode_images([row["image"]]), processor)
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=1e-5, rtol=0)
    # and the model's image features fill exactly those positions
    model = toy.build_model(ToyModelParams.load(TINY), len(processor.tokenizer), processor.image_token_id)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert feats[0].shape[0] == n_image


def _pooled(out) -> torch.Tensor:
    """get_image_features' result across transformers 5.x: a tensor, or an output whose pooler_output is
    a tensor or a list of per-image tensors."""
    out = out if torch.is_tensor(out) else out.pooler_output
    return out if torch.is_tensor(out) else torch.stack(list(out))


def test_image_features_equal_the_models_own_and_fill_the_image_slots(processor, world):
    """The training path (vision tower + projector called directly, slots filled by hand) computes
    exactly what the model's forward does with pixel_values: same image features, same logits."""
    rows = world["heldout"].iloc[:3]
    inputs = toy.model_inputs(processor, list(rows["question"]), list(rows["image"]))
    model = toy.build_model(ToyModelParams.load(TINY), len(processor.tokenizer), processor.image_token_id).eval()
    with torch.no_grad():
        ours = toy.image_features(model, inputs["pixel_values"])
        theirs = _pooled(model.model.get_image_features(pixel_values=inputs["pixel_values"]))
        assert ours.shape == (3, toy.N_IMAGE_TOKENS, TINY["hidden_size"])
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=0, rtol=0)
        embeds = toy.image_embeds(model, inputs["input_ids"], ours)
        by_hand = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        native = model(**inputs).logits
    torch.testing.assert_close(by_hand, native, atol=1e-6, rtol=0)
    # the slots hold the features, everything else the token embeddings
    slots = inputs["input_ids"] == processor.image_token_id
    torch.testing.assert_close(embeds[slots], ours.reshape(-1, ours.shape[-1]), atol=0, rtol=0)


def test_processor_round_trip(tmp_path, processor, world):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlavaProcessor"
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.image_token_id == processor.image_token_id
    rows = world["heldout"].iloc[:3]
    a = toy.model_inputs(processor, list(rows["question"]), list(rows["image"]))
    b = toy.model_inputs(loaded, list(rows["question"]), list(rows["image"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_alignment_loss_hand_built():
    torch.manual_seed(0)
    emb = torch.randn(10, 8)
    concepts = torch.full((2, 4, 2), -1)
    concepts[0, 1] = torch.tensor([3, 5])
    concepts[1, 2] = torch.tensor([4, 6])
    feats = torch.randn(2, 4, 8)  # patches without concepts are ignored
    feats[0, 1] = 2.5 * (emb[3] + emb[5])  # scale does not matter (cosine)
    feats[1, 2] = emb[4] + emb[6]
    assert float(toy.alignment_loss(feats, concepts, emb)) == pytest.approx(0.0, abs=1e-6)
    feats[1, 2] = -(emb[4] + emb[6])
    assert float(toy.alignment_loss(feats, concepts, emb)) == pytest.approx(1.0, abs=1e-6)  # mean of 0 and 2
    assert float(toy.alignment_loss(feats, torch.full((2, 4, 2), -1), emb)) == 0.0


def test_patch_rendering_embeds(processor, world):
    df = world["train"].iloc[:3].reset_index(drop=True)
    ids, _ = toy.image_rendering(df, processor)
    concepts = toy.patch_targets(df, processor.tokenizer)
    embed = torch.nn.Embedding(len(processor.tokenizer), 8)
    out = toy.patch_rendering_embeds(embed, ids, concepts, processor.image_token_id)
    plain = embed(ids)
    slots = ids == processor.image_token_id
    torch.testing.assert_close(out[~slots], plain[~slots])  # text positions untouched
    for i in range(3):
        at = slots[i].nonzero().flatten()
        for j in range(16):
            c = concepts[i, j][concepts[i, j] >= 0]
            want = embed.weight[c].sum(0) if len(c) else embed.weight[processor.image_token_id]
            torch.testing.assert_close(out[i, at[j]], want)


def test_patch_targets_follow_the_boxes(processor, world):
    df = world["train"].iloc[:5]
    targets = toy.patch_targets(df, processor.tokenizer)
    assert targets.shape == (5, 16, 4)
    for i, objects in enumerate(df["objects"]):
        for j, concepts in enumerate(toyworld.patch_concepts(objects, 4)):
            got = {processor.tokenizer.convert_ids_to_tokens(int(t)) for t in targets[i, j] if t >= 0}
            assert got == concepts


def test_text_rendering_masks_prompt(processor, world):
    df = world["train"]
    ids, labels = toy.text_rendering(df, processor)
    tok = processor.tokenizer
    for k in range(len(df)):
        row = df.iloc[k]
        answer = row["responses"][row["preferred"]]
        target = [int(t) for t in labels[k] if t >= 0]
        assert tok.decode(target) == f"{answer} </s>"
        assert processor.image_token_id not in ids[k].tolist()  # the caption words stand in for the image
    img_ids, img_labels = toy.image_rendering(df, processor)
    assert ((img_ids == processor.image_token_id).sum(1) == 16).all()
    assert torch.equal((img_labels >= 0).sum(1), (labels >= 0).sum(1))


def test_tiny_run_end_to_end(tmp_path, world):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    toy_dir = tmp_path / "toyworld"
    toy_dir.mkdir()
    for split in ("train", "heldout"):
        world[split].to_parquet(toy_dir / f"{split}.parquet")
    out = tmp_path / "toy_model"
    rc = cli.stage_main(toy, ["--toyworld", str(toy_dir), "--out", str(out), "--params", json.dumps(TINY)])
    assert rc == 0

    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "toy_model" and manifest["params"]["steps_text"] == 3
    assert manifest["counts"]["train"] == 40
    assert metrics["n_eval"] == 8 and 0.0 <= metrics["exact_match"] <= 1.0
    assert set(metrics["exact_match_by_task"]) <= {"caption", *toyworld.QA_TASKS}
    assert metrics["reload_max_logit_diff"] == 0.0
    for key in ("text_lm", "vision_lm", "vision_align", "joint_lm", "joint_align"):
        assert key in metrics
    assert (out / "model" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".toy_model.tmp-*"))

    # the reloaded model equals a fresh in-memory run with the same params (training is deterministic)
    model, processor, _ = toy.fit_toy_model(world["train"], ToyModelParams.load(TINY))
    reloaded = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    reproc = AutoProcessor.from_pretrained(out / "model")
    rows = world["heldout"].iloc[:6]
    inputs = toy.model_inputs(reproc, list(rows["question"]), list(rows["image"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits, atol=0, rtol=0)
    answers = toy.generate_answers(reloaded, reproc, list(rows["question"]), list(rows["image"]))
    assert len(answers) == 6


def test_script_help_and_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.stage_main(toy, ["--help"])
    assert exc.value.code == 0
    assert "--toyworld" in capsys.readouterr().out
    assert cli.stage_main(toy, ["--toyworld", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "train.parquet" in capsys.readouterr().err
