"""`train_sae`: build the SAE, start or resume, run the steps, evaluate on the held-out split, save.

Every step reads its batch from the BatchSchedule, so the weights depend on (params, store) only; a
resumed run restores the weights, Adam state and dead-latent counters of its checkpoint and ends with
the weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmsae import __version__
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, write_json
from mmsae.device import resolve_device
from mmsae.errors import InputError
from mmsae.models.shape import dictionary_size
from mmsae.params import TrainSaeParams
from mmsae.sae.io import hook_name, log10_frequency, save_sae
from mmsae.sae.metrics import evaluate_blocks
from mmsae.sae.model import ARCHITECTURES, SAE, LossOutput, SAEConfig, build_sae
from mmsae.sae.training.batches import BatchSchedule
from mmsae.sae.training.checkpoint import checkpoint_key, latest_checkpoint, restore, save_checkpoint
from mmsae.sae.training.mix import MixedSchedule, batch_counts, make_schedule, mix_shares
from mmsae.sae.training.step import l1_at, lr_at, optimizer_step, precision_context
from mmsae.sae.training.tokens import TokenSplit, eval_blocks, select_tokens

log = logging.getLogger("mmsae.sae")

NORM_ESTIMATE_BATCHES = 16  # batches (from step 0 on) used to estimate the input scale

# metrics.json "definitions", besides the architecture's own loss definition
METRIC_DEFINITIONS = {
    "curve": "loss, mse (normalised space), sparsity, l0 and aux (auxiliary loss before its coefficient; "
             "0 without one) averaged over the steps since the previous checkpoint",
    "l0": "mean number of latents > 0 per token",
    "mse": "mean over tokens of the squared error summed over d_in (raw activation scale)",
    "centred_fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens",
    "dead_fraction": "never fired on the eval tokens nor in the last dead_window_tokens training tokens",
    "dense_fraction": "firing frequency on the eval tokens > dense_threshold",
    "overall": "held-out tokens of the trained scope; per-modality entries cover all held-out tokens",
}


@dataclass
class Trainee:
    """An SAE in training and what its checkpoints hold besides the weights."""

    sae: SAE
    opt: torch.optim.Optimizer
    counters: dict[str, torch.Tensor]  # per latent: tokens_since_fire, fire_counts
    key: str  # the checkpoint compatibility key
    curve: list[dict[str, float]]
    start: int = 0  # the first step still to run
    resumed_from: int | None = None


def estimate_input_scale(schedule: BatchSchedule | MixedSchedule, store: ActivationStore, layer: int, d_in: int) -> float:
    """sqrt(d_in) / mean ||x|| over the first NORM_ESTIMATE_BATCHES training batches: under a balanced or
    shared modality_mix these are mixed batches, so each modality weighs by its share, not its token count."""
    total, n = 0.0, 0
    for _, xb in schedule.iter_batches(store, layer, 0, min(NORM_ESTIMATE_BATCHES, schedule.per_epoch)):
        total += float(np.linalg.norm(xb.astype(np.float64), axis=1).sum())
        n += len(xb)
    mean = total / max(n, 1)
    return math.sqrt(d_in) / mean if mean > 0 else 1.0


def sae_metadata(store: ActivationStore, params: TrainSaeParams, sparsity_param: str | None,
                 metadata: dict[str, Any] | None) -> dict[str, Any]:
    """cfg.json metadata of the SAE trained on `store`: SAELens' LLM fields, then ours."""
    layer = int(params.layer)
    positions = store.token_columns(["position"])["position"]
    return {
        "model_name": "unknown",
        "hook_name": hook_name(layer),
        "hook_layer": layer,
        "hook_head_index": None,
        "context_size": int(positions.max()) + 1 if len(positions) else 0,
        "prepend_bos": True,
        "dataset_path": str(store.folder),
        "dataset_trust_remote_code": False,
        **(metadata or {}),
        "scope": params.scope,
        "include_special": params.include_special,
        "l1_coefficient": params.l1_coefficient if sparsity_param == "l1_coefficient" else None,
        "normalize": params.normalize,
        "scale_inputs": params.scale_inputs,
        "train_params": {k: v for k, v in params.as_dict().items() if k != "device"},
        "mmsae_version": __version__,
    }


