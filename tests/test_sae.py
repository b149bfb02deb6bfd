"""The SAE core: loss and gradients, metrics, scale folding, SAELens IO, batch stream, resume, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmsae import cli
from mmsae.activations import ActivationStore, ActivationWriter
from mmsae.errors import InputError
from mmsae.params import TrainSaeParams
from mmsae.sae import train
from mmsae.sae.io import check_d_in, load_sae, load_sparsity, read_cfg, save_sae
from mmsae.sae.metrics import centred_fvu, dead_fraction, dense_fraction, evaluate, l0, mse
from mmsae.sae.model import ARCHITECTURES, SAEConfig, TopKSAE, build_sae, geometric_median
from mmsae.sae.training import BatchSchedule, l1_at, lr_at, optimizer_step, select_tokens, train_sae

D = 16



def synthetic_store(folder: Path, n_samples: int = 40, tokens_per_sample: int = 15, d: int = D, n_features: int = 48,
                    k: int = 3, layers=(0, 1), seed: int = 0, chunk_tokens: int = 64, offset: float = 0.0) -> Path:
    """Sparse-feature activations: each token = sum of k random unit directions with magnitudes in [1, 3].

    Each sample: 1 special (BOS) token, then 6 image tokens, then text tokens. Image tokens use the
    first half of the dictionary, text tokens the second half.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_features, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    writer = ActivationWriter(folder, list(layers), d, chunk_tokens=chunk_tokens, shard_chunks=2)
    for s in range(n_samples):
        mods = ["special"] + ["image"] * 6 + ["text"] * (tokens_per_sample - 7)
        x = np.zeros((tokens_per_sample, d))
        for t, m in enumerate(mods):
            lo, hi = (0, n_features // 2) if m == "image" else (n_features // 2, n_features)
            idx = rng.choice(np.arange(lo, hi), size=k, replace=False)
            x[t] = (rng.uniform(1, 3, size=k)[:, None] * dirs[idx]).sum(0)
        x += offset + 0.01 * rng.standard_normal(x.shape)
        tokens = pd.DataFrame({
            "sample_id": f"s{s:03d}", "position": np.arange(tokens_per_sample, dtype=np.int32), "modality": mods,
            "token_id": np.arange(tokens_per_sample, dtype=np.int32), "is_response": False,
            "patch": np.array([-1] + list(range(6)) + [-1] * (tokens_per_sample - 7), dtype=np.int32),
        })
        states = {layer: torch.tensor(x * (layer + 1), dtype=torch.float32) for layer in layers}
        writer.append(states, tokens)
    writer.close()
    return folder


def tiny_params(**kw) -> TrainSaeParams:
    base = {"layer": 0, "expansion": 4, "steps": 20, "batch_size": 32, "lr": 3e-3, "lr_warmup_steps": 5,
            "lr_decay_steps": 5, "l1_coefficient": 1e-3, "l1_warmup_steps": 5, "checkpoint_every": 10,
            "buffer_chunks": 2, "eval_fraction": 0.2, "dead_window": 200, "device": "cpu"}
    base.update(kw)
    return TrainSaeParams.load(base)


def random_sae(d_in=5, d_sae=7, seed=0, dtype="float32", **cfg) -> torch.nn.Module:
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, **cfg), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae


# ---- model and loss --------------------------------------------------------------------------------
def test_registry_and_init():
    assert "relu" in ARCHITECTURES
    sae = build_sae(SAEConfig(d_in=8, d_sae=24), seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((24,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.equal(build_sae(SAEConfig(d_in=8, d_sae=24), seed=3).W_dec, sae.W_dec)
    with pytest.raises(KeyError):
        build_sae(SAEConfig(d_in=8, d_sae=24, architecture="nope"))


def test_loss_hand_computed():
    sae = build_sae(SAEConfig(d_in=2, d_sae=2), seed=None)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        sae.b_dec.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[1.0, 3.0], [-1.0, 0.5]])
    # token 1: pre = (1, 2) -> f = (1, 2); x_hat = (2, 1) + (0, 1) = (2, 2); err = 1 + 1 = 2
    # token 2: pre = (-1, -0.5) -> f = 0; x_hat = (0, 1); err = 1 + 0.25 = 1.25
    # mse = (2 + 1.25) / 2 = 1.625; sparsity = (1 * 2 + 2 * 0.5 + 0) / 2 = 1.5
    out = sae.loss(x, l1_coefficient=0.1)
    assert out.mse.item() == pytest.approx(1.625)
    assert out.sparsity.item() == pytest.approx(1.5)
    assert out.loss.item() == pytest.approx(1.625 + 0.15)
    torch.testing.assert_close(out.codes, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_loss_gradcheck_float64(apply_b_dec):
    sae = random_sae(d_in=4, d_sae=6, dtype="float64", apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]

    def fn(*tensors):
        for n, t in zip(names, tensors, strict=True):
            setattr(sae, n, t)  # functional: plain tensors replace the parameters
        return sae.loss(x, 0.3).loss

    params = [getattr(sae, n).detach().clone().requires_grad_(True) for n in names]
    for n in names:
        delattr(sae, n)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)


def test_l1_gradient_matches_hand_formula():
    sae = random_sae(d_in=4, d_sae=6, dtype="float64")
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = sae.loss(x, 1.0)
    out.sparsity.backward()
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        f, active = torch.relu(pre), (pre > 0).double()
        norms = sae.W_dec.norm(dim=1)
        n = len(x)
        # d/dW_dec[i] mean_t sum_i f_ti ||W_dec,i|| = mean_t f_ti * W_dec,i / ||W_dec,i||
        g_dec = f.mean(0)[:, None] * sae.W_dec / norms[:, None]
        # d/dW_enc[:, i] = mean_t 1[pre_ti > 0] x_t ||W_dec,i||
        g_enc = (x.T @ active) / n * norms[None, :]
        g_benc = active.mean(0) * norms
    torch.testing.assert_close(sae.W_dec.grad, g_dec)
    torch.testing.assert_close(sae.W_enc.grad, g_enc)
    torch.testing.assert_close(sae.b_enc.grad, g_benc)
    assert sae.b_dec.grad is None or not sae.b_dec.grad.any()


# ---- metrics ---------------------------------------------------------------------------------------
def test_metrics_hand_built():
    f = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.5]])
    assert l0(f) == pytest.approx(4 / 3)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [1.0, 4.0]])
    assert mse(x, x_hat) == pytest.approx((1 + 4) / 2)  # summed over d, mean over tokens
    # mean (2, 3): sum ||x - mean||^2 = (1 + 1) * 2 = 4; errors 1 + 4 = 5
    assert centred_fvu(x, x_hat) == pytest.approx(5 / 4)
    assert centred_fvu(x, x) == 0.0


