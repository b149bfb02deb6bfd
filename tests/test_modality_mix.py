"""train_sae.modality_mix: batch composition, natural unchanged, shares, seeded determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sae import synthetic_store, tiny_params

from mmsae.activations import ActivationStore
from mmsae.config import config_error, load_schema
from mmsae.errors import InputError
from mmsae.sae.training import BatchSchedule, select_tokens, train_sae
from mmsae.sae.training.mix import MixedSchedule, batch_counts, make_schedule, mix_shares


def _store(tmp_path, **kw) -> ActivationStore:
    # 40 samples x (1 special + 6 image + 13 text): text is the majority, image short
    return ActivationStore(synthetic_store(tmp_path / "x", n_samples=40, tokens_per_sample=20, **kw))


def _schedule(store, mix, seed=7, batch_size=32, include_special=False):
    shares = mix_shares(mix, "all", include_special)
    split = select_tokens(store.tokens, "all", include_special, 0.2, by_modality=shares is not None)
    return make_schedule(split.train_rows, split.train_by_modality, store.n_tokens, store.chunk_tokens, 2, batch_size,
                         seed, shares), split


def _modality_of(store):
    tok = store.tokens
    out = np.empty(store.n_tokens, dtype=object)
    out[tok["row"].to_numpy()] = tok["modality"].astype(str).to_numpy()
    return out


def test_batch_composition_by_mix(tmp_path):
    store = _store(tmp_path)
    mod = _modality_of(store)
    nat, split = _schedule(store, "natural")
    assert type(nat) is BatchSchedule  # natural = the plain schedule
    nat_rows = np.concatenate([nat.batch_rows(s) for s in range(nat.per_epoch)])
    nat_share = np.mean(mod[nat_rows] == "image")
    assert nat_share == pytest.approx(6 / 19, abs=0.03)  # the store's own make-up

    bal, bsplit = _schedule(store, "balanced")
    assert isinstance(bal, MixedSchedule)
    for s in range(3 * bal.per_epoch):
        rows = bal.batch_rows(s)
        assert len(rows) == 32 and np.sum(mod[rows] == "image") == 16 and np.sum(mod[rows] == "text") == 16
        assert set(rows) <= set(split.train_rows)  # never a held-out token
    # image is short: over one text epoch the image rows come round again (drawn with replacement)
    img = np.concatenate([bal.batch_rows(s)[:16] for s in range(bal.per_epoch)])
    all_img = set(bsplit.train_by_modality["image"])
    assert len(img) > len(np.unique(img)) and set(img) <= all_img and len(set(img)) > 0.8 * len(all_img)
    # the data a batch carries are those rows
    got = dict(bal.iter_batches(store, 0, 0, 4))
    for s in range(4):
        np.testing.assert_array_equal(got[s], store.read_rows(0, bal.batch_rows(s)))

    shared, _ = _schedule(store, {"image": 0.7, "text": 0.3}, batch_size=50)
    rows = np.concatenate([shared.batch_rows(s) for s in range(20)])
    assert np.mean(mod[rows] == "image") == pytest.approx(0.7, abs=1 / 50)


def test_batch_counts_and_shares():
    assert batch_counts({"image": 0.5, "text": 0.5}, 33) in ({"image": 17, "text": 16}, {"image": 16, "text": 17})
    assert batch_counts({"image": 0.7, "text": 0.3}, 10) == {"image": 7, "text": 3}
    assert sum(batch_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100).values()) == 100
    assert mix_shares("natural", "all", False) is None
    assert mix_shares({"image": 3, "text": 1}, "all", False) == {"image": 0.75, "text": 0.25}
    assert mix_shares("balanced", "all", True) == pytest.approx({"image": 1 / 3, "text": 1 / 3, "special": 1 / 3})
    with pytest.raises(InputError, match="scope"):
        mix_shares("balanced", "text", False)
    with pytest.raises(InputError, match="special"):
        mix_shares({"image": 1, "special": 1}, "all", False)
    with pytest.raises(InputError, match="sum"):
        mix_shares({"image": 0, "text": 0}, "all", False)
    assert config_error({"train_sae": {"modality_mix": {"image": 0.7, "text": 0.3}}}) is None
    assert "modality_mix" in config_error({"train_sae": {"modality_mix": "halves"}})
    assert "modality_mix" in config_error({"train_sae": {"modality_mix": {"image": -1}}})
    assert "modality_mix" in config_error({"train_sae": {"modality_mix": {"audio": 1}}})


def test_mixed_schedule_is_seeded_and_resumable(tmp_path):
    store = _store(tmp_path)
    a, _ = _schedule(store, "balanced", seed=3)
    b, _ = _schedule(store, "balanced", seed=3)
    c, _ = _schedule(store, "balanced", seed=4)
    n = 2 * a.per_epoch + 3
    full = dict(a.iter_batches(store, 0, 0, n))
    resumed = dict(b.iter_batches(store, 0, 11, n))
    assert all(np.array_equal(resumed[s], full[s]) for s in range(11, n))
    assert not np.array_equal(c.batch_rows(0), a.batch_rows(0))


def _weights(folder):
    return load_file(str(folder / "sae" / "sae_weights.safetensors"))


def test_natural_training_unchanged(tmp_path):
    """The default (natural) and an explicit natural train the same weights as the plain schedule's."""
    store = _store(tmp_path)
    default = train_sae(store, tiny_params(), tmp_path / "d", tmp_path / "ck_d", progress=False)
    explicit = train_sae(store, tiny_params(modality_mix="natural"), tmp_path / "e", tmp_path / "ck_e", progress=False)
    a, b = _weights(tmp_path / "d"), _weights(tmp_path / "e")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert default["curve"] == explicit["curve"] and "batch_modality_counts" not in default
    bal = train_sae(store, tiny_params(modality_mix="balanced"), tmp_path / "b", tmp_path / "ck_b", progress=False)
    assert not torch.equal(_weights(tmp_path / "b")["W_enc"], a["W_enc"])
    assert bal["batch_modality_counts"] == {"image": 16, "text": 16}
    assert bal["epochs_by_modality"]["image"] > bal["epochs_by_modality"]["text"]  # image drawn again
    for m in ("image", "text"):  # FVU per modality on the eval split whatever the mix
        assert bal["eval"][m]["centred_fvu"] >= 0 and default["eval"][m]["centred_fvu"] >= 0


