"""Real SAELens loads every architecture we save: `sae_lens.SAE.load_from_disk` on the folder train_sae
wrote, and its encode / decode on our activations equal ours within float tolerance.

SAELens lives in its own venv (perf/.venv-saelens, sae-lens==6.54.12: its pins differ from ours), which
`make test` builds first (Makefile target saelens-venv; it needs the package index). The test drives that
interpreter in a subprocess and skips only when the venv was not built (no `.installed-*` stamp: the
Makefile writes it after a complete install), saying how to build it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sae import synthetic_store, tiny_params

from mmsae.activations import ActivationStore
from mmsae.sae.io import load_sae
from mmsae.sae.model import build_sae
from mmsae.sae.training import train_sae

REPO = Path(__file__).resolve().parents[1]
SAELENS_PY = REPO / "perf" / ".venv-saelens" / "bin" / "python"
ARCHS = {"relu": {}, "topk": {"k": 4}, "batchtopk": {"k": 4}, "jumprelu": {"l0_coefficient": 0.05},
         "matryoshka_batchtopk": {"k": 4, "matryoshka_widths": [8, 32]}}
SAELENS_CLASS = {"relu": "StandardSAE", "topk": "TopKSAE"}  # the other three: JumpReLUSAE (inference)

# run by SAELens' interpreter: load each folder, encode and decode the activations, save what it got
WORKER = """
import json, sys
import numpy as np, torch
import sae_lens
from sae_lens import SAE
x = torch.from_numpy(np.load(sys.argv[1]))
out, names = {}, {}
for folder in sys.argv[3:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    key = folder.rstrip("/").split("/")[-2]  # <arch>-<normalize>/sae
    out[key + ".f"], out[key + ".x_hat"] = f.numpy(), x_hat.numpy()
    names[key] = [type(sae).__name__, sae.cfg.architecture()]
np.savez(sys.argv[2], **out)
print(json.dumps({"version": sae_lens.__version__, "classes": names}))
"""


def as_trained(folder: Path, checkpoints: Path) -> torch.nn.Module:
    """The SAE as it stood after its last training step (its final checkpoint: weights, buffers and input
    scale, before save_sae folded the scale and wrote the SAELens layout)."""
    last = sorted(checkpoints.glob("step-*"))[-1]
    tensors = load_file(str(last / "state.safetensors"))
    sae = build_sae(load_sae(folder).cfg, seed=None)
    with torch.no_grad():
        for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
            t.copy_(tensors[f"{'sae' if isinstance(t, torch.nn.Parameter) else 'buffer'}.{name}"])
    sae.input_scale = json.loads((last / "state.json").read_text())["input_scale"]
    return sae


@pytest.fixture(scope="module")
def saelens_python() -> Path:
    if not SAELENS_PY.exists() or not any(SAELENS_PY.parents[1].glob(".installed-*")):
        pytest.skip(f"{SAELENS_PY.relative_to(REPO)} is missing: `make test` (target saelens-venv) or `make perf` "
                    "builds it from the package index (pip install torch, sae-lens==6.54.12); it printed why it could not")
    return SAELENS_PY


def test_saelens_loads_every_architecture_and_reproduces_our_codes(tmp_path, saelens_python):
    store = ActivationStore(synthetic_store(tmp_path / "x", n_samples=24))
    folders = []
    for arch, extra in ARCHS.items():
        for normalize in ("none", "token"):  # raw inputs with a folded input scale; per-token rescaling
            p = tiny_params(architecture=arch, steps=12, checkpoint_every=12, normalize=normalize, scale_inputs=True,
                            dead_window=64, **extra)
            out = tmp_path / f"{arch}-{normalize}"
            train_sae(store, p, out, tmp_path / f"ck-{arch}-{normalize}", progress=False)
            folders.append(out / "sae")
    x = store.read(0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.run([str(saelens_python), str(tmp_path / "worker.py"), str(tmp_path / "x.npy"),
                           str(tmp_path / "theirs.npz"), *map(str, folders)], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["version"] == "6.54.12"
    theirs = np.load(tmp_path / "theirs.npz")
    xt = torch.from_numpy(x)
    for folder in folders:
        key = folder.parent.name
        arch = key.split("-")[0]
        assert info["classes"][key][0] == SAELENS_CLASS.get(arch, "JumpReLUSAE"), key
        assert load_sae(folder).cfg.architecture == arch
        ours = as_trained(folder, tmp_path / f"ck-{key}")  # not the saved file: a save bug must show
        with torch.no_grad():
            f = ours.encode(xt)
            x_hat = ours.decode(f, xt)
        f_theirs, x_hat_theirs = (torch.from_numpy(theirs[f"{key}.{n}"]) for n in ("f", "x_hat"))
        active = f > 0
        assert active.any() and not active.all(), key
        # the same latents fire (a code within float noise of its threshold may flip: none here)
        assert torch.equal(f_theirs > 0, active), key
        torch.testing.assert_close(f_theirs, f, rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(x_hat_theirs, x_hat, rtol=1e-5, atol=1e-5, msg=key)