def test_fvu_is_centred():
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.randn(50, 8, generator=g, dtype=torch.float64)
    mean_recon = x.mean(0, keepdim=True).expand_as(x)
    assert centred_fvu(x, mean_recon) == pytest.approx(1.0)  # uncentred FVU would be ~1e-6 here
    assert centred_fvu(x, x + 0.1 * torch.randn(50, 8, generator=g, dtype=torch.float64)) < 0.05


def test_dead_and_dense_fraction():
    counts = torch.tensor([0, 0, 5, 50, 100])
    assert dead_fraction(counts) == pytest.approx(2 / 5)
    since = torch.tensor([1000, 10, 0, 0, 0])
    assert dead_fraction(counts, since, dead_window=500) == pytest.approx(1 / 5)  # latent 1 fired recently
    assert dense_fraction(counts, 100, 0.4) == pytest.approx(2 / 5)


def test_evaluate_streaming_equals_direct():
    sae = random_sae(d_in=6, d_sae=10, seed=2)
    g = torch.Generator().manual_seed(3)
    x = 5.0 + torch.randn(37, 6, generator=g)
    modality = np.array(["image"] * 20 + ["text"] * 17)
    res = evaluate(sae, x, modality, batch_size=8, dense_threshold=0.3)
    with torch.no_grad():
        x_hat, f = sae(x)
    for key, sel in [("overall", slice(None)), ("image", slice(0, 20)), ("text", slice(20, None))]:
        r = res[key]
        assert r["n_tokens"] == len(x[sel])
        assert r["l0"] == pytest.approx(l0(f[sel]))
        assert r["mse"] == pytest.approx(mse(x[sel], x_hat[sel]), rel=1e-5)
        assert r["centred_fvu"] == pytest.approx(centred_fvu(x[sel], x_hat[sel]), rel=1e-4)
        counts = (f[sel] > 0).sum(0)
        assert r["dead_fraction"] == pytest.approx(dead_fraction(counts))
        assert r["dense_fraction"] == pytest.approx(dense_fraction(counts, len(x[sel]), 0.3))


# ---- scaling and IO --------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_scale_folding_save_load_same_codes(tmp_path, normalize):
    sae = random_sae(d_in=5, d_sae=9, seed=4, normalize_activations=normalize, apply_b_dec_to_input=True)
    sae.input_scale = 0.37 if normalize == "none" else 1.0
    x = 3.0 * torch.randn(11, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_hat, f = sae(x)
        save_sae(sae, tmp_path / "sae", sparsity=torch.full((9,), -2.0))
        loaded = load_sae(tmp_path / "sae")
        assert loaded.input_scale == 1.0
        x_hat2, f2 = loaded(x)
        torch.testing.assert_close(f2, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_hat2, x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.decode(f2, x), x_hat, rtol=1e-5, atol=1e-5)
    if normalize == "none":
        torch.testing.assert_close(loaded.W_enc, sae.W_enc * 0.37)
        torch.testing.assert_close(loaded.W_dec, sae.W_dec / 0.37)
    assert torch.equal(load_sparsity(tmp_path / "sae"), torch.full((9,), -2.0))


def test_saelens_cfg_roundtrip(tmp_path):
    meta = {"model_name": "llava-hf/x", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "context_size": 77,
            "scope": "all", "l1_coefficient": 5.0}
    sae = random_sae(d_in=6, d_sae=12, normalize_activations="constant_norm_rescale", metadata=meta)
    save_sae(sae, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    raw = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert raw["architecture"] == "standard"  # SAELens' name for the ReLU SAE
    assert (raw["d_in"], raw["d_sae"], raw["dtype"]) == (6, 12, "float32")
    assert raw["normalize_activations"] == "constant_norm_rescale" and raw["apply_b_dec_to_input"] is False
    assert raw["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and raw["metadata"]["scope"] == "all"
    assert raw["hook_name"] == "blocks.3.hook_resid_post" and raw["context_size"] == 77  # SAELens < 6 readers
    w = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (6, 12), "b_enc": (12,), "W_dec": (12, 6), "b_dec": (6,)}
    cfg = read_cfg(tmp_path / "a")
    assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.normalize_activations) == ("relu", 6, 12, "constant_norm_rescale")
    assert {k: cfg.metadata[k] for k in meta} == meta
    loaded = load_sae(tmp_path / "a")
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, k), getattr(sae, k))


