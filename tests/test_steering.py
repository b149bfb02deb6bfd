"""Feature steering (mmsae.interpret.steering): exact hidden-state changes, error term kept, generation before/after."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    build_tiny_chameleon,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen2_vl,
    records_frame,
    tiny_llava,
    tiny_records,
)

from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.interpret.common import select_records
from mmsae.interpret.steer import build_runs, concept_feature, main, max_activations, parse_clamps
from mmsae.interpret.steering import Clamp, flip_summary, generate, position_mask, steer_records, steering
from mmsae.models.adapters import (
    IMAGE,
    TEXT,
    ChameleonAdapter,
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
)
from mmsae.params import SteerParams
from mmsae.sae.io import save_sae
from mmsae.sae.model import SAEConfig, build_sae

D_SAE = 64
CONST, CONST_VALUE = 5, 0.7  # a latent that is CONST_VALUE at every token (zero encoder column, bias 0.7)
OFF = 6  # a latent that never fires (zero encoder column, bias 0)


@pytest.fixture(scope="module")
def adapter():
    model, processor = build_tiny_llava(layers=2, seed=0)
    return LlavaAdapter(model.eval(), processor)


def make_sae(layer: int = 0, normalize: str = "constant_norm_rescale", seed: int = 2):
    """Unit-norm random directions, W_enc = W_dec^T, bias -1 (sparse on norm-sqrt(d) inputs), plus the
    hand-set latents CONST and OFF."""
    sae = build_sae(SAEConfig(d_in=32, d_sae=D_SAE, normalize_activations=normalize,
                              metadata={"hook_layer": layer}), seed=None)
    w = torch.randn(D_SAE, 32, generator=torch.Generator().manual_seed(seed))
    w = w / w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.fill_(-1.0)
        sae.W_enc[:, [CONST, OFF]] = 0.0
        sae.b_enc[CONST], sae.b_enc[OFF] = CONST_VALUE, 0.0
    return sae


def capture_after(adapter, layer: int):
    """A hook registered after any steering hook on `layer`: it sees the (steered) output."""
    store = {}

    def hook(module, args, output):
        store["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    return store, adapter.decoder_layers()[layer].register_forward_hook(hook)


def prompt_batch(adapter, record):
    return adapter.build_batch([Record(record.sample_id, record.question, record.image, [], -1)], include_response=False)


def run_layer(adapter, sae, record, clamps, positions):
    """(clean h, steered h, steered mask) at the SAE's layer, one forward of the prompt."""
    inputs, meta = prompt_batch(adapter, record)
    mask = position_mask(meta, positions)
    with torch.no_grad():
        store, handle = capture_after(adapter, 0)
        adapter.forward(inputs)
        handle.remove()
        clean = store["h"]
        with steering(adapter, sae, clamps) as hook:
            store, handle = capture_after(adapter, 0)  # registered after the steering hook
            hook.begin(mask, steer_generated=False)
            adapter.forward(inputs)
            hook.end()
            handle.remove()
        steered = store["h"]
    return clean[0], steered[0], mask[0]


def test_clamping_an_off_feature_adds_exactly_value_times_its_decoder_row(adapter):
    # no input normalisation: the decoder row is added as it is
    sae = make_sae(normalize="none")
    record = tiny_records(1)[0]
    clean, steered, mask = run_layer(adapter, sae, record, [Clamp(OFF, 3.0)], "image")
    assert int(mask.sum()) == 16
    expected = 3.0 * sae.W_dec[OFF].detach()
    torch.testing.assert_close(steered[mask] - clean[mask], expected.expand(16, -1), atol=1e-6, rtol=0)
    assert torch.equal(steered[~mask], clean[~mask])  # text / special positions untouched


def test_clamping_an_active_feature_moves_it_to_the_value(adapter):
    """A firing latent clamped to v: h' - h = (v - z) W_dec[f], z the latent's own value per token."""
    sae = make_sae(normalize="none")
    with torch.no_grad():  # a latent reading one coordinate: z = relu(10 x_0 + 1)
        sae.W_enc[:, 7] = 0.0
        sae.W_enc[0, 7], sae.b_enc[7] = 10.0, 1.0
    record = tiny_records(1)[0]
    clean, steered, mask = run_layer(adapter, sae, record, [Clamp(7, 2.5)], "text")
    z = torch.relu(10 * clean[mask][:, 0] + 1)
    assert bool((z > 0).all())
    expected = (2.5 - z)[:, None] * sae.W_dec[7].detach()[None]
    torch.testing.assert_close(steered[mask] - clean[mask], expected, atol=1e-5, rtol=1e-5)
    assert set(np.asarray(prompt_batch(adapter, record)[1].modality[0][mask.numpy()])) == {TEXT}


