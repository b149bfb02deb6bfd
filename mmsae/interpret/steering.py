"""Feature steering: clamp SAE features to given values while the model generates, keeping the error term.

At the SAE's hook (the residual stream after decoder layer L, cfg.json `metadata.hook_layer`) and at the
chosen positions, with z = codes of h and z' = z with z[f] := v_f for every clamped feature f:

    h' = sae.decode(z') + (h - sae.decode(z))          the SAE's error term h - x_hat is kept
       = h + sum_f (v_f - z_f) W_dec[f] / factor(h)    factor: the SAE's input scaling (1 for a saved,
                                                       unnormalised SAE)

so clamping a feature to its own value leaves h unchanged bit for bit, and a feature that is off
(z_f = 0) moves h by exactly v_f W_dec[f]. Dropping the error term (the companion paper's release) would
replace h by the SAE's reconstruction everywhere, a change of its own before any feature is touched.

Positions (`positions`): `image` = the prompt's image tokens; `text` = the prompt's text tokens and every
generated token; `all` = both (the default). Special tokens (BOS, image sentinels) are never steered: an
SAE is not trained on them (as in evaluate_sae's splice). Generation is greedy, one prompt at a time (no
padding), through the model's own `generate` with its KV cache; the hook tells the prompt (prefill) from
the generated tokens by counting the positions it has seen.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsae.artifacts import Files
from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.models.adapters import IMAGE, TEXT, BatchMeta, ModelAdapter
from mmsae.sae.io import check_d_in
from mmsae.sae.model import SAE

log = logging.getLogger("mmsae.steering")

POSITIONS = ("all", "image", "text")


@dataclass(frozen=True)
class Clamp:
    """Set SAE feature `feature` to `value` (in the SAE's code units, as in codes.parquet)."""

    feature: int
    value: float


def sae_layer(sae: SAE) -> int:
    """The decoder layer an SAE reads (cfg.json metadata.hook_layer); InputError when it is unknown."""
    layer = sae.cfg.metadata.get("hook_layer")
    if layer is None:
        raise InputError(Path(getattr(sae, "source", ".")) / Files.SAE_CFG, "metadata.hook_layer",
                         "missing: cannot tell which decoder layer the SAE reads")
    return int(layer)


def check_clamps(sae: SAE, clamps: Sequence[Clamp]) -> None:
    bad = [c.feature for c in clamps if not 0 <= c.feature < sae.cfg.d_sae]
    if bad:
        raise InputError("steer", "features", f"feature(s) {bad} out of range: the SAE has {sae.cfg.d_sae} latents")
    dup = {c.feature for c in clamps if sum(d.feature == c.feature for d in clamps) > 1}
    if dup:
        raise InputError("steer", "features", f"feature(s) {sorted(dup)} clamped twice")


def steering_delta(sae: SAE, x: torch.Tensor, features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """h' - h for raw activations x [n, d_in] with `features` [k] clamped to `values` [k] or [n, k]:
    (v - z_f) W_dec[f] / factor(x), summed over the clamped features; exactly 0 where v == z_f."""
    factor = sae.input_factor(x)
    z = sae.encode_normalised(x * factor)
    dz = values.to(z) - z[:, features]
    return (dz @ sae.W_dec[features]) / factor


def position_mask(meta: BatchMeta, positions: str) -> torch.Tensor:
    """[B, T] bool: the prompt positions that `positions` (all | image | text) steers."""
    if positions not in POSITIONS:
        raise InputError("steer", "positions", f"{positions!r} is not one of {POSITIONS}")
    kinds = {"all": (IMAGE, TEXT), "image": (IMAGE,), "text": (TEXT,)}[positions]
    return torch.from_numpy(np.isin(meta.modality, kinds) & meta.attention_mask)


class SteeringHook:
    """Forward hook on one decoder layer adding `steering_delta` at the steered positions.

    `begin(prompt_mask, steer_generated)` arms it for one forward or generation: the first call covers
    the prompt's positions [0, T0) (`prompt_mask` [B, T0]); with a KV cache, later calls cover the
    positions after it (generated tokens), steered iff `steer_generated`. `n_steered` counts the
    positions changed since `begin`.
    """

    def __init__(self, layer: torch.nn.Module, sae: SAE, clamps: Sequence[Clamp]) -> None:
        check_clamps(sae, clamps)
        self.sae = sae
        self.features = torch.tensor([c.feature for c in clamps], dtype=torch.long, device=sae.W_dec.device)
        self.values = torch.tensor([c.value for c in clamps], dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        self.prompt_mask: torch.Tensor | None = None
        self.steer_generated = False
        self.offset = 0
        self.n_steered = 0
        self.handle = layer.register_forward_hook(self._hook)

    def begin(self, prompt_mask: torch.Tensor, steer_generated: bool) -> None:
        self.prompt_mask, self.steer_generated, self.offset, self.n_steered = prompt_mask.bool(), steer_generated, 0, 0

    def end(self) -> None:
        self.prompt_mask = None

    def _mask(self, batch: int, length: int) -> torch.Tensor:
        assert self.prompt_mask is not None
        t0 = self.prompt_mask.shape[1]
        cols = torch.arange(self.offset, self.offset + length)
        if self.offset == 0 and length < t0:
            raise RuntimeError(f"steering: the first forward covers {length} positions, the prompt has {t0}")
        self.offset += length
        mask = torch.full((batch, length), self.steer_generated, dtype=torch.bool)
        in_prompt = cols < t0
        mask[:, in_prompt] = self.prompt_mask[:, cols[in_prompt]]
        return mask

    def _hook(self, module: torch.nn.Module, args: tuple, output: object) -> object:
        if self.prompt_mask is None or len(self.features) == 0:
            return None
        h = output[0] if isinstance(output, tuple) else output
        mask = self._mask(h.shape[0], h.shape[1]).to(h.device)
        if not bool(mask.any()):
            return None
        x = h[mask].to(self.sae.W_dec.dtype)
        delta = steering_delta(self.sae, x, self.features, self.values)
        h = h.clone()
        h[mask] = h[mask] + delta.to(h.dtype)
        self.n_steered += int(mask.sum())
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def remove(self) -> None:
        self.handle.remove()


@contextlib.contextmanager
def steering(adapter: ModelAdapter, sae: SAE, clamps: Sequence[Clamp], layer: int | None = None) -> Iterator[SteeringHook]:
    """A SteeringHook on the SAE's layer of `adapter` for the duration of the block."""
    layer = sae_layer(sae) if layer is None else int(layer)
    adapter.check_layers([layer], "steer.layer")
    check_d_in(sae, adapter.d_model, adapter.path)
    hook = SteeringHook(adapter.decoder_layers()[layer], sae, clamps)
    try:
        yield hook
    finally:
        hook.remove()


@torch.no_grad()
def generate(adapter: ModelAdapter, record: Record, max_new_tokens: int, hook: SteeringHook | None = None,
             positions: str = "all") -> str:
    """Greedy answer to one record's prompt (pipeline prompt format, no padding); steered when `hook`
    is given (at `positions`), plain otherwise."""
    inputs, meta = adapter.build_batch([replace(record, responses=[], preferred=-1)],  # every image kept
                                       include_response=False)
    tok = adapter.tokenizer
    if hook is not None:
        hook.begin(position_mask(meta, positions), steer_generated=positions in ("all", "text"))
    try:
        out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    finally:
        if hook is not None:
            hook.end()
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.split())


@dataclass(frozen=True)
class SteeringRun:
    """One setting to compare with the unsteered model: the clamps and a label (e.g. the multiple)."""

    clamps: tuple[Clamp, ...]
    label: str = ""
    multiple: float | None = None


def steer_records(adapter: ModelAdapter, sae: SAE, records: Sequence[Record], runs: Sequence[SteeringRun],
                  positions: str = "all", max_new_tokens: int = 8, target: str | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Before/after table: one row per (record, run).

    Columns: sample_id, question, run, multiple, features, values, positions, n_steered (positions
    changed), before, after, changed; with a `target` answer (e.g. the clamped concept word) also
    before_hit / after_hit (answer == target).
    """
    from tqdm import tqdm

    layer = sae_layer(sae)
    if positions not in POSITIONS:
        raise InputError("steer", "positions", f"{positions!r} is not one of {POSITIONS}")
    rows = []
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(steering(adapter, sae, run.clamps, layer)) for run in runs]
        bar = tqdm(records, unit="prompt", desc="steer", disable=not progress, file=sys.stderr, mininterval=1.0)
        for record in bar:
            before = generate(adapter, record, max_new_tokens)
            for run, hook in zip(runs, hooks, strict=True):
                after = generate(adapter, record, max_new_tokens, hook, positions)
                row = {"sample_id": record.sample_id, "question": record.question, "run": run.label,
                       "multiple": run.multiple, "features": [c.feature for c in run.clamps],
                       "values": [float(c.value) for c in run.clamps], "positions": positions,
                       "n_steered": hook.n_steered, "before": before, "after": after, "changed": after != before}
                if target is not None:
                    row.update(target=target, before_hit=before == target, after_hit=after == target)
                rows.append(row)
    return pd.DataFrame(rows)


def flip_summary(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per run: n prompts, share changed; with a target: share answering the target before and after,
    and the flip rate = share answering the target among the prompts that did not before."""
    out = []
    for label, g in table.groupby("run", sort=False):
        multiple = g["multiple"].iloc[0]
        row: dict[str, Any] = {"run": label, "multiple": None if pd.isna(multiple) else float(multiple),
                               "values": [float(v) for v in g["values"].iloc[0]],
                               "n": len(g), "changed": float(g["changed"].mean())}
        if "target" in g.columns:
            not_before = g[~g["before_hit"]]
            row.update(target_before=float(g["before_hit"].mean()), target_after=float(g["after_hit"].mean()),
                       n_flippable=len(not_before),
                       flip_rate=float(not_before["after_hit"].mean()) if len(not_before) else float("nan"))
        out.append(row)
    return out