def test_load_saelens_3x_cfg(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    old = {"model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
           "hook_point_head_index": None, "d_in": 4, "d_sae": 8, "dtype": "torch.float32", "device": "cuda",
           "apply_b_dec_to_input": True, "context_size": 128, "expansion_factor": 2, "lr": 4e-4,
           "normalize_activations": False, "dataset_path": "Skylion007/openwebtext"}
    (folder / "cfg.json").write_text(json.dumps(old))
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(4, 8, generator=g), "b_enc": torch.randn(8, generator=g),
         "W_dec": torch.randn(8, 4, generator=g), "b_dec": torch.randn(4, generator=g), "scaling_factor": torch.ones(8)}
    save_file(w, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.apply_b_dec_to_input) == (4, 8, True)
    assert sae.cfg.metadata["hook_name"] == "blocks.8.hook_resid_pre" and sae.cfg.metadata["hook_layer"] == 8
    assert sae.cfg.metadata["model_name"] == "gpt2-small"
    x = torch.randn(3, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    # no apply_b_dec_to_input field: SAELens' default (True); hook_layer parsed from the hook name
    del old["apply_b_dec_to_input"], old["hook_point_layer"]
    (folder / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(folder)
    assert sae.cfg.apply_b_dec_to_input is True and sae.cfg.metadata["hook_layer"] == 8


def test_load_refuses_pickles_and_bad_cfg(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    (folder / "sae_weights.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InputError, match="pickle"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({"d_sae": 8}))
    with pytest.raises(InputError, match="d_in"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "gated"}))
    with pytest.raises(InputError, match="architecture"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "topk"}))  # no k
    with pytest.raises(InputError, match="'k'"):
        load_sae(folder)


def test_check_d_in(tmp_path):
    save_sae(random_sae(d_in=5, d_sae=7), tmp_path / "s")
    sae = load_sae(tmp_path / "s")
    check_d_in(sae, 5, "store")
    with pytest.raises(InputError) as err:
        check_d_in(sae, 6, "some/extract")
    assert err.value.field == "d_in" and err.value.file.endswith("cfg.json")
    assert "d_model=6" in str(err.value) and "\n" not in str(err.value)


# ---- token selection and batch stream ----------------------------------------------------------------
def test_select_tokens(tmp_path):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=30))
    tok = store.tokens
    split = select_tokens(tok, "all", include_special=False, eval_fraction=0.2)
    by_row = tok.set_index("row")
    train_s, eval_s = set(by_row.loc[split.train_rows, "sample_id"]), set(by_row.loc[split.eval_rows, "sample_id"])
    assert train_s.isdisjoint(eval_s) and 0 < len(eval_s) < 15
    assert set(by_row.loc[split.train_rows, "modality"]) == {"image", "text"}
    assert split.eval_in_scope.all()
    again = select_tokens(tok.sample(frac=1.0, random_state=1), "all", False, 0.2)  # order-independent
    assert np.array_equal(again.train_rows, split.train_rows)
    text = select_tokens(tok, "text", include_special=True, eval_fraction=0.2)
    assert set(by_row.loc[text.train_rows, "modality"]) == {"text", "special"}
    assert set(text.eval_modality) == {"image", "text", "special"}  # image still evaluated (transfer)
    assert set(text.eval_modality[text.eval_in_scope]) == {"text", "special"}


def test_batch_schedule_is_pure_and_bounded(tmp_path):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=40))  # 600 tokens, chunks of 64
    rows = select_tokens(store.tokens, "all", False, 0.2).train_rows
    sch = BatchSchedule(rows, store.n_tokens, store.chunk_tokens, 2, 32, seed=7)
    assert all(r1 - r0 <= 3 * 64 for _, _, r0, r1 in sch.groups)  # bounded: ~buffer_chunks chunks a group
    n = 3 * sch.per_epoch
    full = dict(sch.iter_batches(store, 0, 0, n))
    assert len(full) == n
    resumed = dict(BatchSchedule(rows, store.n_tokens, store.chunk_tokens, 2, 32, seed=7).iter_batches(store, 0, 17, n))
    for s in range(17, n):
        assert np.array_equal(resumed[s], full[s])
    for s in (0, 5, n - 1):  # rows of a batch come from one group and match the data read
        r = sch.batch_rows(s)
        assert np.array_equal(store.read_rows(0, r), full[s])
        assert len({next(g for g, (_, _, r0, r1) in enumerate(sch.groups) if r0 <= x < r1) for x in r}) == 1
    epoch0 = np.concatenate([sch.batch_rows(s) for s in range(sch.per_epoch)])
    assert len(np.unique(epoch0)) == len(epoch0)  # no row twice within an epoch
    other = BatchSchedule(rows, store.n_tokens, store.chunk_tokens, 2, 32, seed=8)
    assert not np.array_equal(other.batch_rows(0), sch.batch_rows(0))