def test_clamping_to_natural_values_changes_nothing_because_the_error_term_is_kept(adapter):
    sae = make_sae()
    record = tiny_records(1)[0]
    clean, steered, mask = run_layer(adapter, sae, record, [Clamp(CONST, CONST_VALUE), Clamp(OFF, 0.0)], "all")
    assert torch.equal(steered, clean)
    # the SAE is far from lossless, so replacing h by its reconstruction would have changed it
    x_hat, _ = sae(clean[mask])
    assert float((x_hat.detach() - clean[mask]).norm() / clean[mask].norm()) > 0.1
    # and generation: identical text, but a strong clamp changes it
    before = generate(adapter, record, 6)
    with steering(adapter, sae, [Clamp(CONST, CONST_VALUE)]) as hook:
        same = generate(adapter, record, 6, hook, "all")
        assert hook.n_steered > 0
    assert same == before
    with steering(adapter, sae, [Clamp(3, 20.0)]) as hook:
        after = generate(adapter, record, 6, hook, "all")
    assert after != before


@pytest.mark.parametrize("positions", ["image", "text", "all"])
def test_positions_cover_prompt_tokens_and_generated_tokens(adapter, positions):
    sae = make_sae()
    record = tiny_records(1)[0]
    _, meta = prompt_batch(adapter, record)
    n_image = int((meta.modality[0] == IMAGE).sum())
    n_text = int((meta.modality[0] == TEXT).sum())
    t0 = meta.attention_mask.shape[1]
    with steering(adapter, sae, [Clamp(OFF, 1.0)]) as hook:
        generate(adapter, record, 4, hook, positions)
        generated_fed = hook.offset - t0  # tokens fed back through the KV cache
        n = hook.n_steered
    assert generated_fed >= 1
    expected = {"image": n_image, "text": n_text + generated_fed, "all": n_image + n_text + generated_fed}
    assert n == expected[positions]


@pytest.mark.parametrize("family", ["llava_next", "chameleon", "qwen2_vl"])
def test_other_families_steer_their_image_tokens(family):
    build, cls = {"llava_next": (build_tiny_llava_next, LlavaNextAdapter), "chameleon": (build_tiny_chameleon, ChameleonAdapter),
                  "qwen2_vl": (build_tiny_qwen2_vl, Qwen2VLAdapter)}[family]
    model, processor = build(layers=2, seed=0)
    adapter = cls(model.eval(), processor)
    record = tiny_records(1)[0]
    _, meta = prompt_batch(adapter, record)
    sae = make_sae()
    before = generate(adapter, record, 4)
    with steering(adapter, sae, [Clamp(CONST, CONST_VALUE)]) as hook:
        assert generate(adapter, record, 4, hook, "all") == before
    with steering(adapter, sae, [Clamp(3, 30.0)]) as hook:
        generate(adapter, record, 4, hook, "image")
        assert hook.n_steered == int((meta.modality[0] == IMAGE).sum()) > 0


def test_steer_records_and_flip_summary():
    table = pd.DataFrame({
        "run": ["x1"] * 4 + ["x2"] * 4, "multiple": [1.0] * 4 + [2.0] * 4, "values": [[1.0]] * 4 + [[2.0]] * 4,
        "changed": [False, True, False, True, True, True, True, False],
        "before_hit": [True, False, False, False] * 2, "after_hit": [True, True, False, False, False, True, True, True],
        "target": "red",
    })
    out = {s["run"]: s for s in flip_summary(table)}
    assert out["x1"]["flip_rate"] == pytest.approx(1 / 3) and out["x1"]["target_before"] == 0.25
    assert out["x2"]["flip_rate"] == pytest.approx(1.0) and out["x2"]["target_after"] == 0.75
    assert out["x2"]["changed"] == 0.75 and out["x1"]["n_flippable"] == 3


def test_steer_records_table(adapter):
    sae = make_sae()
    records = tiny_records(2)
    runs = build_runs(SteerParams.load({"values": [CONST_VALUE, 20.0]}), [CONST], None)
    table = steer_records(adapter, sae, records, runs, "all", 5, target="red", progress=False)
    assert len(table) == 4 and list(table["run"]) == ["value=0.7", "value=20", "value=0.7", "value=20"]
    natural = table[table["run"] == "value=0.7"]
    assert (natural["before"] == natural["after"]).all() and not natural["changed"].any()
    assert {"before_hit", "after_hit", "n_steered"} <= set(table.columns)


