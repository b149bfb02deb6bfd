"""A model's depth and width from its config.json alone (no torch, no weights), so the DAG can refuse a
layer index or a TopK k that cannot fit before any job runs (`snakemake -n` included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def local_model_shape(path: str) -> tuple[int, int] | None:
    """(decoder layers, d_model) of a local model folder's config.json (its text_config for multimodal
    models); None for a hub id or a config without those fields."""
    cfg_path = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    layers, width = text.get("num_hidden_layers"), text.get("hidden_size")
    if isinstance(layers, int) and isinstance(width, int):
        return layers, width
    return None


def dictionary_size(expansion: float, d_model: int) -> int:
    """d_sae of an SAE with `expansion` latents per model dimension (train_sae sizes it so)."""
    return max(1, int(round(expansion * d_model)))


def shape_problems(config: dict[str, Any], shape: tuple[int, int], where: str) -> list[str]:
    """One line per config value the model (`where`: its path, for the message) cannot serve."""
    n_layers, d_model = shape
    out = []
    layers = config["extract"]["layers"]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        out.append(f"config: extract.layers = {json.dumps(layers)}: {where} has {n_layers} decoder layers "
                   f"(0..{n_layers - 1})")
    sae = config["train_sae"]
    if not 0 <= sae["layer"] < n_layers:
        out.append(f"config: train_sae.layer = {sae['layer']}: {where} has {n_layers} decoder layers "
                   f"(0..{n_layers - 1})")
    d_sae = dictionary_size(sae["expansion"], d_model)
    if sae["architecture"] in ("topk", "batchtopk", "matryoshka_batchtopk") and sae["k"] > d_sae:
        out.append(f"config: train_sae.k = {sae['k']}: exceeds d_sae = {d_sae} "
                   f"(expansion {sae['expansion']:g} x d_model {d_model} of {where})")
    return out


def planned_shape(config: dict[str, Any]) -> tuple[tuple[int, int], str] | None:
    """(shape, where) of the configured model when it is known before any job: the toy model's from its
    config slice, a local folder's from its config.json; None for a hub id."""
    if config["model"]["path"] == "toy":
        return (config["toy_model"]["num_layers"], config["toy_model"]["hidden_size"]), "the toy model"
    shape = local_model_shape(config["model"]["path"])
    return (shape, f"model {config['model']['path']!r}") if shape else None
