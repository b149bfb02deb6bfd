"""Attribution of a logit difference to (token, SAE feature): activation difference x gradient.

Metric: m = logit(A) - logit(B) at the answer position (the last prompt token, which predicts the
answer's first token); A and B are answers, each represented by its first token after the prompt.
At the SAE's hook (residual stream after decoder layer L) and at the attributed positions the
activation is rewritten as h = x_hat(z) + e, with the codes z and the error term e = h - x_hat(z)
as leaves of the graph: the forward value is h itself (up to float rounding), and the gradient
reaches every latent (Marks et al. 2024's "SAE error nodes"). Then, with z_ref = 0 by default,

    attr[pos, f]  = (z[pos, f] - z_ref[f]) * dm/dz[pos, f]       ~ m(clean) - m(z[pos, f] := z_ref[f])
    error[pos]    = e[pos] . dm/de[pos]                          (reference e = 0)
    total[pos]    = sum_f attr[pos, f] + error[pos]

one backward pass instead of one forward per (position, feature). The approximation is exact when m
is linear in the latents (e.g. the hook after the last layer with no final norm); `verify` ablates the
top pairs one at a time (error term kept, mmsae.interpret.steering) so the table says how good it is: column
`ablation_effect` = m(clean) - m(ablated), on the same scale as `attribution`.
Special tokens (BOS, image sentinels) are never attributed: an SAE is not trained on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.interpret.steering import Clamp, position_mask, sae_layer, steering
from mmsae.models.adapters import IMAGE, BatchMeta, ModelAdapter
from mmsae.models.grid import Grid, adapter_grid, square_side
from mmsae.sae.io import check_d_in
from mmsae.sae.model import SAE

log = logging.getLogger("mmsae.attribution")



@dataclass
class Attribution:
    """One prompt's attribution: `tokens` (one row per real position) and `pairs` (top (position, feature))."""

    sample_id: str
    answer_a: str
    answer_b: str
    token_a: int
    token_b: int
    metric: float  # logit(A) - logit(B) of the clean model
    tokens: pd.DataFrame
    pairs: pd.DataFrame
    grid: Grid | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def answer_token(adapter: ModelAdapter, prompt: str, answer: str) -> int:
    """The first token of `answer` appended to `prompt` as a response is (' ' + answer)."""
    if not answer or not answer.strip():
        raise InputError("attribute", "answer", "empty answer")
    p = adapter.prompt_ids(prompt)
    full = adapter.prompt_ids(prompt + " " + answer.strip())
    i = next((k for k, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full)))
    if i >= len(full):
        raise InputError("attribute", "answer", f"answer {answer!r} adds no token to the prompt")
    return int(full[i])


def answers_of(record: Record, answer_a: str | None, answer_b: str | None) -> tuple[str, str]:
    """(A, B): the given answers, else the record's preferred response and its first other response."""
    a = answer_a if answer_a is not None else record.preferred_response
    others = [r for i, r in enumerate(record.responses) if i != record.preferred]
    b = answer_b if answer_b is not None else (others[0] if others else None)
    if a is None or b is None:
        raise InputError("attribute", "answer_a" if a is None else "answer_b",
                         f"sample {record.sample_id!r} has no response to use; give the answer")
    return a, b


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without grad for the block: the graph then starts at the SAE leaves."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class LatentSplice:
    """Forward hook: at `mask` positions, h := x_hat(z) + e with z, e leaves requiring grad."""

    def __init__(self, layer: torch.nn.Module, sae: SAE, mask: torch.Tensor) -> None:
        self.sae, self.mask = sae, mask
        self.z: torch.Tensor | None = None
        self.e: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: object) -> object:
        h = output[0] if isinstance(output, tuple) else output
        m = self.mask.to(h.device)
        x = h[m].detach().to(self.sae.W_dec.dtype)
        factor = self.sae.input_factor(x)
        self.z = self.sae.encode_normalised(x * factor).detach().requires_grad_(True)
        x_hat = self.sae.decode_normalised(self.z) / factor
        self.e = (x - x_hat).detach().requires_grad_(True)
        h = h.clone()
        h[m] = (x_hat + self.e).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def remove(self) -> None:
        self.handle.remove()


