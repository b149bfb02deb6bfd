"""BatchTopK, JumpReLU and Matryoshka BatchTopK SAEs: loss and gradients on hand-built cases and against a
straightforward dense reference, the threshold, save / load in SAELens' inference layout, resume, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sae import _weights, random_sae, synthetic_store, tiny_params

from mmsae.activations import ActivationStore
from mmsae.errors import InputError
from mmsae.params import TrainSaeParams
from mmsae.sae.io import load_sae, save_sae
from mmsae.sae.metrics import evaluate
from mmsae.sae.model import (
    ARCHITECTURES,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    SAEConfig,
    build_sae,
    matryoshka_widths,
)
from mmsae.sae.training import optimizer_step, select_tokens, train_sae

R = 1 / math.sqrt(2)
NEW = ("batchtopk", "jumprelu", "matryoshka_batchtopk")


def _three_rows(arch: str, **cfg) -> torch.nn.Module:
    """d_in 2, d_sae 3: decoder rows e1, e2, (e1 + e2)/sqrt(2); W_enc = W_dec^T; biases 0."""
    sae = build_sae(SAEConfig(d_in=2, d_sae=3, architecture=arch, k=1, dtype="float64", **cfg), seed=None)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [R, R]], dtype=torch.float64))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


X = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)


def test_registry_and_params():
    assert {ARCHITECTURES[a] for a in NEW} == {BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE}
    p = TrainSaeParams.load({"architecture": "jumprelu"})
    assert (p.l0_coefficient, p.jumprelu_init_threshold, p.jumprelu_bandwidth) == (1.0, 0.01, 0.05)
    assert (p.jumprelu_sparsity_loss_mode, p.topk_threshold_lr, p.matryoshka_widths) == ("step", 0.01, None)
    with pytest.raises(InputError, match="jumprelu_sparsity_loss_mode"):
        TrainSaeParams.load({"jumprelu_sparsity_loss_mode": "quadratic"})
    assert matryoshka_widths(None, 64) == [4, 8, 16, 32, 64]
    assert matryoshka_widths([8, 16], 64) == [8, 16, 64]  # d_sae appended, as SAELens does
    for bad in ([16, 8], [0, 64], [8, 128]):
        with pytest.raises(ValueError, match="matryoshka"):
            matryoshka_widths(bad, 64)
    with pytest.raises(ValueError, match="k"):
        build_sae(SAEConfig(d_in=2, d_sae=3, architecture="batchtopk"))


# ---- BatchTopK -----------------------------------------------------------------------------------------
def test_batchtopk_loss_hand_built():
    sae = _three_rows("batchtopk")
    # pre: token 1 (2, 1, 3r = 2.121), token 2 (1, 3, 4r = 2.828). k = 1 per token on average, 2 tokens: the
    # batch's 2 largest are both token 2's (per-token TopK would give each token one): latents 1 and 2
    out = sae.loss(X)
    torch.testing.assert_close(out.codes, torch.tensor([[0, 0, 0], [0, 3, 4 * R]], dtype=torch.float64))
    # x_hat: token 1 = 0 (|e|^2 = 5), token 2 = (0, 3) + 4r (r, r) = (2, 5) (|e|^2 = 1 + 4 = 5)
    # total variance about the batch mean (1.5, 2): 2 * (0.25 + 1) = 2.5 -> FVU = 10 / 2.5 = 4
    assert out.loss.item() == pytest.approx(4.0) and out.mse.item() == pytest.approx(5.0) and out.aux.item() == 0
    # the inference threshold: an EMA of the smallest kept activation (4r), once per optimizer step
    opt = torch.optim.SGD(sae.parameters(), lr=0.0)
    optimizer_step(sae, opt, out.loss, grad_clip=1e9)
    assert sae.topk_threshold.item() == pytest.approx(0.01 * 4 * R)
    sae.topk_threshold.fill_(2.5)
    with torch.no_grad():  # inference: ReLU(pre) * 1{pre > threshold}, any number per token
        torch.testing.assert_close(sae.encode(X), torch.tensor([[0, 0, 0], [0, 3, 4 * R]], dtype=torch.float64))
        sae.topk_threshold.fill_(1.5)
        torch.testing.assert_close(sae.encode(X), torch.tensor([[2, 0, 3 * R], [0, 3, 4 * R]], dtype=torch.float64))


def _reference_loss(sae, x: torch.Tensor, params: list[torch.Tensor], widths: list[int]) -> torch.Tensor:
    """Dense BatchTopK (SAELens' BatchTopK: the k * n largest ReLU'd pre-activations of the flattened batch),
    the FVU of every prefix level summed (one level = BatchTopK)."""
    W_enc, b_enc, W_dec, b_dec = params
    x_c = x - b_dec if sae.cfg.apply_b_dec_to_input else x
    acts = (x_c @ W_enc + b_enc).relu()
    top = acts.detach().flatten().topk(sae.k * len(x)).indices
    mask = torch.zeros(acts.numel(), dtype=acts.dtype).index_fill(0, top, 1.0).reshape(acts.shape)
    f = acts * mask
    tv = (x - x.mean(0)).pow(2).sum()
    return sum(((f[:, :w] @ W_dec[:w] + b_dec - x).pow(2).sum() / tv for w in widths), x.new_zeros(()))


@pytest.mark.parametrize(("arch", "apply_b_dec"), [("batchtopk", False), ("batchtopk", True),
                                                   ("matryoshka_batchtopk", True)])
def test_batchtopk_family_gradients_equal_a_dense_reference(arch, apply_b_dec):
    sae = random_sae(d_in=5, d_sae=12, seed=4, dtype="float64", architecture=arch, k=3,
                     apply_b_dec_to_input=apply_b_dec)
    widths = [12]
    if arch == "matryoshka_batchtopk":
        sae.widths = widths = [3, 7, 12]
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    out = sae.loss(x)
    assert int((out.codes > 0).sum()) == 3 * 6  # k x batch codes, not k per token
    assert len(set((out.codes > 0).sum(1).tolist())) > 1
    ours = torch.autograd.grad(out.loss, [getattr(sae, n) for n in names])
    params = [getattr(sae, n).detach().clone().requires_grad_(True) for n in names]
    ref = _reference_loss(sae, x, params, widths)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for n, a, b in zip(names, ours, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)


def test_matryoshka_loss_hand_built():
    sae = _three_rows("matryoshka_batchtopk")
    sae.widths = [2, 3]
    out = sae.loss(X)
    # BatchTopK codes as above (token 2: latents 1 and 2). Level 1 (latents 0, 1): x_hat = 0 and (0, 3):
    # |e|^2 = 5 + 1; level 2 (all): 5 + 5 (as batchtopk). Loss = (6 + 10) / 2.5
    assert out.loss.item() == pytest.approx(6.4) and out.mse.item() == pytest.approx(5.0)
    sae.widths = [3]  # one level: BatchTopK itself
    assert sae.loss(X).loss.item() == pytest.approx(4.0)
    # the prefix levels train the early latents to reconstruct alone: the level-1 term moves W_dec[0:2]
    sae.widths = [2, 3]
    g_m = torch.autograd.grad(sae.loss(X).loss, sae.W_dec)[0]
    sae.widths = [3]
    g_b = torch.autograd.grad(sae.loss(X).loss, sae.W_dec)[0]
    # row 1 (active on token 2, in level 1): its gradient gains 2 (x_hat1 - x) 3 / 2.5 = 2 (-1, 0) 3 / 2.5
    torch.testing.assert_close(g_m[1] - g_b[1], torch.tensor([-2.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(g_m[2], g_b[2])  # row 2 is outside level 1


def test_batchtopk_auxk_trains_dead_latents_only():
    sae = _three_rows("batchtopk")
    sae.aux_k = 1
    dead = torch.tensor([True, False, False])
    out = sae.loss(X, dead_mask=dead)
    # residual: token 1 (2, 1), token 2 (-1, -2); e_hat = the dead latent 0's pre x e1 = (2, 0), (1, 0)
    # |e - e_hat|^2 = |(0, 1)|^2 + |(-2, -2)|^2 = 9 over total variance 2.5
    assert out.aux.item() == pytest.approx(9 / 2.5)
    assert out.loss.item() == pytest.approx(4.0 + 9 / 2.5 / 32)
    sae.zero_grad(set_to_none=True)
    out.aux.backward()
    assert sae.W_dec.grad[0].abs().sum() > 0 and not sae.W_dec.grad[1:].any()


# ---- JumpReLU ------------------------------------------------------------------------------------------
def _jumprelu_case(mode: str = "step") -> JumpReLUSAE:
    sae = build_sae(SAEConfig(d_in=2, d_sae=2, architecture="jumprelu", dtype="float64"), seed=None)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(2, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.tensor([0.5, 2.0], dtype=torch.float64))
    sae.bandwidth, sae.sparsity_loss_mode = 2.0, mode
    return sae


def test_jumprelu_loss_and_threshold_gradient_hand_built():
    sae = _jumprelu_case()
    x = torch.tensor([[1.0, 1.8], [0.2, 3.0]], dtype=torch.float64)
    out = sae.loss(x, 0.1)
    # pre = x; thresholds (0.5, 2): f = (1, 0) and (0, 3); errors (0, 1.8) and (0.2, 0): mse (3.24 + 0.04) / 2
    torch.testing.assert_close(out.codes, torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    assert out.mse.item() == pytest.approx(1.64) and out.sparsity.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(1.64 + 0.1)
    g_thr, g_enc = torch.autograd.grad(out.loss, [sae.threshold, sae.W_enc])
    # dL/df = x_hat - x: (0, -1.8), (-0.2, 0). Kernel K(u) = 1{|u| < 1/2}, u = (pre - t) / 2:
    # latent 0: u = 0.25, -0.15 (both in): JumpReLU -(0.5 / 2)(0 - 0.2) = 0.05; L0 -(1 / 2) 2 x 0.1 / 2 = -0.05
    # latent 1: u = -0.1 (in), 0.5 (out): JumpReLU -(2 / 2)(-1.8) = 1.8; L0 -(1 / 2) 1 x 0.1 / 2 = -0.025
    torch.testing.assert_close(g_thr, torch.tensor([0.0, 1.775], dtype=torch.float64))
    # the jump passes no gradient to the encoder (DeepMind's estimator); the active codes reconstruct exactly
    assert not g_enc.any()
    sae.sparsity_loss_mode = "tanh"  # Anthropic's: tanh(4 f ||W_dec,i||), summed over latents, mean over tokens
    assert sae.loss(x, 0.1).sparsity.item() == pytest.approx((math.tanh(4.0) + math.tanh(12.0)) / 2)


def test_jumprelu_gradients_equal_a_reference():
    """Encoder / decoder gradients: those of ReLU codes masked by 1{pre > threshold} (a constant locally);
    the threshold's: the rectangle-kernel formula written out (SAELens JumpReLU and Step backward)."""
    sae = random_sae(d_in=5, d_sae=12, seed=2, dtype="float64", architecture="jumprelu")
    sae.bandwidth = 0.5
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    names = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]
    out = sae.loss(x, 0.3)
    ours = dict(zip(names, torch.autograd.grad(out.loss, [getattr(sae, n) for n in names]), strict=True))
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().clone().requires_grad_(True) for n in names[:4])
    t = sae.threshold.detach()
    pre = x @ W_enc + b_enc
    mask = (pre.detach() > t).to(pre)
    f = pre * mask
    err = f @ W_dec + b_dec - x
    ref = err.pow(2).sum(-1).mean() + 0.3 * mask.sum(-1).mean()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for n, g in zip(names[:4], torch.autograd.grad(ref, [W_enc, b_enc, W_dec, b_dec]), strict=True):
        torch.testing.assert_close(ours[n], g, rtol=1e-10, atol=1e-12, msg=n)
    dl_df = (2 * err.detach() / len(x)) @ W_dec.detach().T
    kern = ((pre.detach() - t) / 0.5).abs().lt(0.5).to(pre)
    g_t = (-(t / 0.5) * kern * dl_df).sum(0) + 0.3 * (-(1 / 0.5) * kern).sum(0) / len(x)
    assert kern.any()
    torch.testing.assert_close(ours["threshold"], g_t, rtol=1e-10, atol=1e-12)