def test_schedules():
    p = tiny_params(steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_steps=20, l1_coefficient=2.0, l1_warmup_steps=4)
    assert lr_at(0, p) == pytest.approx(0.1) and lr_at(9, p) == pytest.approx(1.0) and lr_at(50, p) == 1.0
    assert lr_at(80, p) == pytest.approx(1.0) and lr_at(90, p) == pytest.approx(0.5) and lr_at(99, p) == pytest.approx(0.05)
    assert l1_at(0, p) == pytest.approx(0.5) and l1_at(3, p) == 2.0 and l1_at(50, p) == 2.0


# ---- training ----------------------------------------------------------------------------------------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae" / "sae_weights.safetensors"))


@pytest.mark.parametrize("keep", [1, 3])
def test_only_the_newest_checkpoints_are_kept(tmp_path, keep):
    store = ActivationStore(synthetic_store(tmp_path / "x"))
    p = tiny_params(steps=30, checkpoint_every=5, keep_checkpoints=keep)
    assert train_sae(store, p, tmp_path / "out", tmp_path / "ck", stop_after=25, progress=False) is None
    want = [f"step-{s:08d}" for s in (25, 20, 15, 10, 5)[:keep]]
    assert sorted((d.name for d in (tmp_path / "ck").iterdir()), reverse=True) == want
    # the number kept is execution only: a rerun with another keep_checkpoints resumes from them
    done = train_sae(store, tiny_params(steps=30, checkpoint_every=5, keep_checkpoints=2), tmp_path / "out",
                     tmp_path / "ck", progress=False)
    assert done["resumed_from_step"] == 25
    assert sorted(d.name for d in (tmp_path / "ck").iterdir()) == ["step-00000025", "step-00000030"]


@pytest.mark.parametrize("normalize", ["none", "token"])
def test_resume_equals_uninterrupted(tmp_path, normalize):
    store = ActivationStore(synthetic_store(tmp_path / "x"))
    p = tiny_params(steps=20, checkpoint_every=10, normalize=normalize)
    full = train_sae(store, p, tmp_path / "full", tmp_path / "ck_full", progress=False)
    assert train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", stop_after=10, progress=False) is None
    assert not (tmp_path / "res").exists()
    assert [d.name for d in (tmp_path / "ck_res").iterdir()] == ["step-00000010"]
    resumed = train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", progress=False)
    assert resumed["resumed_from_step"] == 10 and full["resumed_from_step"] is None
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "res")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["curve"] == full["curve"] and resumed["centred_fvu"] == full["centred_fvu"]
    # a finished run's rerun only re-evaluates (checkpoint at the last step)
    again = train_sae(store, p, tmp_path / "again", tmp_path / "ck_full", progress=False)
    assert again["resumed_from_step"] == 20
    assert all(torch.equal(a[k], v) for k, v in _weights(tmp_path / "again").items())
    # other params: the checkpoint is not used
    other = train_sae(store, tiny_params(steps=20, checkpoint_every=10, normalize=normalize, seed=1),
                      tmp_path / "o", tmp_path / "ck_full", progress=False)
    assert other["resumed_from_step"] is None


def test_training_reaches_low_fvu(tmp_path):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=60))
    p = tiny_params(steps=300, batch_size=64, lr=2e-2, lr_warmup_steps=20, lr_decay_steps=100, l1_coefficient=0.3,
                    l1_warmup_steps=50, checkpoint_every=100, normalize="none", scale_inputs=True, buffer_chunks=4)
    m = train_sae(store, p, tmp_path / "out", tmp_path / "ck", progress=False)
    assert m["input_scale"] == pytest.approx(math.sqrt(D) / np.linalg.norm(store.read(0), axis=1).mean(), rel=0.2)
    assert m["centred_fvu"] < 0.1, m["eval"]
    assert 1 < m["l0"] < 0.5 * m["d_sae"]
    assert m["eval"]["image"]["n_tokens"] > 0 and m["eval"]["text"]["centred_fvu"] < 0.15
    assert m["n_train_tokens"] + m["n_eval_tokens"] == (store.tokens.modality != "special").sum()
    assert [c["step"] for c in m["curve"]] == [100, 200, 300] and m["curve"][-1]["loss"] < m["curve"][0]["loss"]
    assert 0 <= m["dead_fraction"] <= 1 and 0 <= m["dense_fraction"] <= 1
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["centred_fvu"] == m["centred_fvu"]
    sae = load_sae(tmp_path / "out")
    assert sae.cfg.metadata["hook_name"] == "blocks.0.hook_resid_post" and sae.cfg.metadata["scope"] == "all"
    assert load_sparsity(tmp_path / "out").shape == (m["d_sae"],)
    # the saved (scale-folded) SAE gives the same FVU on the held-out raw activations
    split = select_tokens(store.tokens, "all", False, p.eval_fraction)
    x = torch.from_numpy(store.read_rows(0, split.eval_rows))
    assert evaluate(sae, x, split.eval_modality)["overall"]["centred_fvu"] == pytest.approx(m["centred_fvu"], rel=1e-3)


