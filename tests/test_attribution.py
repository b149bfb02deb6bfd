"""Attribution (mmsae.interpret.attribution): exact where the metric is linear in the latents, predictive elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import build_tiny_llava, records_frame, tiny_llava, tiny_records
from test_steering import D_SAE, make_sae, prompt_batch

from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.interpret.attribute import main
from mmsae.interpret.attribution import ablate, answer_token, answers_of, attribute
from mmsae.interpret.steering import Clamp, position_mask
from mmsae.models.adapters import LlavaAdapter
from mmsae.sae.io import save_sae


@pytest.fixture(scope="module")
def adapter():
    model, processor = build_tiny_llava(layers=2, seed=0)
    return LlavaAdapter(model.eval(), processor)


@pytest.fixture(scope="module")
def linear_adapter():
    """The final norm removed: after the last decoder layer the logits are a linear map of the residual."""
    model, processor = build_tiny_llava(layers=2, seed=0)
    model.model.language_model.norm = torch.nn.Identity()
    with torch.no_grad():  # logits of order 1 (the random head's are ~0.05), so effects are well above rounding
        model.get_output_embeddings().weight.mul_(50.0)
    return LlavaAdapter(model.eval(), processor)


def test_answer_tokens_and_default_answers(adapter):
    record = tiny_records(1)[0]
    prompt = adapter.prompt(record)
    vocab = adapter.tokenizer.get_vocab()
    assert answer_token(adapter, prompt, "red") == vocab["red"]
    assert answer_token(adapter, prompt, " blue circle ") == vocab["blue"]
    assert answers_of(Record("s", "q", None, ["red", "blue", "green"], 1), None, None) == ("blue", "red")
    assert answers_of(Record("s", "q", None, ["red", "blue"], 0), None, "green") == ("red", "green")
    with pytest.raises(InputError, match="no response"):
        answers_of(Record("s", "q", None, [], -1), None, None)
    with pytest.raises(InputError, match="same token"):
        attribute(adapter, make_sae(), record, "red circle", "red square")


def test_linear_metric_attribution_equals_the_exact_ablation_effect(linear_adapter):
    """SAE after the last layer, no final norm: m = (W_U[A] - W_U[B]) . h_last is linear in the latents,
    so activation x gradient is the exact effect of zeroing a latent (error term kept)."""
    sae = make_sae(layer=1)
    record = tiny_records(1)[0]
    res = attribute(linear_adapter, sae, record, "red", "blue", top_k=D_SAE * 40, verify=16)
    last = int(res.tokens["position"].max())
    pairs = res.pairs
    verified = pairs.dropna(subset=["ablation_effect"])
    at_last = verified[verified["position"] == last]  # the latents firing at the answer position
    assert len(verified) == 16 and len(at_last) >= 8
    assert float(at_last["attribution"].abs().min()) > 1e-3  # real, non-trivial effects
    np.testing.assert_allclose(verified["ablation_effect"], verified["attribution"], rtol=1e-3, atol=1e-5)
    # only the answer position reaches the metric: everything earlier attributes exactly 0
    assert (pairs.loc[pairs["position"] != last, "attribution"] == 0).all()
    # per token: features + error = (h - b_dec / factor) . dm/dh, and the gradient is W_U[A] - W_U[B]
    inputs, meta = prompt_batch(linear_adapter, record)
    with torch.no_grad():
        h = linear_adapter.model.model(**inputs).last_hidden_state[0, -1]
    w_u = linear_adapter.model.get_output_embeddings().weight
    g = (w_u[res.token_a] - w_u[res.token_b]).detach()
    assert res.metric == pytest.approx(float(h @ g), rel=1e-4)
    factor = float(np.sqrt(32) / h.norm())
    row = res.tokens.iloc[-1]
    assert row["attr_total"] == pytest.approx(float((h - sae.b_dec.detach() / factor) @ g), rel=1e-3, abs=1e-6)
    # and the whole answer-position activation zeroed (every latent; the error term too by hand)
    mask = torch.zeros(1, last + 1, dtype=torch.bool)
    mask[0, last] = True
    zeroed = ablate(linear_adapter, sae, inputs, mask, [Clamp(f, 0.0) for f in range(D_SAE)], res.token_a, res.token_b)
    assert res.metric - zeroed == pytest.approx(float(row["attr_features"]), rel=2e-3, abs=1e-6)


def test_attribution_predicts_ablations_on_a_nonlinear_model(adapter):
    """SAE at layer 0 of 2: the metric is not linear in the latents; activation x gradient must still
    predict single-latent ablations closely, and zeroing every latent of one token in sign and trend."""
    sae = make_sae(layer=0)
    singles, tokens, groups = [], [], []
    for record in tiny_records(3):
        res = attribute(adapter, sae, record, "red", "blue", top_k=40, verify=15)
        singles.append(res.pairs.dropna(subset=["ablation_effect"]))
        inputs, meta = prompt_batch(adapter, record)
        everything = [Clamp(f, 0.0) for f in range(D_SAE)]
        t = res.tokens[res.tokens["attributed"]]
        for p, predicted in zip(t["position"], t["attr_features"], strict=True):
            one = torch.zeros(meta.attention_mask.shape, dtype=torch.bool)
            one[0, p] = True
            tokens.append((predicted, res.metric - ablate(adapter, sae, inputs, one, everything, res.token_a, res.token_b)))
        for modality in ("image", "text"):
            zeroed = ablate(adapter, sae, inputs, position_mask(meta, modality), everything, res.token_a, res.token_b)
            groups.append((float(t.loc[t["modality"] == modality, "attr_features"].sum()), res.metric - zeroed))
    single = pd.concat(singles)
    assert len(single) == 45
    assert np.corrcoef(single["attribution"], single["ablation_effect"])[0, 1] > 0.95
    big = single[single["ablation_effect"].abs() > 0.2 * single["ablation_effect"].abs().max()]
    assert len(big) >= 5 and (np.sign(big["attribution"]) == np.sign(big["ablation_effect"])).all()
    pred, actual = np.array(tokens).T
    assert len(pred) > 60 and np.corrcoef(pred, actual)[0, 1] > 0.95
    big = np.abs(actual) > 0.2 * np.abs(actual).max()
    assert big.sum() >= 3 and (np.sign(pred[big]) == np.sign(actual[big])).all()
    # a whole modality zeroed is far from linear (image: under-predicted), yet the trend holds
    pred, actual = np.array(groups).T
    assert np.corrcoef(pred, actual)[0, 1] > 0.8


def test_cli_writes_pairs_tokens_and_plots(tmp_path, capsys):
    model_dir = tiny_llava(tmp_path)
    sae_dir = save_sae(make_sae(layer=0), tmp_path / "sae")
    samples = tmp_path / "samples"
    samples.mkdir()
    records = tiny_records(2)
    records_frame(records).to_parquet(samples / "samples.parquet")
    out = tmp_path / "attr"
    params = json.dumps({"task": None, "n_samples": 2, "top_k": 20, "verify": 5})
    rc = main(["--model", str(model_dir), "--sae", str(sae_dir), "--samples", str(samples), "--out", str(out),
               "--params", params])
    assert rc == 0
    pairs = pd.read_parquet(out / "attribution.parquet")
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(pairs) == 40 and pairs.groupby("sample_id")["ablation_effect"].count().tolist() == [5, 5]
    assert (pairs.groupby("sample_id")["rank"].min() == 1).all()
    assert {"token", "modality", "patch", "activation", "gradient"} <= set(pairs.columns)
    assert set(tokens["sample_id"]) == {r.sample_id for r in records} and (tokens["modality"] == "image").sum() == 32
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["n_verified"] == 10 and manifest["counts"]["verify_corr"] > 0.9
    assert "logit(" in capsys.readouterr().out
    rc = main(["--model", str(model_dir), "--sae", str(sae_dir), "--image", str(tmp_path / "none.png"),
               "--question", "q", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "field 'image'" in err[-1]
