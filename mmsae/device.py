"""Device choice, one definition for every stage: 'auto' = CUDA when there is one, else the CPU."""

from __future__ import annotations

import torch

from mmsae.errors import InputError


def resolve_device(name: str = "auto", source: str = "--params", field: str = "device") -> torch.device:
    """'auto' or a torch device string; an unknown one is an InputError naming `source` and `field`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(source, field, f"unknown device {name!r}") from exc