def test_train_script(tmp_path, capsys):
    store = synthetic_store(tmp_path / "x", layers=(0, 2))
    params = json.dumps({"layer": 2, "steps": 12, "batch_size": 32, "checkpoint_every": 5, "expansion": 2,
                         "device": "cpu"})
    out = tmp_path / "train_sae-abc"
    rc = cli.stage_main(train, ["--extract", str(store), "--out", str(out), "--checkpoints", str(tmp_path / "ck"),
                                "--params", params])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "train_sae"
    assert {k: man["counts"][k] for k in ("d_in", "d_sae", "layer")} == {"d_in": D, "d_sae": 2 * D, "layer": 2}
    assert man["counts"]["n_train_tokens"] > 0 and man["counts"]["n_eval_tokens"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json", "sae"]
    assert json.loads((out / "sae" / "cfg.json").read_text())["metadata"]["hook_layer"] == 2
    rc = cli.stage_main(train, ["--extract", str(store), "--out", str(tmp_path / "bad"), "--checkpoints",
                                str(tmp_path / "ck2"), "--params", json.dumps({"layer": 1})])
    assert rc == 2 and not (tmp_path / "bad").exists()
    assert "layer 1 was not extracted" in capsys.readouterr().err

    # a published SAE instead of training: same layout, evaluated on the same held-out split
    rc = cli.stage_main(train, ["--extract", str(store), "--out", str(tmp_path / "train_sae-imp"), "--checkpoints",
                                str(tmp_path / "ck3"), "--params", json.dumps({"layer": 2, "pretrained": str(out / "sae")})])
    assert rc == 0
    trained, imported = (json.loads((p / "metrics.json").read_text()) for p in (out, tmp_path / "train_sae-imp"))
    assert imported["pretrained"] == str(out / "sae") and imported["steps"] == 0
    for key in ("l0", "centred_fvu", "n_eval_tokens"):
        assert imported[key] == pytest.approx(trained[key], rel=1e-5), key
    other = synthetic_store(tmp_path / "y", d=D + 1, layers=(2,))
    rc = cli.stage_main(train, ["--extract", str(other), "--out", str(tmp_path / "bad2"), "--checkpoints",
                                str(tmp_path / "ck4"), "--params", json.dumps({"layer": 2, "pretrained": str(out / "sae")})])
    assert rc == 2 and not (tmp_path / "bad2").exists()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "d_in" in line and f"but {other} has d_model={D + 1}" in line  # names the extract, not the SAE


def test_finished_training_leaves_no_checkpoint_and_a_forced_rerun_trains_from_scratch(tmp_path, capsys):
    """--forcerun deletes only manifest.json: the rerun must neither resume from the finished run's last
    checkpoint nor let anyone read the folder meanwhile."""
    from mmsae.sae import encode

    store = synthetic_store(tmp_path / "x", layers=(0, 2))
    params = json.dumps({"layer": 2, "steps": 12, "batch_size": 32, "checkpoint_every": 5, "expansion": 2})
    out, ck = tmp_path / "train_sae-0123abcd", tmp_path / "train_sae-0123abcd.checkpoints"
    argv = ["--extract", str(store), "--out", str(out), "--checkpoints", str(ck), "--params", params]
    assert cli.stage_main(train, argv) == 0
    first = json.loads((out / "manifest.json").read_text())["counts"]
    assert first["resumed_from_step"] is None and not ck.exists()
    (out / "manifest.json").unlink()  # what snakemake --forcerun train_sae does
    with pytest.raises(InputError, match="manifest"):
        load_sae(out)
    assert cli.stage_main(encode, ["--extract", str(store), "--sae", str(out), "--out", str(tmp_path / "enc")]) == 2
    assert "train_sae-0123abcd/manifest.json: field '--sae': missing" in capsys.readouterr().err
    assert cli.stage_main(train, argv) == 0
    again = json.loads((out / "manifest.json").read_text())["counts"]
    assert again["resumed_from_step"] is None and again["steps"] == 12


# ---- TopK SAE ------------------------------------------------------------------------------------------
def topk_sae(d_in=6, d_sae=16, k=3, seed=0, dtype="float32", **cfg) -> TopKSAE:
    return random_sae(d_in=d_in, d_sae=d_sae, seed=seed, dtype=dtype, architecture="topk", k=k, **cfg)


def test_topk_registry_init_and_config():
    assert ARCHITECTURES["topk"] is TopKSAE
    sae = build_sae(SAEConfig(d_in=8, d_sae=24, architecture="topk", k=4), seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24))  # unit-norm decoder rows
    assert torch.equal(sae.W_enc, sae.W_dec.T) and not sae.b_enc.any() and not sae.b_dec.any()
    with pytest.raises(ValueError, match="k"):
        build_sae(SAEConfig(d_in=8, d_sae=24, architecture="topk"))
    with pytest.raises(ValueError, match="k"):
        SAEConfig(d_in=8, d_sae=24, architecture="topk", k=25)
    p = TrainSaeParams.load({"architecture": "topk"})
    assert (p.k, p.aux_k, p.aux_coefficient, p.apply_b_dec_to_input) == (32, None, 1 / 32, None)
    assert TrainSaeParams.load({}).architecture == "relu"
    with pytest.raises(InputError, match="architecture"):
        TrainSaeParams.load({"architecture": "gated"})
    sae.configure_training(p)
    assert (sae.aux_k, sae.aux_coefficient) == (4, 1 / 32)  # null -> d_in // 2
    sae.configure_training(p.replace(aux_k=100, aux_coefficient=0.5))
    assert (sae.aux_k, sae.aux_coefficient) == (24, 0.5)  # capped at d_sae


