"""Splice an SAE into a model and measure what its reconstruction costs the model (paper Table 1).

At the hook (the residual stream after decoder layer L) the activation of the chosen positions is
replaced by the SAE's reconstruction, or by zero (the ablation reference); everything else runs
unchanged. Next-token cross-entropy is measured on the target tokens (predicted from the position
before them), next to the clean model. Targets (`targets`): `response` = the appended response tokens
(what an instruction-tuned model is trained to predict; the toy model never learns the prompt's
distribution, so prompt-token CE there is noise), or `text` = every non-image token after position 0
(the paper's setting for a model pretrained on all text):

    CE-loss score = (CE_zero - CE_sae) / (CE_zero - CE_clean)      1 = lossless, 0 = as bad as zeroing
    KL score      = (KL_zero - KL_sae) / KL_zero                   KL(clean || spliced), per target token

Per-token losses are averaged over all targets of the evaluation set (not per sample). Splices are
split by the modality of the replaced positions: `all` (image + text), `image`, `text`. Special tokens
(BOS, EOS, ...) are never replaced: an SAE is not trained on them (the BOS attention sink has a norm
far outside the data) and the paper's L0 excludes position 0 for the same reason.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F

from mmsae.errors import InputError
from mmsae.models.adapters import IMAGE, TEXT, ModelAdapter
from mmsae.sae.blocks import forward_blocks, reconstruct
from mmsae.sae.metrics import MetricAccumulator
from mmsae.sae.model import SAE

SPLICES = ("all", "image", "text")


class SpliceHook:
    """Forward hook on one decoder layer: replaces the output at `mask` positions ([B, T] bool)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.mask: torch.Tensor | None = None
        self.sae: SAE | None = None  # None with a mask set = zero ablation
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: object) -> object:
        if self.mask is None or not bool(self.mask.any()):
            return None
        h = output[0] if isinstance(output, tuple) else output
        m = self.mask.to(h.device)
        if self.sae is None:
            replacement = torch.zeros_like(h[m])
        else:
            x = h[m].to(self.sae.W_enc.dtype)
            replacement = reconstruct(self.sae, x).to(h.dtype)  # no [tokens x d_sae] block of codes
        h = h.clone()
        h[m] = replacement
        return (h, *output[1:]) if isinstance(output, tuple) else h

    @contextlib.contextmanager
    def set(self, mask: torch.Tensor | None, sae: SAE | None) -> Iterator[None]:
        self.mask, self.sae = mask, sae
        try:
            yield
        finally:
            self.mask, self.sae = None, None

    def remove(self) -> None:
        self.handle.remove()


