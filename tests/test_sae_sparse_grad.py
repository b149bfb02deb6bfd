"""The speed-ups of mmsae/sae/model/ that perf/ measures change how gradients are computed, not what they
are: each is compared here, in float64, with plain autograd through the dense formula."""

from __future__ import annotations

import pytest
import torch

from mmsae.sae.model import SAEConfig, build_sae


def _topk(apply_b_dec: bool):
    sae = build_sae(SAEConfig(d_in=5, d_sae=12, architecture="topk", k=3, dtype="float64",
                              apply_b_dec_to_input=apply_b_dec), seed=1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.2, 0.3, 12, dtype=torch.float64))
        sae.b_dec.copy_(torch.linspace(0.5, -0.5, 5, dtype=torch.float64))
    return sae


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_topk_selected_values_have_the_dense_gradient(apply_b_dec):
    sae = _topk(apply_b_dec)
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    weights = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values, indices, pre = sae.encode_sparse(x)
    # reference: the same selection, values gathered from the dense formula, plain autograd
    x_c = x - sae.b_dec if apply_b_dec else x
    ref = torch.relu((x_c @ sae.W_enc + sae.b_enc).gather(-1, indices))
    torch.testing.assert_close(values, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(values, torch.relu(pre.gather(-1, indices)), rtol=0, atol=0)  # the GEMM's values
    params = [x, sae.W_enc, sae.b_enc, sae.b_dec]
    ours = _grads((values * weights).sum(), params[: 3 + apply_b_dec])
    dense = _grads((ref * weights).sum(), params[: 3 + apply_b_dec])
    for a, b in zip(ours, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ours[1].abs().sum() > 0


def test_topk_auxk_sparse_path_equals_dense_path():
    sae = _topk(True)
    sae.aux_k = 2
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dead = torch.tensor([True, False] * 6)
    residual = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, _, pre = sae.encode_sparse(x)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    tv = torch.tensor(3.0, dtype=torch.float64)
    sparse = sae.auxk_loss(pre, residual, dead, tv, x_in=x)
    dense = sae.auxk_loss(pre, residual, dead, tv)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-12) and sparse.item() > 0
    for a, b in zip(_grads(sparse, params), _grads(dense, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_relu_sparsity_matvec_and_fused_bias_keep_the_loss():
    sae = build_sae(SAEConfig(d_in=4, d_sae=6, dtype="float64"), seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.1, 0.1, 6, dtype=torch.float64))
        sae.b_dec.fill_(0.2)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = sae.loss(x, 0.7)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    ref = (x_hat - x).pow(2).sum(-1).mean() + 0.7 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    params = list(sae.parameters())
    for a, b in zip(_grads(out.loss, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _sparse_relu(apply_b_dec: bool, normalize: str) -> tuple:
    """A relu SAE whose codes are sparse (negative b_enc: 3-10% of 40 latents active), taking the sparse path
    at up to 25% active."""
    sae = build_sae(SAEConfig(d_in=6, d_sae=40, dtype="float64", apply_b_dec_to_input=apply_b_dec,
                              normalize_activations=normalize), seed=3)
    sae.input_scale = 1.3
    sae.sparse_max_density = 0.25
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, -0.1, 40, dtype=torch.float64))
        sae.b_dec.copy_(torch.linspace(0.3, -0.3, 6, dtype=torch.float64))
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x[3] = 0.0  # no latent active (all pre-activations = b_enc < 0) unless b_dec is applied
    return sae, x


def _reference_loss(sae, x, l1):
    """Paper Eq. 1-3 written out densely, plain autograd."""
    x_in = x * sae.input_factor(x)
    f = torch.relu((x_in - (sae.b_dec if sae.cfg.apply_b_dec_to_input else 0)) @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    return (x_hat - x_in).pow(2).sum(-1).mean() + l1 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean(), f


@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_relu_sparse_step_has_the_dense_loss_and_gradients(apply_b_dec, normalize, monkeypatch):
    sae, x = _sparse_relu(apply_b_dec, normalize)
    ref, f = _reference_loss(sae, x, 0.7)
    density = float((f > 0).double().mean())
    assert 0 < density <= sae.sparse_max_density  # the sparse path's regime
    assert ((f > 0).sum(-1) == 0).any()  # a token with no active latent (an empty bag)

    def no_dense(*a, **kw):
        raise AssertionError("the dense path ran")

    monkeypatch.setattr(type(sae), "_dense_loss", no_dense)
    out = sae.loss(x, 0.7)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(out.codes, f.detach(), rtol=0, atol=1e-12)
    params = list(sae.parameters())
    ours, dense = _grads(out.loss, params), _grads(ref, params)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert ours[0].abs().sum() > 0 and ours[2].abs().sum() > 0


def test_relu_dense_batches_take_the_dense_path(monkeypatch):
    sae = build_sae(SAEConfig(d_in=6, d_sae=40, dtype="float64"), seed=3)  # b_enc 0: about half active
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    calls = []
    dense_loss = type(sae)._dense_loss
    monkeypatch.setattr(type(sae), "_dense_loss", lambda self, *a: calls.append(1) or dense_loss(self, *a))
    ref, _ = _reference_loss(sae, x, 0.7)
    assert sae.loss(x, 0.7).loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert calls == [1]