@pytest.mark.parametrize("normalize", ["none", "token"])
def test_mixed_resume_equals_uninterrupted(tmp_path, normalize):
    store = _store(tmp_path)
    p = tiny_params(steps=20, checkpoint_every=10, normalize=normalize, modality_mix={"image": 0.6, "text": 0.4})
    full = train_sae(store, p, tmp_path / "full", tmp_path / "ck_full", progress=False)
    assert train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", stop_after=10, progress=False) is None
    resumed = train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", progress=False)
    assert resumed["resumed_from_step"] == 10
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "res")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["curve"] == full["curve"]
    # another mix does not resume from this run's checkpoints
    other = train_sae(store, tiny_params(steps=20, checkpoint_every=10, normalize=normalize, modality_mix="balanced"),
                      tmp_path / "o", tmp_path / "ck_full", progress=False)
    assert other["resumed_from_step"] is None


@pytest.mark.parametrize("arch", load_schema()["properties"]["train_sae"]["properties"]["architecture"]["enum"])
def test_every_architecture_trains_on_a_balanced_mix(tmp_path, arch):
    store = _store(tmp_path)
    kw = {"k": 4} if arch != "relu" and arch != "jumprelu" else {}
    m = train_sae(store, tiny_params(architecture=arch, modality_mix="balanced", **kw), tmp_path / "o", tmp_path / "ck",
                  progress=False)
    assert m["batch_modality_counts"] == {"image": 16, "text": 16}
    assert all(np.isfinite(m["eval"][mod]["centred_fvu"]) for mod in ("image", "text"))