def test_topk_keeps_exactly_k():
    sae = topk_sae(d_in=6, d_sae=16, k=3, apply_b_dec_to_input=True)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation > 0
        f = sae.encode(x)
        assert ((f > 0).sum(-1) == 3).all()
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        kth = pre.topk(3, dim=-1).values[:, -1:]
        assert torch.equal(f, torch.where(pre >= kth, pre, torch.zeros_like(pre)))  # the k largest, unchanged
        assert torch.equal(sae(x)[1], f) and torch.equal(sae.loss(x, 0.0).codes, f)
        assert torch.equal(sae.encode(x.reshape(4, 10, 6)), f.reshape(4, 10, 16))  # any leading dims
        sae.b_enc.fill_(-1.5)  # fewer than k positive pre-activations on some tokens: only those fire
        n_active = (sae.encode(x) > 0).sum(-1)
        assert (n_active <= 3).all() and (n_active < 3).any()


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_topk_sparse_decode_equals_dense(normalize):
    sae = topk_sae(d_in=6, d_sae=16, k=4, dtype="float64", normalize_activations=normalize, apply_b_dec_to_input=True)
    sae.input_scale = 0.7 if normalize == "none" else 1.0
    x = torch.randn(3, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values, indices, _ = sae.encode_sparse(x * sae.input_factor(x))
    dense = torch.zeros(3, 9, 16, dtype=torch.float64).scatter(-1, indices, values)
    torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode_normalised(dense), rtol=0, atol=1e-12)
    x_hat, f = sae(x)  # forward decodes sparsely
    torch.testing.assert_close(f, sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(x_hat, sae.decode(f, x), rtol=0, atol=1e-12)
    # same gradients through the gathered rows as through the dense product
    grads = []
    for decode in (lambda: sae.decode_sparse(values, indices), lambda: sae.decode_normalised(dense)):
        sae.zero_grad(set_to_none=True)
        (decode() * torch.linspace(-1, 1, 6, dtype=torch.float64)).pow(2).sum().backward(retain_graph=True)
        grads.append((sae.W_dec.grad.clone(), sae.W_enc.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def _auxk_case() -> TopKSAE:
    """d_in 2, d_sae 3, k 1: decoder rows e1, e2, (e1 + e2)/sqrt(2); W_enc = W_dec^T; biases 0."""
    sae = build_sae(SAEConfig(d_in=2, d_sae=3, architecture="topk", k=1), seed=None)
    r = 1 / math.sqrt(2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r]]))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.aux_k, sae.aux_coefficient = 1, 1 / 32
    return sae