def new_sae(store: ActivationStore, params: TrainSaeParams, device: torch.device,
            metadata: dict[str, Any] | None) -> SAE:
    """The seeded SAE of `params.architecture` for the store's width, configured for training."""
    d_in = store.d_model
    d_sae = dictionary_size(params.expansion, d_in)
    arch = params.architecture
    if arch not in ARCHITECTURES:
        raise InputError("--params", "architecture", f"unknown SAE architecture {arch!r} (have {sorted(ARCHITECTURES)})")
    sae_cls = ARCHITECTURES[arch]
    k = None
    if sae_cls.uses_k:
        k = int(params.k)
        if k > d_sae:
            raise InputError("--params", "k", f"k={k} exceeds d_sae={d_sae} (expansion {params.expansion} x d_in {d_in})")
    apply_b_dec = params.apply_b_dec_to_input
    if apply_b_dec is None:
        apply_b_dec = sae_cls.default_apply_b_dec_to_input
    meta = sae_metadata(store, params, sae_cls.sparsity_param, metadata)
    cfg = SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, device=str(device),
        apply_b_dec_to_input=bool(apply_b_dec),
        normalize_activations="constant_norm_rescale" if params.normalize == "token" else "none",
        metadata=meta, k=k,
    )
    sae = build_sae(cfg, seed=params.seed).to(device)
    try:
        sae.configure_training(params)
    except ValueError as exc:  # e.g. matryoshka widths that do not fit d_sae
        raise InputError("--params", "matryoshka_widths" if "matryoshka" in str(exc) else "architecture", str(exc)) from exc
    if sae_cls.uses_k:
        meta.update(k=k, aux_k=sae.aux_k, aux_coefficient=sae.aux_coefficient)
    details = sae.training_details()
    if details:  # SAELens' place for what its inference class does not need
        meta.update(training_architecture=arch, training_architecture_details=details)
    return sae


def start_or_resume(sae: SAE, store: ActivationStore, params: TrainSaeParams, schedule: BatchSchedule | MixedSchedule,
                    checkpoint_dir: Path, device: torch.device) -> Trainee:
    """The optimizer and counters of `sae`, restored from the latest compatible checkpoint if there is
    one; a fresh run estimates its input scale (scale_inputs) instead."""
    d_sae = sae.cfg.d_sae
    opt = torch.optim.Adam(sae.parameters(), lr=params.lr, betas=(0.9, 0.999))
    counters = {
        "tokens_since_fire": torch.zeros(d_sae, dtype=torch.int64, device=device),
        "fire_counts": torch.zeros(d_sae, dtype=torch.int64, device=device),
    }
    run = Trainee(sae, opt, counters, checkpoint_key(params, store), [])
    ck = latest_checkpoint(checkpoint_dir, run.key)
    if ck is not None:
        state, tensors = ck
        restore(sae, opt, tensors, counters)
        run.start = run.resumed_from = int(state["step"])
        sae.input_scale = float(state["input_scale"])
        run.curve = list(state["curve"])
        log.info("train_sae: resuming from %s at step %d", checkpoint_dir, run.start)
    elif params.scale_inputs and params.normalize == "none":
        sae.input_scale = estimate_input_scale(schedule, store, int(params.layer), sae.cfg.d_in)
    return run


@torch.no_grad()
def record_step(out: LossOutput, counters: dict[str, torch.Tensor], sums: torch.Tensor, n_tokens: int,
                device: torch.device) -> torch.Tensor:
    """Update the dead-latent counters and add the step's loss, mse, sparsity, l0, aux to `sums`; its l0."""
    # one mask; an int32 sum / count_nonzero: torch's int64 sum of a bool [n, d_sae] took ~10x longer (CPU)
    active = out.codes > 0
    fired = active.sum(0, dtype=torch.int32)
    counters["fire_counts"] += fired
    counters["tokens_since_fire"] += n_tokens
    counters["tokens_since_fire"][fired > 0] = 0
    l0 = torch.count_nonzero(active).double() / n_tokens
    aux = out.aux.detach().double() if out.aux is not None else torch.zeros((), dtype=torch.float64, device=device)
    sums += torch.stack([out.loss.detach().double(), out.mse.detach().double(), out.sparsity.detach().double(),
                         l0, aux])
    return l0