def test_jumprelu_threshold_stays_non_negative_and_is_configured():
    sae = _jumprelu_case()
    p = TrainSaeParams.load({"architecture": "jumprelu", "jumprelu_init_threshold": 0.2, "jumprelu_bandwidth": 0.3,
                             "jumprelu_sparsity_loss_mode": "tanh", "l0_coefficient": 5.0})
    sae.configure_training(p)
    assert sae.threshold.tolist() == [0.2, 0.2] and (sae.bandwidth, sae.sparsity_loss_mode) == (0.3, "tanh")
    assert sae.training_details()["l0_coefficient"] == 5.0
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([-0.1, 0.4], dtype=torch.float64))
    sae.after_optimizer_step()
    assert sae.threshold.tolist() == [0.0, 0.4]


# ---- save / load (SAELens' inference layout) ------------------------------------------------------------
@pytest.mark.parametrize("arch", NEW)
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_save_load_same_codes(tmp_path, arch, normalize):
    sae = random_sae(d_in=5, d_sae=12, seed=6, architecture=arch, k=2 if arch != "jumprelu" else None,
                     normalize_activations=normalize, apply_b_dec_to_input=arch != "jumprelu")
    with torch.no_grad():
        if arch == "jumprelu":
            sae.threshold.copy_(torch.linspace(0.0, 1.0, 12))
        else:
            sae.topk_threshold.fill_(0.4)
    sae.input_scale = 0.37 if normalize == "none" else 1.0
    x = 3.0 * torch.randn(9, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_hat, f = sae(x)
        save_sae(sae, tmp_path / "sae")
        raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
        assert raw["architecture"] == "jumprelu" and raw["metadata"]["mmsae_architecture"] == arch
        w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
        assert w["threshold"].shape == (12,)
        if arch != "jumprelu":
            assert torch.equal(w["threshold"], torch.full((12,), 0.4)) and raw["k"] == 2
        loaded = load_sae(tmp_path / "sae")
        assert type(loaded) is type(sae) and loaded.input_scale == 1.0
        x_hat2, f2 = loaded(x)
        assert torch.equal(f2 > 0, f > 0) and (f > 0).any() and not (f > 0).all()
        torch.testing.assert_close(f2, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_hat2, x_hat, rtol=1e-5, atol=1e-5)
        # a SAELens-published file (no mmsae_architecture) is its inference class: jumprelu, same codes
        del raw["metadata"]["mmsae_architecture"]
        (tmp_path / "sae" / "cfg.json").write_text(json.dumps(raw))
        plain = load_sae(tmp_path / "sae")
        assert type(plain) is JumpReLUSAE
        torch.testing.assert_close(plain(x)[1], f, rtol=1e-5, atol=1e-5)


def test_batchtopk_file_with_several_thresholds_is_refused(tmp_path):
    sae = random_sae(d_in=4, d_sae=6, architecture="batchtopk", k=2)
    save_sae(sae, tmp_path / "s")
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    w["threshold"] = torch.arange(6.0)
    from safetensors.torch import save_file

    save_file(w, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(InputError, match="threshold"):
        load_sae(tmp_path / "s")


# ---- training: resume and a small run per architecture ---------------------------------------------------
ARCH_PARAMS = {"batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4, "matryoshka_widths": [8, 32]},
               "jumprelu": {"l0_coefficient": 0.05, "jumprelu_init_threshold": 0.05, "jumprelu_bandwidth": 0.5}}


@pytest.mark.parametrize("arch", NEW)
def test_resume_equals_uninterrupted(tmp_path, arch):
    store = ActivationStore(synthetic_store(tmp_path / "x"))
    p = tiny_params(architecture=arch, steps=20, checkpoint_every=10, dead_window=64, normalize="none",
                    scale_inputs=True, **ARCH_PARAMS[arch])
    full = train_sae(store, p, tmp_path / "full", tmp_path / "ck_full", progress=False)
    assert train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", stop_after=10, progress=False) is None
    resumed = train_sae(store, p, tmp_path / "res", tmp_path / "ck_res", progress=False)
    assert resumed["resumed_from_step"] == 10 and full["resumed_from_step"] is None
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "res")
    assert set(a) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["curve"] == full["curve"] and resumed["centred_fvu"] == full["centred_fvu"]
    if arch != "jumprelu":
        assert a["threshold"].min() > 0  # the threshold moved, and the checkpoint carried it
        assert full["curve"][-1]["aux"] > 0
    raw = json.loads((tmp_path / "full" / "sae" / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu" and raw["metadata"]["training_architecture"] == arch
    details = raw["metadata"]["training_architecture_details"]
    if arch == "matryoshka_batchtopk":
        assert details["matryoshka_widths"] == [8, 32, 64] and details["k"] == 4
    if arch == "jumprelu":
        assert details["l0_coefficient"] == 0.05 and details["jumprelu_bandwidth"] == 0.5
        assert full["curve"][0]["l1_coefficient"] == pytest.approx(0.05 * 5 / 5)  # warmed up over 5 steps


@pytest.mark.parametrize("arch", NEW)
def test_training_reaches_low_fvu(tmp_path, arch):
    # 2 of 32 directions per token (16 per modality) in d = 16
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=60, n_features=32, k=2))
    extra = {"batchtopk": {"k": 3}, "matryoshka_batchtopk": {"k": 3, "matryoshka_widths": [16, 32]},
             "jumprelu": {"l0_coefficient": 0.02, "jumprelu_init_threshold": 0.1, "jumprelu_bandwidth": 0.5}}[arch]
    p = tiny_params(architecture=arch, steps=300, batch_size=64, lr=2e-2, lr_warmup_steps=20, lr_decay_steps=100,
                    l1_warmup_steps=50, checkpoint_every=100, normalize="none", scale_inputs=True, buffer_chunks=4,
                    dead_window=640, **extra)
    m = train_sae(store, p, tmp_path / "out", tmp_path / "ck", progress=False)
    assert m["centred_fvu"] < 0.15, m["eval"]
    assert 1 < m["l0"] < 0.25 * m["d_sae"], m["l0"]
    assert m["curve"][-1]["loss"] < m["curve"][0]["loss"]
    sae = load_sae(tmp_path / "out")
    assert sae.cfg.architecture == arch
    split = select_tokens(store.tokens, "all", False, p.eval_fraction)
    x = torch.from_numpy(store.read_rows(0, split.eval_rows))
    assert evaluate(sae, x, split.eval_modality)["overall"]["centred_fvu"] == pytest.approx(m["centred_fvu"], rel=1e-3)


@pytest.mark.parametrize("arch", NEW)
def test_architecture_presets_overlay_the_demo_config(tmp_path, arch):
    """config/presets/sae/<arch>.yaml, given after config/config.yaml (snakemake merges them key by key)."""
    import yaml

    from mmsae.config import validate
    from mmsae.sae.training.loop import new_sae

    repo = Path(__file__).resolve().parents[1]
    base = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    overlay = yaml.safe_load((repo / "config" / "presets" / "sae" / f"{arch}.yaml").read_text())
    assert set(overlay) == {"train_sae"} and overlay["train_sae"]["architecture"] == arch
    merged = {**base, "train_sae": {**base.get("train_sae", {}), **overlay["train_sae"]}}
    params = TrainSaeParams.load(validate(merged)["train_sae"])
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=4))
    sae = new_sae(store, params.replace(expansion=8), torch.device("cpu"), None)
    assert sae.cfg.architecture == arch and sae.training_details()
