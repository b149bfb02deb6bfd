"""A published SAE (SAELens layout, safetensors) in place of a trained one (config train_sae.pretrained)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, write_json
from mmsae.device import resolve_device
from mmsae.errors import InputError
from mmsae.params import TrainSaeParams
from mmsae.sae.io import check_d_in, hook_name, load_sae, log10_frequency, save_sae
from mmsae.sae.metrics import evaluate_blocks
from mmsae.sae.training.tokens import eval_blocks, select_tokens


def import_sae(store: ActivationStore, params: TrainSaeParams, source: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Use a published SAE (SAELens layout, safetensors) instead of training one: check that it fits the
    store (d_in, hook layer), evaluate it on the same held-out split a trained SAE gets, and save it in
    our layout with its sparsity on that split. Writes out_dir/sae/ and out_dir/metrics.json."""
    out_dir = Path(out_dir)
    layer = int(params.layer)
    store.array(layer)
    sae = load_sae(source, device=resolve_device(params.device))
    check_d_in(sae, store.d_model, store.folder)  # the activations are what does not fit
    hooked = sae.cfg.metadata.get("hook_layer")
    if hooked is not None and int(hooked) != layer:
        raise InputError(Path(source) / Files.SAE_CFG, "hook_layer", f"SAE hooks layer {hooked}, config train_sae.layer is {layer}")
    sae.cfg.metadata.update(hook_layer=layer, hook_name=hook_name(layer), pretrained=str(source))
    split = select_tokens(store.token_columns(["row", "sample_id", "modality"]), params.scope, params.include_special, params.eval_fraction)
    t0 = time.perf_counter()
    with torch.no_grad():
        evals, overall = evaluate_blocks(sae, eval_blocks(store, layer, split), params.dense_threshold)
    save_sae(sae, out_dir / Files.SAE_DIR, log10_frequency(overall.fire_counts, overall.n) if overall.n else None)
    ov = evals["overall"]
    metrics = {
        "pretrained": str(source), "architecture": sae.cfg.architecture, "layer": layer, "hook_name": hook_name(layer),
        "scope": params.scope, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "steps": 0, "tokens_seen": 0,
        "n_train_tokens": 0, "n_eval_tokens": int(split.eval_in_scope.sum()), "resumed_from_step": None,
        **{k: ov[k] for k in ("l0", "mse", "centred_fvu", "dead_fraction", "dense_fraction")},
        "eval": evals, "timings_s": {"eval": round(time.perf_counter() - t0, 3)},
    }
    write_json(out_dir / Files.METRICS, metrics)
    return metrics