def test_runs_from_multiples_and_inputs(tmp_path):
    runs = build_runs(SteerParams.load({"values": None, "multiples": [0.5, 2]}), [3, 9], {3: 2.0, 9: 4.0})
    assert [(c.feature, c.value) for c in runs[1].clamps] == [(3, 4.0), (9, 8.0)] and runs[0].multiple == 0.5
    with pytest.raises(InputError, match="nothing to clamp"):
        build_runs(SteerParams.load({"values": [1.0]}), [], None)
    assert parse_clamps(["3=1.5", "7=-2"]) == [Clamp(3, 1.5), Clamp(7, -2.0)]
    with pytest.raises(InputError, match="FEATURE=VALUE"):
        parse_clamps(["3:1.5"])
    (tmp_path / "premise.json").write_text(json.dumps({"concepts": [{"word": "red", "feature": 11},
                                                                    {"word": "blue", "feature": None}]}))
    assert concept_feature(tmp_path, "red") == 11
    with pytest.raises(InputError, match="no feature"):
        concept_feature(tmp_path, "blue")
    pd.DataFrame({"feature": [0, 11], "top_text_acts": [[0.5, 0.2], [1.0]], "top_image_acts": [[], [3.0, 2.0]]}
                 ).to_parquet(tmp_path / "features.parquet")
    assert max_activations(tmp_path, [11, 0]) == {11: 3.0, 0: 0.5}


def test_select_records_by_task_cleanliness_and_id(tmp_path):
    records = tiny_records(6)
    df = records_frame(records)
    df["task"] = [r.extras["task"] for r in records]
    df["corruption"] = [None, "mismatch", None, None, None, None]
    df.to_parquet(tmp_path / "samples.parquet")
    task = df["task"].iloc[0]
    chosen = select_records(tmp_path, task=task, n=10)
    expect = [s for s, t, c in zip(df["sample_id"], df["task"], df["corruption"], strict=True) if t == task and pd.isna(c)]
    assert [r.sample_id for r in chosen] == expect
    ids = [df["sample_id"].iloc[3], df["sample_id"].iloc[1]]
    assert [r.sample_id for r in select_records(tmp_path, ids)] == ids
    with pytest.raises(InputError, match="no sample 'nope'"):
        select_records(tmp_path, ["nope"])


def test_cli_prints_before_and_after_and_writes_the_table(tmp_path, capsys):
    model_dir = tiny_llava(tmp_path)
    sae_dir = save_sae(make_sae(), tmp_path / "sae")
    samples = tmp_path / "samples"
    samples.mkdir()
    records_frame(tiny_records(2)).to_parquet(samples / "samples.parquet")
    out = tmp_path / "steer"
    params = json.dumps({"features": [CONST], "concept": None, "values": [CONST_VALUE, 20.0], "task": None,
                         "n_samples": 2, "max_new_tokens": 5})
    rc = main(["--model", str(model_dir), "--sae", str(sae_dir), "--samples", str(samples), "--out", str(out),
               "--params", params])
    assert rc == 0
    table = pd.read_parquet(out / "steering.parquet")
    assert len(table) == 4 and (table["features"].map(list) == pd.Series([[CONST]] * 4)).all()
    printed = capsys.readouterr().out
    assert printed.count("before:") == 4 and printed.count("after:") == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["layer"] == 0 and len(manifest["counts"]["runs"]) == 2
    # one explicit clamp on an image file
    img = tmp_path / "img.png"
    tiny_records(1)[0].image.save(img)
    rc = main(["--model", str(model_dir), "--sae", str(sae_dir), "--image", str(img), "--question",
               "what color is the circle ?", "--clamp", f"{OFF}=0", "--out", str(tmp_path / "one")])
    assert rc == 0 and len(pd.read_parquet(tmp_path / "one" / "steering.parquet")) == 1
    # bad input: one line naming the field, exit 2, no folder
    rc = main(["--model", str(model_dir), "--sae", str(sae_dir), "--image", str(img), "--question", "q",
               "--clamp", f"{D_SAE + 5}=1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: steer: field 'features'") and not (tmp_path / "bad").exists()
