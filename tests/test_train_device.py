"""SAE training's device path: prefetched device batches equal the plain batches; precision modes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_sae import synthetic_store, tiny_params

from mmsae.activations import ActivationStore, ActivationWriter
from mmsae.errors import InputError
from mmsae.sae.model import ARCHITECTURES, SAEConfig, build_sae
from mmsae.sae.training import BatchSchedule, optimizer_step, precision_context, select_tokens, train_sae


def _bf16_copy(store: ActivationStore, folder) -> ActivationStore:
    w = ActivationWriter(folder, store.layers, store.d_model, dtype="bfloat16", chunk_tokens=store.chunk_tokens)
    w.append({layer: torch.from_numpy(store.read(layer)) for layer in store.layers}, store.tokens.drop(columns="row"))
    w.close()
    return ActivationStore(folder)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_batches_equal_plain_batches(tmp_path, dtype, monkeypatch):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=40))  # 600 tokens, chunks of 64
    if dtype == "bfloat16":
        store = _bf16_copy(store, tmp_path / "bf16")
    rows = select_tokens(store.tokens, "all", False, 0.2).train_rows
    sch = BatchSchedule(rows, store.n_tokens, store.chunk_tokens, 2, 32, seed=7)
    n = 2 * sch.per_epoch + 3
    loaders: set[str] = set()
    real = BatchSchedule._load_to

    def spy(self, *args, **kw):
        loaders.add(threading.current_thread().name)
        return real(self, *args, **kw)

    monkeypatch.setattr(BatchSchedule, "_load_to", spy)
    for start in (0, 13):  # a fresh run and a resumed one (mid-group)
        plain = list(sch.iter_batches(store, 0, start, n))
        device = list(sch.iter_batches(store, 0, start, n, device=torch.device("cpu")))
        assert [s for s, _ in device] == [s for s, _ in plain] == list(range(start, n))
        for (s, x), (_, y) in zip(device, plain, strict=True):
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (32, store.d_model)
            assert np.array_equal(x.numpy(), y)
            assert np.array_equal(x.numpy(), store.read_rows(0, sch.batch_rows(s)))
    assert loaders and threading.main_thread().name not in loaders  # groups are loaded in the prefetch thread


def test_precision_context_is_fp32_off_cuda():
    for p in ("bf16", "tf32", "fp32"):
        with precision_context(torch.device("cpu"), p):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(InputError, match="precision"):
        precision_context(torch.device("cpu"), "fp8")
    assert tiny_params().precision == "bf16"


@pytest.mark.parametrize("arch", [*sorted(ARCHITECTURES), "relu_sparse"])
def test_bf16_autocast_step_works_for_every_architecture(arch):
    """What precision bf16 does on CUDA, on the CPU's autocast: the loss under autocast, the backward
    outside it; weights and Adam state stay fp32 and the loss stays close to the fp32 one.
    relu_sparse: relu with its sparse training step forced (sparse_max_density 1)."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    losses = {}
    extra = {"sparse_max_density": 1.0} if arch == "relu_sparse" else {}
    arch = arch.removesuffix("_sparse")
    for mode in ("fp32", "bf16"):
        sae = build_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4 if ARCHITECTURES[arch].uses_k else None),
                        seed=0)
        sae.configure_training(tiny_params(architecture=arch, k=4, **extra))
        sae.init_from_batch(x)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            out = sae.loss(x, 0.1, dead_mask=torch.ones(64, dtype=torch.bool))
        optimizer_step(sae, opt, out.loss, 1.0)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in sae.parameters())
        assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim())
        losses[mode] = float(out.loss.detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_training_uses_the_device_path(tmp_path, monkeypatch):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=20))
    devices = []
    real = BatchSchedule.iter_batches

    def spy(self, *args, **kw):
        devices.append(kw.get("device"))
        return real(self, *args, **kw)

    monkeypatch.setattr(BatchSchedule, "iter_batches", spy)
    train_sae(store, tiny_params(steps=4, checkpoint_every=4, scale_inputs=False), tmp_path / "o", tmp_path / "ck",
              progress=False)
    assert devices == [torch.device("cpu")]