def run_steps(run: Trainee, schedule: BatchSchedule | MixedSchedule, store: ActivationStore, params: TrainSaeParams,
              checkpoint_dir: Path, stop: int, device: torch.device, progress: bool) -> None:
    """Steps [run.start, stop), checkpointing every checkpoint_every steps and at the last step."""
    sae, opt, counters = run.sae, run.opt, run.counters
    steps, batch_size = int(params.steps), int(params.batch_size)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, mse, sparsity, l0, aux since last record
    dead_window = int(params.dead_window)
    n_sum = 0
    log_every = max(1, min(100, steps // 50))
    bar = tqdm(total=steps, initial=run.start, file=sys.stderr, disable=not progress, desc="train_sae", mininterval=2.0)
    precision = precision_context(device, params.precision)
    for step, x in schedule.iter_batches(store, int(params.layer), run.start, stop, device=device):
        if step == 0:  # a fresh run (a resumed one starts at a checkpointed step >= 1)
            sae.init_from_batch(x)
        key = sae.sparsity_param
        lr, l1 = lr_at(step, params), (l1_at(step, params, key) if key else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        with precision:  # autocast on CUDA (bf16); the backward runs outside it, as autocast wants
            out = sae.loss(x, l1, dead_mask=counters["tokens_since_fire"] >= dead_window)
        optimizer_step(sae, opt, out.loss, params.grad_clip)
        l0 = record_step(out, counters, sums, len(x), device)
        n_sum += 1
        done = step + 1
        bar.update(1)
        if done % log_every == 0:
            bar.set_postfix(loss=f"{float(out.loss.detach()):.4g}", l0=f"{float(l0):.1f}", refresh=False)
        if done % params.checkpoint_every == 0 or done == steps:
            avg = (sums / n_sum).tolist()
            run.curve.append({"step": done, "loss": avg[0], "mse": avg[1], "sparsity": avg[2], "l0": avg[3],
                              "aux": avg[4], "lr": lr, "l1_coefficient": l1})
            sums.zero_()
            n_sum = 0
            save_checkpoint(checkpoint_dir, done, sae, opt, counters, {"key": run.key, "input_scale": sae.input_scale,
                                                                        "curve": run.curve, "tokens_seen": done * batch_size},
                            keep=params.keep_checkpoints)
    bar.close()


def final_eval(run: Trainee, store: ActivationStore, split: TokenSplit, params: TrainSaeParams,
               tokens_seen: int) -> tuple[dict[str, Any], torch.Tensor, int]:
    """(held-out metrics, log10 firing frequency per latent, dead window in tokens) of the trained SAE;
    the frequency is taken on the held-out tokens, or on the training tokens when there are none."""
    window = min(int(params.dead_window), tokens_seen)
    with torch.no_grad():
        evals, overall = evaluate_blocks(run.sae, eval_blocks(store, int(params.layer), split), params.dense_threshold,
                                         run.counters["tokens_since_fire"], window)
    if overall.n > 0:
        sparsity = log10_frequency(overall.fire_counts, overall.n)
    else:
        sparsity = log10_frequency(run.counters["fire_counts"], tokens_seen)
    return evals, sparsity, window


def mix_metrics(split: TokenSplit, params: TrainSaeParams) -> dict[str, Any]:
    """Under a balanced / shared mix: the rows per batch and epochs per modality (a short modality's > 1
    sooner: its tokens were drawn again)."""
    shares = mix_shares(params.modality_mix, params.scope, params.include_special)
    if shares is None or split.train_by_modality is None:
        return {}
    counts = batch_counts(shares, int(params.batch_size))
    return {"batch_modality_counts": counts,
            "epochs_by_modality": {m: int(params.steps) * c / max(len(split.train_by_modality[m]), 1)
                                   for m, c in counts.items()}}


def training_metrics(run: Trainee, split: TokenSplit, params: TrainSaeParams, evals: dict[str, Any], window: int,
                     device: torch.device, timings: dict[str, float]) -> dict[str, Any]:
    """metrics.json of a trained SAE."""
    sae, cfg = run.sae, run.sae.cfg
    layer, steps, batch_size = int(params.layer), int(params.steps), int(params.batch_size)
    tokens_seen = steps * batch_size
    ov = evals["overall"]
    return {
        "architecture": cfg.architecture,
        "k": cfg.k,
        "layer": layer,
        "hook_name": hook_name(layer),
        "scope": params.scope,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "steps": steps,
        "batch_size": batch_size,
        "tokens_seen": tokens_seen,
        "n_train_tokens": len(split.train_rows),
        "n_eval_tokens": int(split.eval_in_scope.sum()),
        "n_train_samples": split.n_train_samples,
        "n_eval_samples": split.n_eval_samples,
        "epochs": tokens_seen / max(len(split.train_rows), 1),
        "modality_mix": params.modality_mix,
        **mix_metrics(split, params),
        "input_scale": sae.input_scale,
        "l0": ov["l0"],
        "mse": ov["mse"],
        "centred_fvu": ov["centred_fvu"],
        "dead_fraction": ov["dead_fraction"],
        "dense_fraction": ov["dense_fraction"],
        "dead_fraction_train_window": float((run.counters["tokens_since_fire"] >= window).double().mean()),
        "dead_window_tokens": window,
        "eval": evals,
        "curve": run.curve,
        "final_loss": run.curve[-1]["loss"] if run.curve else None,
        "resumed_from_step": run.resumed_from,
        "device": str(device),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "definitions": {"loss": sae.loss_definition, **METRIC_DEFINITIONS},
    }


def train_sae(store: ActivationStore, params: TrainSaeParams, out_dir: str | Path, checkpoint_dir: str | Path,
              *, metadata: dict[str, Any] | None = None, stop_after: int | None = None,
              progress: bool = True) -> dict[str, Any] | None:
    """Train an SAE on `store` per the `train_sae` config slice; write out_dir/sae/ and out_dir/metrics.json.

    metadata: extra cfg.json metadata (e.g. model_name). stop_after: stop once this many steps are done
    (after checkpointing), returning None and writing nothing to out_dir - a kill, for tests.
    Returns the metrics dict (also written to metrics.json).
    """
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    layer, steps, batch_size = int(params.layer), int(params.steps), int(params.batch_size)
    store.array(layer)  # InputError if the layer was not extracted
    device = resolve_device(params.device)
    shares = mix_shares(params.modality_mix, params.scope, params.include_special)
    split = select_tokens(store.token_columns(["row", "sample_id", "modality"]), params.scope, params.include_special,
                          params.eval_fraction, by_modality=shares is not None)
    schedule = make_schedule(split.train_rows, split.train_by_modality, store.n_tokens, store.chunk_tokens,
                             params.buffer_chunks, batch_size, params.seed, shares)
    run = start_or_resume(new_sae(store, params, device, metadata), store, params, schedule, checkpoint_dir, device)
    log.info("train_sae: layer %d, %d train / %d eval tokens, d_in %d, d_sae %d, input scale %.4g, device %s",
             layer, len(split.train_rows), len(split.eval_rows), run.sae.cfg.d_in, run.sae.cfg.d_sae,
             run.sae.input_scale, device)

    stop = steps if stop_after is None else min(steps, stop_after)
    t_train = time.perf_counter()
    run_steps(run, schedule, store, params, checkpoint_dir, stop, device, progress)
    timings["train"] = time.perf_counter() - t_train
    if max(run.start, stop) < steps:
        return None

    t_eval = time.perf_counter()
    evals, sparsity, window = final_eval(run, store, split, params, steps * batch_size)
    timings["eval"] = time.perf_counter() - t_eval
    t_save = time.perf_counter()
    save_sae(run.sae, out_dir / Files.SAE_DIR, sparsity)
    timings["save"] = time.perf_counter() - t_save
    timings["total"] = time.perf_counter() - t_start
    metrics = training_metrics(run, split, params, evals, window, device, timings)
    write_json(out_dir / Files.METRICS, metrics)
    return metrics