def _target_logits(adapter: ModelAdapter, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Log-probabilities at the positions that predict the targets (float32, [n_targets, vocab])."""
    hidden = adapter.final_hidden(inputs)
    dev = hidden.device
    return F.log_softmax(adapter.lm_head(hidden[rows.to(dev), (cols - 1).to(dev)]).float(), dim=-1)


class Targets(NamedTuple):
    """The target tokens of one batch and the clean model's view of them."""

    inputs: dict  # the model inputs of the batch
    rows: torch.Tensor  # [n_targets] batch index of each target token
    cols: torch.Tensor  # [n_targets] its position
    clean: torch.Tensor  # [n_targets, vocab] clean log-probabilities
    labels: torch.Tensor  # [n_targets] the target token ids
    ce_clean: float  # summed clean cross-entropy


@torch.no_grad()
def evaluate_splice(adapter: ModelAdapter, saes: dict[str, SAE], layer: int, records: Sequence, batch_size: int,
                    include_response: bool = True, splices: Sequence[str] = SPLICES,
                    targets: str = "response", progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(CE/KL table, reconstruction table) for every SAE in `saes` spliced at `layer` of `adapter`.

    CE/KL table: sae, splice, n_targets, ce_clean, ce_sae, ce_zero, ce_score, kl_sae, kl_zero, kl_score.
    Reconstruction table: sae, modality (all|image|text), n_tokens, l0, mse, centred_fvu,
    dead_fraction (never fired on this evaluation set) — on the hooked activations of the clean model.
    """
    from tqdm import tqdm

    adapter.check_layers([layer], "evaluate_sae.layer")
    if targets not in ("response", "text"):
        raise ValueError(f"targets must be 'response' or 'text', got {targets!r}")
    if targets == "response" and not include_response:
        raise InputError("evaluate_sae", "targets", "'response' targets need include_response: true")
    hook = SpliceHook(adapter.decoder_layers()[layer])
    d_in = adapter.d_model
    sums: dict[tuple[str, str], dict[str, float]] = {}
    recon = {(name, m): MetricAccumulator(d_in, sae.cfg.d_sae) for name, sae in saes.items() for m in SPLICES}
    captured: dict[str, torch.Tensor] = {}

    def capture(module: torch.nn.Module, args: tuple, output: object) -> None:
        captured["h"] = (output[0] if isinstance(output, tuple) else output).detach()

    cap = adapter.decoder_layers()[layer].register_forward_hook(capture)
    bar = tqdm(total=len(records), unit="sample", desc="evaluate_sae", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            inputs, meta = adapter.build_batch(batch, include_response=include_response)
            found = _targets(adapter, inputs, meta, targets)
            if found is not None:
                masks = _splice_masks(meta)
                _add_reconstruction(recon, saes, captured["h"], masks)  # h: the hook layer in the clean pass
                for splice in splices:
                    if bool(masks[splice].any()):
                        _add_splice(adapter, hook, saes, splice, masks[splice], found, sums)
            bar.update(len(batch))
    finally:
        bar.close()
        hook.remove()
        cap.remove()
    return _ce_table(sums), _reconstruction_table(recon)


def _targets(adapter: ModelAdapter, inputs: dict, meta: object, targets: str) -> Targets | None:
    """The batch's target tokens (after position 0) with their clean log-probabilities; None if none."""
    real = torch.from_numpy(meta.attention_mask)
    target = real & torch.from_numpy(meta.is_response if targets == "response" else meta.modality != IMAGE)
    target[:, 0] = False
    rows, cols = target.nonzero(as_tuple=True)
    if len(rows) == 0:
        return None
    clean = _target_logits(adapter, inputs, rows, cols)
    labels = inputs["input_ids"][rows.to(clean.device), cols.to(clean.device)]
    ce_clean = F.nll_loss(clean, labels, reduction="sum").item()
    return Targets(inputs, rows, cols, clean, labels, ce_clean)


def _splice_masks(meta: object) -> dict[str, torch.Tensor]:
    """[B, T] masks of the positions each splice replaces: image + text, image, text (never special)."""
    real = torch.from_numpy(meta.attention_mask)
    modality = meta.modality
    return {
        "all": real & torch.from_numpy((modality == IMAGE) | (modality == TEXT)),
        "image": real & torch.from_numpy(modality == IMAGE),
        "text": real & torch.from_numpy(modality == TEXT),
    }


def _add_reconstruction(recon: dict[tuple[str, str], MetricAccumulator], saes: dict[str, SAE], h: torch.Tensor,
                        masks: dict[str, torch.Tensor]) -> None:
    """The SAE runs once on the `all` positions, in row slices of bounded dense codes; `image` and `text`
    (disjoint, their union is `all`) take their rows of each slice."""
    sel = masks["all"].to(h.device)
    subs = {m: mask.to(h.device)[sel] for m, mask in masks.items()}
    for name, sae in saes.items():
        x_all = h[sel].to(sae.W_enc.dtype)
        for s, x_hat, f in forward_blocks(sae, x_all):
            x, x_hat, f = x_all[s].cpu(), x_hat.cpu(), f.cpu()
            for m, sub in subs.items():
                keep = sub[s].cpu()
                recon[(name, m)].update(x[keep], x_hat[keep], f[keep])


def _add_splice(adapter: ModelAdapter, hook: SpliceHook, saes: dict[str, SAE], splice: str, mask: torch.Tensor,
                t: Targets, sums: dict[tuple[str, str], dict[str, float]]) -> None:
    """Add the batch's summed CE and KL with `mask` zeroed and with each SAE spliced in to `sums`."""
    with hook.set(mask, None):
        zero = _target_logits(adapter, t.inputs, t.rows, t.cols)
    ce_zero = F.nll_loss(zero, t.labels, reduction="sum").item()
    kl_zero = F.kl_div(zero, t.clean, log_target=True, reduction="sum").item()
    for name, sae in saes.items():
        with hook.set(mask, sae):
            spliced = _target_logits(adapter, t.inputs, t.rows, t.cols)
        acc = sums.setdefault((name, splice), dict.fromkeys(("n", "clean", "sae", "zero", "kl_sae", "kl_zero"), 0.0))
        acc["n"] += len(t.rows)
        acc["clean"] += t.ce_clean
        acc["zero"] += ce_zero
        acc["kl_zero"] += kl_zero
        acc["sae"] += F.nll_loss(spliced, t.labels, reduction="sum").item()
        acc["kl_sae"] += F.kl_div(spliced, t.clean, log_target=True, reduction="sum").item()


def _ce_table(sums: dict[tuple[str, str], dict[str, float]]) -> pd.DataFrame:
    ce_rows = []
    for (name, splice), acc in sums.items():
        n = acc["n"]
        ce_clean, ce_sae, ce_zero = acc["clean"] / n, acc["sae"] / n, acc["zero"] / n
        kl_sae, kl_zero = acc["kl_sae"] / n, acc["kl_zero"] / n
        ce_rows.append({
            "sae": name, "splice": splice, "n_targets": int(n), "ce_clean": ce_clean, "ce_sae": ce_sae,
            "ce_zero": ce_zero, "ce_score": _ratio(ce_zero - ce_sae, ce_zero - ce_clean),
            "kl_sae": kl_sae, "kl_zero": kl_zero, "kl_score": _ratio(kl_zero - kl_sae, kl_zero),
        })
    return pd.DataFrame(ce_rows)


def _reconstruction_table(recon: dict[tuple[str, str], MetricAccumulator]) -> pd.DataFrame:
    rec_rows = []
    for (name, m), acc in recon.items():
        r = acc.result(dense_threshold=1.0)
        rec_rows.append({"sae": name, "modality": m, "n_tokens": r["n_tokens"], "l0": r["l0"], "mse": r["mse"],
                         "centred_fvu": r["centred_fvu"], "dead_fraction": r["dead_fraction"]})
    return pd.DataFrame(rec_rows)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def summary_table(ce: pd.DataFrame, recon: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, sae): L0, FVU and CE/KL scores per modality, the paper's Table 1 shape."""
    out = []
    keys = ["model", "sae"] if "model" in ce.columns else ["sae"]
    for key, group in recon.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        for r in group.itertuples():
            row[f"l0_{r.modality}"] = r.l0
            row[f"fvu_{r.modality}"] = r.centred_fvu
        sel = ce
        for k, v in zip(keys, key, strict=True):
            sel = sel[sel[k] == v]
        for r in sel.itertuples():
            row[f"ce_score_{r.splice}"] = r.ce_score
            row[f"kl_score_{r.splice}"] = r.kl_score
            row[f"ce_sae_{r.splice}"] = r.ce_sae
        out.append(row)
    return pd.DataFrame(out)