def test_auxk_loss_hand_built():
    sae = _auxk_case()
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    # token 1: pre (2, 1, 3r) -> latent 2 (2.121) -> x_hat (1.5, 1.5), e = (0.5, -0.5), |e|^2 = 0.5
    # token 2: pre (1, 3, 4r) -> latent 1 (3) -> x_hat (0, 3), e = (1, 0), |e|^2 = 1
    # total variance about the batch mean (1.5, 2): 2 * (0.25 + 1) = 2.5 -> FVU = 1.5 / 2.5 = 0.6
    for dead in (None, torch.zeros(3, dtype=torch.bool)):
        out = sae.loss(x, l1_coefficient=0.5, dead_mask=dead)  # l1_coefficient is ignored
        assert out.aux.item() == 0.0
        assert out.loss.item() == pytest.approx(0.6) and out.mse.item() == pytest.approx(0.75)
    # latent 0 dead: e_hat = pre_0 * e1 = (2, 0) and (1, 0); |e - e_hat|^2 = 2.25 + 0.25 and 0 -> AuxK = 2.5 / 2.5
    dead = torch.tensor([True, False, False])
    out = sae.loss(x, 0.5, dead_mask=dead)
    assert out.aux.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(0.6 + 1.0 / 32)
    torch.testing.assert_close(out.codes, torch.tensor([[0.0, 0.0, 3 / math.sqrt(2)], [0.0, 3.0, 0.0]]))
    sae.zero_grad(set_to_none=True)
    out.aux.backward()  # AuxK trains the dead latent's decoder row only
    assert sae.W_dec.grad[0].abs().sum() > 0 and not sae.W_dec.grad[1:].any() and sae.W_enc.grad[:, 0].abs().sum() > 0
    sae.aux_k = 2  # 1 dead < aux_k: scaled by n_dead / aux_k
    assert sae.loss(x, 0.5, dead_mask=dead).aux.item() == pytest.approx(0.5)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_topk_loss_gradcheck_float64(apply_b_dec):
    sae = topk_sae(d_in=4, d_sae=8, k=3, seed=5, dtype="float64", apply_b_dec_to_input=apply_b_dec)
    sae.aux_k, sae.aux_coefficient = 2, 0.5
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dead = torch.tensor([True, False, True, False, True, False, True, False])
    with torch.no_grad():  # a point with no ties: TopK and the AuxK top-2 selections are locally constant
        sae.b_enc.add_(2.0)  # mostly positive pre-activations (no ties among zeros)
        raw = (x - sae.b_dec if apply_b_dec else x) @ sae.W_enc + sae.b_enc
        assert raw.abs().min() > 1e-3
        top = raw.relu().sort(-1, descending=True).values
        top_dead = raw.relu()[:, dead].sort(-1, descending=True).values
        assert (top[:, 2] - top[:, 3]).min() > 1e-3 and (top_dead[:, 1] - top_dead[:, 2]).min() > 1e-3
        assert top[:, 2].min() > 0 and top_dead[:, 1].min() > 0
        out = sae.loss(x, 0.0, dead_mask=dead)
        assert out.aux > 0
        residual = out.x_in - out.x_hat_in  # AuxK's target is detached: a constant for finite differences
        total_variance = (x - x.mean(0)).pow(2).sum()
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    params = [getattr(sae, n).detach().clone().requires_grad_(True) for n in names]
    for n in names:
        delattr(sae, n)

    def use(tensors):
        for n, t in zip(names, tensors, strict=True):
            setattr(sae, n, t)  # functional: plain tensors replace the parameters

    def fn(*tensors):  # FVU + coefficient * AuxK(residual held fixed)
        use(tensors)
        pre = sae.encode_sparse(x)[2]
        return sae.loss(x, 0.3).loss + 0.5 * sae.auxk_loss(pre, residual, dead, total_variance)

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)
    use(params)  # the training loss has exactly that gradient
    g_loss = torch.autograd.grad(sae.loss(x, 0.3, dead_mask=dead).loss, params)
    torch.testing.assert_close(g_loss, torch.autograd.grad(fn(*params), params), rtol=1e-10, atol=1e-12)


def test_topk_decoder_stays_unit_norm():
    sae = build_sae(SAEConfig(d_in=6, d_sae=16, architecture="topk", k=3, apply_b_dec_to_input=True), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    dead = torch.arange(16) < 4
    w0 = sae.W_dec.detach().clone()
    for step in range(6):
        x = 3.0 * torch.randn(32, 6, generator=g) + 1.0
        out = sae.loss(x, 0.0, dead_mask=dead)
        if step % 2:
            optimizer_step(sae, opt, out.loss, grad_clip=1.0)
        else:  # the same, by hand, checking the projected gradient
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-4
            sae.before_optimizer_step()
            assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6  # orthogonal to every row
            opt.step()
            sae.after_optimizer_step()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16), rtol=0, atol=1e-6)
    assert not torch.allclose(sae.W_dec, w0)


