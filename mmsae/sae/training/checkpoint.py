"""Checkpoints of SAE training: `checkpoint_dir/step-XXXXXXXX/` = state.safetensors (weights, buffers such as
batchtopk's threshold, Adam moments and step counts, dead-latent counters) + state.json (step, input scale, loss curve, compatibility key),
written atomically; only the newest `train_sae.keep_checkpoints` are kept (each is about 3x the SAE: 6.4 GB at
4096 x 65,536). A rerun with the same params and store resumes from it;
nothing is ever unpickled."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmsae import __version__
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, atomic_dir, config_hash, write_json
from mmsae.params import TrainSaeParams
from mmsae.sae.model import SAE

log = logging.getLogger("mmsae.sae")

CHECKPOINT_FORMAT = 1


def checkpoint_key(params: TrainSaeParams, store: ActivationStore) -> str:
    """What a checkpoint must have been made with to be resumed: the params (but the device), the store
    and this version of mmsae (the code that wrote it)."""
    p = {k: v for k, v in params.as_dict().items() if k not in ("device", "keep_checkpoints")}
    return config_hash(p, [store.folder.resolve().name, f"d_model={store.d_model}", f"n_tokens={store.n_tokens}",
                           f"mmsae={__version__}"], 16)


def save_checkpoint(checkpoint_dir: Path, step: int, sae: SAE, opt: torch.optim.Optimizer,
                    counters: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint_dir/step-<step>/ atomically, then remove all but the newest `keep`; returns its folder."""
    tensors: dict[str, torch.Tensor] = {}
    names = [n for n, _ in sae.named_parameters()]
    for n, p in sae.named_parameters():
        tensors[f"sae.{n}"] = p.detach()
    for n, b in sae.named_buffers():  # state that is not trained by Adam (batchtopk: topk_threshold)
        tensors[f"buffer.{n}"] = b
    adam = opt.state_dict()["state"]
    for i, n in enumerate(names):
        for k, v in adam.get(i, {}).items():
            tensors[f"adam.{n}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    for k, v in counters.items():
        tensors[f"counter.{k}"] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    final = checkpoint_dir / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / Files.TRAIN_STATE_TENSORS))
        write_json(tmp / Files.TRAIN_STATE, {**state, "step": step, "format": CHECKPOINT_FORMAT})
    prune_checkpoints(checkpoint_dir, keep)
    return final


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Remove every step-* folder but the newest `keep` (by step); returns those kept, newest first."""
    folders = sorted((p for p in checkpoint_dir.glob("step-*") if p.is_dir()), reverse=True)  # zero-padded steps
    for old in folders[max(1, keep):]:
        shutil.rmtree(old, ignore_errors=True)
    return folders[:max(1, keep)]


def latest_checkpoint(checkpoint_dir: Path, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state.json, tensors) of the newest complete checkpoint with this compatibility key, if any."""
    if not checkpoint_dir.exists():
        return None
    for tmp in checkpoint_dir.glob(".step-*.tmp-*"):  # half-written by a killed run
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in sorted(checkpoint_dir.glob("step-*"), reverse=True):
        try:
            state = json.loads((folder / Files.TRAIN_STATE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("key") != key or state.get("format") != CHECKPOINT_FORMAT:
            log.warning("ignoring checkpoint %s: made with other params or another store", folder)
            continue
        return state, load_file(str(folder / Files.TRAIN_STATE_TENSORS))
    return None


def restore(sae: SAE, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
            counters: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's tensors back into the SAE, the optimizer's state and the counters (in place)."""
    names = [n for n, _ in sae.named_parameters()]
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(tensors[f"sae.{n}"])
        for n, b in sae.named_buffers():
            b.copy_(tensors[f"buffer.{n}"])
    sd = opt.state_dict()
    sd["state"] = {}
    for i, n in enumerate(names):
        entry = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{n}.")}
        if entry:
            sd["state"][i] = entry
    opt.load_state_dict(sd)
    for k, v in counters.items():
        v.copy_(tensors[f"counter.{k}"])

