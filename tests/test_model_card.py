"""The model card (README.md) of every SAE folder: its YAML parses, has the fields, and quotes hostile names."""

from __future__ import annotations

import json

import yaml
from test_sae import synthetic_store, tiny_params

from mmsae.artifacts import write_manifest
from mmsae.sae import train
from mmsae.sae.card import card_metadata, read_card, render_card, training_data

HOSTILE = 'evil"\n---\nlibrary_name: pwned\n# ends here: {x}\u2028'


def test_train_sae_writes_a_parsable_card(tmp_path):
    ext = synthetic_store(tmp_path / "extract-0123abcd", n_samples=30)
    # a sample folder whose data source is hostile, the way a user's path may be
    sample = tmp_path / "sample-4567ef01"
    sample.mkdir()
    write_manifest(sample, "sample", {"data": {"source": HOSTILE, "format": "mmsae"}}, {"data": HOSTILE})
    write_manifest(ext, "extract", {}, {"samples": str(sample), "model": HOSTILE}, {"extraction_key": "k1"})
    inputs = train.Inputs(extract=ext, checkpoints=tmp_path / "ck")
    train.run(inputs, tiny_params(modality_mix="balanced"), tmp_path / "train_sae-89abcdef")
    card = tmp_path / "train_sae-89abcdef" / "sae" / "README.md"
    meta = read_card(card)
    metrics = json.loads((tmp_path / "train_sae-89abcdef" / "metrics.json").read_text())
    assert meta["library_name"] == "saelens" and "sae_lens" in meta["tags"]
    assert meta["base_model"] == HOSTILE  # quoted: one string, no extra key
    assert (meta["hook_name"], meta["hook_layer"]) == ("blocks.0.hook_resid_post", 0)
    assert (meta["architecture"], meta["mmsae_architecture"]) == ("standard", "relu")
    assert (meta["d_in"], meta["d_sae"]) == (metrics["d_in"], metrics["d_sae"])
    assert meta["l1_coefficient"] == 1e-3 and meta["modality_mix"] == "balanced"
    assert meta["training_tokens"] == metrics["tokens_seen"]
    td = meta["training_data"]
    assert td["source"] == HOSTILE and td["extract"] == "extract-0123abcd" and td["sample"] == "sample-4567ef01"
    assert td["extraction_key"] == "k1" and td["sample_hash"] == "4567ef01"
    m = meta["metrics"]
    assert m["fvu_image"] == metrics["eval"]["image"]["centred_fvu"]
    assert m["fvu_text"] == metrics["eval"]["text"]["centred_fvu"]
    assert m["l0"] == metrics["l0"] and m["dead_fraction"] == metrics["dead_fraction"]
    text = card.read_text()
    assert "pwned" not in yaml.safe_load(text.split("\n---\n")[0][4:]).get("library_name", "")
    assert text.count("\n---\n") == 1  # the hostile '---' did not end the front matter early
    assert "SAE.load_from_disk" in text and "mmsae.sae.io import load_sae" in text


def test_card_without_manifests_and_for_topk(tmp_path):
    assert training_data(tmp_path / "extract-00000000") == {"extract": "extract-00000000"}
    cfg = {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2, "metadata": {"model_name": "m: {a}", "hook_layer": 1}}
    meta = yaml.safe_load(render_card(card_metadata(cfg, {"eval": {}}, {})).split("\n---\n")[0][4:])
    assert meta["k"] == 2 and "l1_coefficient" not in meta and meta["base_model"] == "m: {a}"