def test_geometric_median_and_b_dec_init():
    line = torch.tensor([0.0, 1.0, 2.0, 10.0, 50.0])[:, None] * torch.tensor([[0.6, 0.8]])  # on a line: the median
    torch.testing.assert_close(geometric_median(line), torch.tensor([1.2, 1.6]), rtol=0, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = geometric_median(pts)
    grad = ((y - pts) / (y - pts).norm(dim=1, keepdim=True)).sum(0)  # optimality: the unit vectors sum to 0
    assert grad.norm() < 1e-4
    sae = build_sae(SAEConfig(d_in=3, d_sae=8, architecture="topk", k=2), seed=0)
    sae.input_scale = 0.5
    sae.init_from_batch(pts.float())
    torch.testing.assert_close(sae.b_dec, (0.5 * y).float(), rtol=0, atol=1e-5)  # in the SAE input space
    relu = build_sae(SAEConfig(d_in=3, d_sae=8), seed=0)
    relu.init_from_batch(pts.float())
    assert not relu.b_dec.any()  # relu: b_dec stays 0 (the SAE-V release)


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_topk_scale_folding_save_load_same_codes(tmp_path, normalize):
    sae = topk_sae(d_in=5, d_sae=9, k=3, seed=4, normalize_activations=normalize, apply_b_dec_to_input=True)
    sae.input_scale = 0.37 if normalize == "none" else 1.0
    x = 3.0 * torch.randn(11, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_hat, f = sae(x)
        save_sae(sae, tmp_path / "sae")
        raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
        assert (raw["architecture"], raw["k"], raw["rescale_acts_by_decoder_norm"]) == ("topk", 3, False)
        assert raw["activation_fn_str"] == "topk" and raw["activation_fn_kwargs"] == {"k": 3}
        assert raw["apply_b_dec_to_input"] is True and raw["metadata"]["mmsae_architecture"] == "topk"
        loaded = load_sae(tmp_path / "sae")
        assert isinstance(loaded, TopKSAE) and loaded.k == 3 and loaded.input_scale == 1.0
        x_hat2, f2 = loaded(x)
        assert torch.equal(f2 > 0, f > 0)  # the same latents are selected
        torch.testing.assert_close(f2, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_hat2, x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_load_saelens_topk_variants(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(4, 8, generator=g), "b_enc": torch.randn(8, generator=g),
         "W_dec": torch.randn(8, 4, generator=g), "b_dec": torch.randn(4, generator=g)}
    x = torch.randn(6, 4, generator=g)
    n = w["W_dec"].norm(dim=1)

    def saelens_topk(rescale: bool):  # SAELens 6 TopKSAE.encode / decode
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        if rescale:
            pre = pre * n
        top = pre.topk(3, dim=-1)
        f = torch.zeros(6, 8).scatter(-1, top.indices, top.values.relu())
        return f, (f / n if rescale else f) @ w["W_dec"] + w["b_dec"]

    cases = {"v6_rescaled": ({"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True}, True),
             "v6": ({"architecture": "topk", "k": 3}, False),
             "v5": ({"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}, False)}
    for name, (cfg, rescale) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "apply_b_dec_to_input": True, **cfg}))
        save_file(w, str(folder / "sae_weights.safetensors"))
        sae = load_sae(folder)
        assert isinstance(sae, TopKSAE) and sae.k == 3
        with torch.no_grad():
            x_hat, f = sae(x)
        f_ref, x_hat_ref = saelens_topk(rescale)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)


def test_topk_resume_equals_uninterrupted(tmp_path):
    store = ActivationStore(synthetic_store(tmp_path / "x"))
    p = tiny_params(architecture="topk", k=4, steps=20, checkpoint_every=10, dead_window=64, normalize="none",
                    scale_inputs=True)
    full = train_sae(store, p, tmp_path / "full", tmp_path / "ck_full", progress=False)
    assert train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", stop_after=10, progress=False) is None
    resumed = train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", progress=False)
    assert resumed["resumed_from_step"] == 10 and full["resumed_from_step"] is None
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "res")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["curve"] == full["curve"] and resumed["centred_fvu"] == full["centred_fvu"]
    assert full["curve"][-1]["aux"] > 0  # latents went dead within 64 tokens: AuxK was part of the run
    assert full["k"] == 4 and full["l0"] <= 4 and all(c["l1_coefficient"] == 0.0 for c in full["curve"])
    raw = json.loads((tmp_path / "full" / "sae" / "cfg.json").read_text())
    assert (raw["architecture"], raw["k"], raw["apply_b_dec_to_input"]) == ("topk", 4, True)
    assert raw["metadata"]["aux_k"] == D // 2 and raw["metadata"]["l1_coefficient"] is None


def test_topk_training_reaches_low_fvu(tmp_path):
    # 2 of 32 directions per token (16 per modality) in d = 16: a dictionary a k = 3 TopK SAE can represent
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=60, n_features=32, k=2))
    p = tiny_params(architecture="topk", k=3, steps=300, batch_size=64, lr=2e-2, lr_warmup_steps=20,
                    lr_decay_steps=100, checkpoint_every=100, normalize="none", scale_inputs=True, buffer_chunks=4,
                    dead_window=640)
    m = train_sae(store, p, tmp_path / "out", tmp_path / "ck", progress=False)
    assert m["centred_fvu"] < 0.08, m["eval"]
    assert 2 < m["l0"] <= 3
    assert [c["step"] for c in m["curve"]] == [100, 200, 300] and m["curve"][-1]["loss"] < m["curve"][0]["loss"]
    sae = load_sae(tmp_path / "out")
    assert isinstance(sae, TopKSAE) and sae.k == 3
    # unit-norm rows in training; the saved rows carry the folded input scale
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((m["d_sae"],), 1 / m["input_scale"]), rtol=1e-5, atol=0)
    # the saved SAE gives, on raw activations, the codes of the SAE as trained (last checkpoint, unfolded)
    state = json.loads((tmp_path / "ck" / "step-00000300" / "state.json").read_text())
    tensors = load_file(str(tmp_path / "ck" / "step-00000300" / "state.safetensors"))
    trained = build_sae(sae.cfg, seed=None)
    with torch.no_grad():
        for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(trained, k).copy_(tensors[f"sae.{k}"])
    trained.input_scale = state["input_scale"]
    split = select_tokens(store.tokens, "all", False, p.eval_fraction)
    x = torch.from_numpy(store.read_rows(0, split.eval_rows))
    with torch.no_grad():
        f_trained, f_saved = trained.encode(x), sae.encode(x)
    assert torch.equal(f_trained > 0, f_saved > 0)
    torch.testing.assert_close(f_saved, f_trained, rtol=1e-5, atol=1e-5)
    assert evaluate(sae, x, split.eval_modality)["overall"]["centred_fvu"] == pytest.approx(m["centred_fvu"], rel=1e-3)