def _metric(adapter: ModelAdapter, inputs: dict, token_a: int, token_b: int) -> torch.Tensor:
    hidden = adapter.final_hidden(inputs)
    logits = adapter.lm_head(hidden[:, -1]).float()
    return logits[0, token_a] - logits[0, token_b]


def token_strings(adapter: ModelAdapter, meta: BatchMeta) -> list[str]:
    ids = meta.token_id[0][meta.attention_mask[0]]
    names = adapter.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return [f"<img {p}>" if m == IMAGE else str(n)
            for n, m, p in zip(names, meta.modality[0], meta.patch[0], strict=False)]


def attribute(adapter: ModelAdapter, sae: SAE, record: Record, answer_a: str | None = None,
              answer_b: str | None = None, positions: str = "all", top_k: int = 50, verify: int = 0,
              reference: torch.Tensor | None = None) -> Attribution:
    """Attribute logit(A) - logit(B) at the answer position of `record`'s prompt to (position, feature).

    `reference`: z_ref [d_sae] (default 0). `verify`: ablate the top `verify` pairs exactly.
    """
    layer = sae_layer(sae)
    adapter.check_layers([layer], "attribute.layer")
    check_d_in(sae, adapter.d_model, adapter.path)
    a, b = answers_of(record, answer_a, answer_b)
    prompt = adapter.prompt(record)
    token_a, token_b = answer_token(adapter, prompt, a), answer_token(adapter, prompt, b)
    if token_a == token_b:
        raise InputError("attribute", "answer_b", f"answers {a!r} and {b!r} start with the same token")
    inputs, meta = adapter.build_batch([replace(record, responses=[], preferred=-1)],  # every image kept
                                       include_response=False)
    mask = position_mask(meta, positions)
    if not bool(mask.any()):
        raise InputError("attribute", "positions", f"sample {record.sample_id!r} has no {positions} tokens")
    with torch.no_grad():
        clean = float(_metric(adapter, inputs, token_a, token_b))
    splice = LatentSplice(adapter.decoder_layers()[layer], sae, mask)
    try:
        with _frozen(adapter.model), torch.enable_grad():
            metric = _metric(adapter, inputs, token_a, token_b)
            gz, ge = torch.autograd.grad(metric, [splice.z, splice.e])
    finally:
        splice.remove()
    z, e = splice.z.detach(), splice.e.detach()
    ref = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device) if reference is None else reference.to(z)
    attr = ((z - ref) * gz).float().cpu()  # [n_pos, d_sae]
    err = (e * ge).sum(-1).float().cpu()

    pos = np.nonzero(mask[0].numpy())[0]
    n_real = int(meta.attention_mask[0].sum())
    names = token_strings(adapter, meta)
    tokens = pd.DataFrame({
        "sample_id": record.sample_id, "position": np.arange(n_real, dtype=np.int32),
        "token_id": meta.token_id[0, :n_real].astype(np.int32), "token": names,
        "modality": meta.modality[0, :n_real], "patch": meta.patch[0, :n_real].astype(np.int32),
        "image_index": meta.image_index[0, :n_real].astype(np.int16),
        "attributed": mask[0, :n_real].numpy(),
        "attr_features": np.zeros(n_real, np.float32), "attr_error": np.zeros(n_real, np.float32),
    })
    tokens.loc[pos, "attr_features"] = attr.sum(1).numpy()
    tokens.loc[pos, "attr_error"] = err.numpy()
    tokens["attr_total"] = tokens["attr_features"] + tokens["attr_error"]

    k = min(top_k, attr.numel())
    _, flat = attr.abs().flatten().topk(k)
    rows, feats = (flat // attr.shape[1]).numpy(), (flat % attr.shape[1]).numpy()
    zc = z.float().cpu()
    pairs = pd.DataFrame({
        "sample_id": record.sample_id, "rank": np.arange(1, k + 1, dtype=np.int32),
        "position": pos[rows].astype(np.int32), "feature": feats.astype(np.int32),
        "activation": zc[rows, feats].numpy(), "gradient": gz.float().cpu()[rows, feats].numpy(),
        "attribution": attr[rows, feats].numpy(),
    })
    pairs = pairs.merge(tokens[["position", "token", "modality", "patch"]], on="position", how="left")
    pairs["ablation_effect"] = np.nan
    if verify:
        ref_cpu = ref.float().cpu()
        for i in range(min(verify, k)):
            p, f = int(pairs.at[i, "position"]), int(pairs.at[i, "feature"])
            one = torch.zeros_like(mask)
            one[0, p] = True
            ablated = ablate(adapter, sae, inputs, one, [Clamp(f, float(ref_cpu[f]))], token_a, token_b)
            pairs.at[i, "ablation_effect"] = clean - ablated
    return Attribution(record.sample_id, a, b, token_a, token_b, clean, tokens, pairs, _grid(adapter, meta),
                       {"metric_spliced": float(metric.detach()), "layer": layer, "positions": positions})


@torch.no_grad()
def ablate(adapter: ModelAdapter, sae: SAE, inputs: dict, mask: torch.Tensor, clamps: Sequence[Clamp],
           token_a: int, token_b: int) -> float:
    """logit(A) - logit(B) with `clamps` applied at `mask` positions (error term kept)."""
    with steering(adapter, sae, clamps) as hook:
        hook.begin(mask, steer_generated=False)
        try:
            return float(_metric(adapter, inputs, token_a, token_b))
        finally:
            hook.end()


def _grid(adapter: ModelAdapter, meta: BatchMeta) -> Grid | None:
    """The base patch grid from the adapter; else a square grid when the image-token count is square."""
    grid = adapter_grid(adapter)
    if grid is not None:
        return grid
    n = int(meta.n_image_tokens[0])
    side = square_side(n) if n else None
    return Grid(side, side) if side else None


# --------------------------------------------------------------------------------------------------
# figure


def plot_attribution(result: Attribution, path: str | os.PathLike) -> None:
    """Heat map of the per-token total attribution over the image patch grid + bars over text tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result.tokens
    img = t[(t["modality"] == IMAGE) & (t["image_index"] == 0)]  # the grid plot: the first image's patches
    txt = t[(t["modality"] != IMAGE) & t["attributed"]]
    # own colour scale for the patches: the answer position's own residual usually dwarfs them
    vmax = float(np.abs(img["attr_total"]).max()) if len(img) else 0.0
    vmax = vmax or 1.0
    has_grid = len(img) > 0 and result.grid is not None
    fig, axes = plt.subplots(1, 2 if has_grid else 1, figsize=(11 if has_grid else 7, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.4]} if has_grid else None)
    axes = axes.ravel()
    if has_grid:
        g = result.grid
        heat = np.full((g.rows, g.cols), np.nan)
        cell, inside = g.cell_index(img["patch"].to_numpy(np.int64))
        heat[g.row_col(cell[inside])] = img["attr_total"].to_numpy()[inside]
        im = axes[0].imshow(heat, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        axes[0].set_title(f"image patches (|max| {vmax:.2g})", fontsize=9)
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    ax = axes[-1]
    colours = ["#b2182b" if v > 0 else "#2166ac" for v in txt["attr_total"]]
    ax.bar(np.arange(len(txt)), txt["attr_total"], color=colours)
    ax.set_xticks(np.arange(len(txt)))
    ax.set_xticklabels(txt["token"], rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="#444", lw=0.6)
    ax.set_title("text tokens")
    fig.suptitle(f"{result.sample_id}: logit({result.answer_a}) - logit({result.answer_b}) = {result.metric:.3g}",
                 fontsize=10)
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_name(sample_id: str, i: int) -> str:
    return f"{i:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', sample_id)[:60]}.png"
