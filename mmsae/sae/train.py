"""Training an SAE on an extracted activation store, resumable and bit-reproducible.

Tokens: the rows of `layer` whose modality is in scope (`all` = image + text = SAE-V, `text` = SAE),
plus special tokens if `include_special`. A stable hash of sample_id holds out `eval_fraction` of the
SAMPLES (all their tokens) for evaluation.

Batches: the store's rows are cut into groups of >= `buffer_chunks` zarr chunks (extended until a group
holds at least one batch of training tokens). Each epoch visits the groups in an order drawn from
(seed, epoch) and shuffles each group's training tokens with an RNG seeded by (seed, epoch, group);
batches never straddle groups and a group's remainder (< batch_size tokens) is skipped that epoch. The
batch at step s is therefore a pure function of (seed, s), memory is bounded by one group (plus one
prefetched), and a resumed run sees exactly the batches an uninterrupted run sees. The store may be
one zarr array or the parts of a sharded extraction: rows are rows either way.

On CUDA: the prefetch thread moves the next group to the GPU (store dtype, pinned memory, a side
stream) while the SAE steps on the current one, and `train_sae.precision` picks bf16 autocast / TF32 /
strict fp32 for the SAE forward; weights, Adam state and checkpoints stay fp32. CPU runs are fp32.

Checkpoints (every `checkpoint_every` steps and at the end of training) go to
`checkpoint_dir/step-XXXXXXXX/` = state.safetensors (weights, Adam moments and step counts, dead-latent
counters) + state.json (step, input scale, loss curve, compatibility key), written atomically. A rerun
with the same params and store resumes from the latest one; nothing is ever unpickled.

Architectures come from the registry in model.py (`train_sae.architecture`). A step is
`optimizer_step`: backward, the SAE's `before_optimizer_step` hook (topk: remove the decoder-gradient
component parallel to the rows), gradient clipping, Adam, `after_optimizer_step` (topk: unit-norm decoder
rows). A fresh run calls `init_from_batch` on the batch of step 0 (topk: b_dec = geometric median). The
loss gets `dead_mask` = latents that have not fired for `dead_window` training tokens (topk: AuxK); the
counters behind it are checkpointed, so a resumed run stays bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmsae import __version__
from mmsae.activations import ActivationStore, storage_to_float
from mmsae.artifacts import Files, atomic_dir, config_hash, write_json
from mmsae.device import resolve_device
from mmsae.errors import InputError
from mmsae.sae.io import check_d_in, hook_name, load_sae, log10_frequency, save_sae
from mmsae.sae.metrics import evaluate_blocks
from mmsae.sae.model import ARCHITECTURES, SAE, SAEConfig, build_sae

log = logging.getLogger("mmsae.sae")

SCOPES = {"all": ("image", "text"), "text": ("text",)}
NORM_ESTIMATE_BATCHES = 16  # batches (from step 0 on) used to estimate the input scale
EVAL_BLOCK_TOKENS = 4096
CHECKPOINT_FORMAT = 1


PRECISIONS = ("bf16", "tf32", "fp32")


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The SAE forward's numeric mode (config train_sae.precision), on CUDA only; CPU runs stay fp32.

    bf16: autocast to bfloat16 (matmuls in bf16, reductions and the weights / Adam state in fp32) plus
    TF32 for the fp32 matmuls that remain; tf32: fp32 with TF32 matmuls; fp32: strict fp32 (the paper)."""
    if precision not in PRECISIONS:
        raise InputError("--params", "precision", f"unknown precision {precision!r} (have {list(PRECISIONS)})")
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- token selection -------------------------------------------------------------------------------
def sample_unit(sample_ids: np.ndarray) -> np.ndarray:
    """A stable pseudo-uniform number in [0, 1) per sample id (blake2b; independent of seed and order)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "big") / 2.0**64 for s in sample_ids],
        dtype=np.float64,
    )


@dataclass
class TokenSplit:
    train_rows: np.ndarray  # sorted store rows used for training (in scope, training samples)
    eval_rows: np.ndarray  # sorted store rows of held-out samples (image/text tokens, special if included)
    eval_modality: np.ndarray  # modality of each eval row
    eval_in_scope: np.ndarray  # whether each eval row is of a modality the SAE is trained on
    n_train_samples: int
    n_eval_samples: int


def select_tokens(tokens: pd.DataFrame, scope: str, include_special: bool, eval_fraction: float) -> TokenSplit:
    """Split the store's token index into training rows and held-out evaluation rows (by sample)."""
    if scope not in SCOPES:
        raise InputError("--params", "scope", f"unknown scope {scope!r} (have {sorted(SCOPES)})")
    modalities = SCOPES[scope] + (("special",) if include_special else ())
    evaluable = ("image", "text") + (("special",) if include_special else ())
    if not tokens["row"].is_monotonic_increasing:
        tokens = tokens.sort_values("row", kind="stable")
    rows = tokens["row"].to_numpy(np.int64)
    mod = tokens["modality"].astype(str).to_numpy()
    inv, uniq = pd.factorize(tokens["sample_id"].astype(str))  # hash-based: fast on 1e8 tokens
    unit = sample_unit(np.asarray(uniq))
    is_eval = unit < eval_fraction
    if eval_fraction > 0 and not is_eval.any() and len(uniq) >= 2:
        is_eval[np.argmin(unit)] = True  # tiny stores: still hold out one sample
    if is_eval.all() and len(uniq):
        is_eval[np.argmax(unit)] = False
    tok_eval = is_eval[inv]
    train_sel = ~tok_eval & np.isin(mod, modalities)
    eval_sel = tok_eval & np.isin(mod, evaluable)
    return TokenSplit(
        train_rows=rows[train_sel],
        eval_rows=rows[eval_sel],
        eval_modality=mod[eval_sel],
        eval_in_scope=np.isin(mod[eval_sel], modalities),
        n_train_samples=int((~is_eval).sum()),
        n_eval_samples=int(is_eval.sum()),
    )


# ---- deterministic batch stream ----------------------------------------------------------------------
class BatchSchedule:
    """Maps a step to its batch of store rows; see the module docstring."""

    def __init__(self, train_rows: np.ndarray, n_rows: int, chunk_tokens: int, buffer_chunks: int,
                 batch_size: int, seed: int) -> None:
        self.rows = np.asarray(train_rows, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed % 2**32
        n_chunks = math.ceil(n_rows / chunk_tokens)
        edges = np.searchsorted(self.rows, np.arange(n_chunks + 1, dtype=np.int64) * chunk_tokens)
        spans: list[tuple[int, int]] = []
        first = 0
        for c in range(1, n_chunks + 1):
            if c - first >= buffer_chunks and edges[c] - edges[first] >= batch_size:
                spans.append((first, c))
                first = c
        if first < n_chunks:
            if spans and edges[n_chunks] - edges[first] < batch_size:
                spans[-1] = (spans[-1][0], n_chunks)
            else:
                spans.append((first, n_chunks))
        # (index range into train rows, store row range) per group
        self.groups = [(int(edges[a]), int(edges[b]), a * chunk_tokens, min(b * chunk_tokens, n_rows)) for a, b in spans]
        self.counts = np.array([(i1 - i0) // batch_size for i0, i1, _, _ in self.groups], dtype=np.int64)
        self.per_epoch = int(self.counts.sum())
        if self.per_epoch == 0:
            raise InputError("--params", "batch_size", f"batch_size {batch_size} exceeds the {len(self.rows)} training tokens")
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))}
        return self._orders[epoch]

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, group, batch index within the group) of `step`."""
        epoch, k = divmod(step, self.per_epoch)
        order = self.order(epoch)
        cum = np.cumsum(self.counts[order])
        pos = int(np.searchsorted(cum, k, side="right"))
        return epoch, int(order[pos]), int(k - (cum[pos - 1] if pos else 0))

    def permutation(self, epoch: int, group: int) -> np.ndarray:
        i0, i1, _, _ = self.groups[group]
        return np.random.default_rng([self.seed, epoch, group]).permutation(i1 - i0)

    def batch_rows(self, step: int) -> np.ndarray:
        """Store rows of the batch at `step` (for tests and debugging)."""
        epoch, g, b = self.locate(step)
        perm = self.permutation(epoch, g)[b * self.batch_size : (b + 1) * self.batch_size]
        return self.rows[self.groups[g][0] + perm]

    def _load(self, store: ActivationStore, layer: int, group: int) -> np.ndarray:
        i0, i1, r0, r1 = self.groups[group]
        return store.read(layer, r0, r1)[self.rows[i0:i1] - r0]

    def _load_to(self, store: ActivationStore, layer: int, group: int, device: torch.device,
                 stream: Any = None) -> torch.Tensor:
        """The group's training rows as float32 on `device`. On CUDA the rows travel in the store's dtype
        (bf16: half the bytes) from pinned memory on a side stream and are converted on the GPU; this
        runs in the prefetch thread, so the copy overlaps the SAE steps on the current group."""
        if device.type != "cuda":
            return torch.from_numpy(self._load(store, layer, group)).to(device)
        i0, i1, r0, r1 = self.groups[group]
        raw = store.read_raw(layer, r0, r1)[self.rows[i0:i1] - r0]
        pinned = torch.from_numpy(np.ascontiguousarray(raw)).pin_memory()
        with torch.cuda.stream(stream):
            data = storage_to_float(pinned.to(device, non_blocking=True), store.dtype)
        stream.synchronize()  # in the prefetch thread: the consumer gets a finished tensor
        return data

    def iter_batches(self, store: ActivationStore, layer: int, start: int, stop: int,
                     device: torch.device | None = None) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        """(step, batch [batch_size, d]) for steps [start, stop): numpy arrays, or float32 tensors on
        `device` when given. The next group is read (and moved to the device) in a background thread
        while the current one is consumed; the batches are the same either way."""
        pool = ThreadPoolExecutor(max_workers=1)
        pending: dict[tuple[int, int], Future] = {}
        stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None

        def load(group: int) -> Future:
            if device is None:
                return pool.submit(self._load, store, layer, group)
            return pool.submit(self._load_to, store, layer, group, device, stream)

        try:
            step = start
            while step < stop:
                epoch, g, b = self.locate(step)
                fut = pending.pop((epoch, g), None) or load(g)
                data = fut.result()
                perm = self.permutation(epoch, g)
                if device is not None:
                    if stream is not None:  # made on the side stream, used on the current one
                        data.record_stream(torch.cuda.current_stream(device))
                    perm = torch.from_numpy(perm).to(device)
                end = min(stop, step + int(self.counts[g]) - b)
                if end < stop:
                    e2, g2, _ = self.locate(end)
                    pending[(e2, g2)] = load(g2)
                for s in range(step, end):
                    bb = b + s - step
                    yield s, data[perm[bb * self.batch_size : (bb + 1) * self.batch_size]]
                step = end
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---- schedules -------------------------------------------------------------------------------------
def lr_at(step: int, params: dict[str, Any]) -> float:
    """Linear warm-up over lr_warmup_steps, constant, linear decay to 0 over the last lr_decay_steps."""
    f = 1.0
    if params["lr_warmup_steps"] > 0:
        f = min(f, (step + 1) / params["lr_warmup_steps"])
    if params["lr_decay_steps"] > 0:
        f = min(f, (params["steps"] - step) / params["lr_decay_steps"])
    return params["lr"] * max(f, 0.0)


def optimizer_step(sae: SAE, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One update: backward, the SAE's gradient hook, clipping to grad_clip, the step, the weight hook."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.before_optimizer_step()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    sae.after_optimizer_step()


def l1_at(step: int, params: dict[str, Any]) -> float:
    """L1 coefficient, linearly warmed up over l1_warmup_steps."""
    if params["l1_warmup_steps"] > 0:
        return params["l1_coefficient"] * min(1.0, (step + 1) / params["l1_warmup_steps"])
    return params["l1_coefficient"]


# ---- checkpoints -----------------------------------------------------------------------------------
def _checkpoint_key(params: dict[str, Any], store: ActivationStore) -> str:
    p = {k: v for k, v in params.items() if k != "device"}
    return config_hash(p, [store.folder.resolve().name, f"d_model={store.d_model}", f"n_tokens={store.n_tokens}"], 16)


def save_checkpoint(checkpoint_dir: Path, step: int, sae: SAE, opt: torch.optim.Optimizer,
                    counters: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    names = [n for n, _ in sae.named_parameters()]
    for n, p in sae.named_parameters():
        tensors[f"sae.{n}"] = p.detach()
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
    for old in checkpoint_dir.glob("step-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def _restore(sae: SAE, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
             counters: dict[str, torch.Tensor]) -> None:
    names = [n for n, _ in sae.named_parameters()]
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(tensors[f"sae.{n}"])
    sd = opt.state_dict()
    sd["state"] = {}
    for i, n in enumerate(names):
        entry = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{n}.")}
        if entry:
            sd["state"][i] = entry
    opt.load_state_dict(sd)
    for k, v in counters.items():
        v.copy_(tensors[f"counter.{k}"])


# ---- training --------------------------------------------------------------------------------------
def estimate_input_scale(schedule: BatchSchedule, store: ActivationStore, layer: int, d_in: int) -> float:
    """sqrt(d_in) / mean ||x|| over the first NORM_ESTIMATE_BATCHES training batches."""
    total, n = 0.0, 0
    for _, xb in schedule.iter_batches(store, layer, 0, min(NORM_ESTIMATE_BATCHES, schedule.per_epoch)):
        total += float(np.linalg.norm(xb.astype(np.float64), axis=1).sum())
        n += len(xb)
    mean = total / max(n, 1)
    return math.sqrt(d_in) / mean if mean > 0 else 1.0


def eval_blocks(store: ActivationStore, layer: int, split: TokenSplit) -> Iterator[tuple]:
    """The held-out tokens as (activations, modality, in-scope mask) blocks for evaluate_blocks."""
    for i in range(0, len(split.eval_rows), EVAL_BLOCK_TOKENS):
        rows = split.eval_rows[i : i + EVAL_BLOCK_TOKENS]
        yield (torch.from_numpy(store.read_rows(layer, rows)), split.eval_modality[i : i + EVAL_BLOCK_TOKENS],
               split.eval_in_scope[i : i + EVAL_BLOCK_TOKENS])


def import_sae(store: ActivationStore, params: dict[str, Any], source: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Use a published SAE (SAELens layout, safetensors) instead of training one: check that it fits the
    store (d_in, hook layer), evaluate it on the same held-out split a trained SAE gets, and save it in
    our layout with its sparsity on that split. Writes out_dir/sae/ and out_dir/metrics.json."""
    out_dir = Path(out_dir)
    layer = int(params["layer"])
    store.array(layer)
    sae = load_sae(source, device=resolve_device(params["device"]))
    check_d_in(sae, store.d_model, source)
    hooked = sae.cfg.metadata.get("hook_layer")
    if hooked is not None and int(hooked) != layer:
        raise InputError(Path(source) / Files.SAE_CFG, "hook_layer", f"SAE hooks layer {hooked}, config train_sae.layer is {layer}")
    sae.cfg.metadata.update(hook_layer=layer, hook_name=hook_name(layer), pretrained=str(source))
    split = select_tokens(store.tokens, params["scope"], params["include_special"], params["eval_fraction"])
    t0 = time.perf_counter()
    with torch.no_grad():
        evals, overall = evaluate_blocks(sae, eval_blocks(store, layer, split), params["dense_threshold"])
    save_sae(sae, out_dir / "sae", log10_frequency(overall.fire_counts, overall.n) if overall.n else None)
    ov = evals["overall"]
    metrics = {
        "pretrained": str(source), "architecture": sae.cfg.architecture, "layer": layer, "hook_name": hook_name(layer),
        "scope": params["scope"], "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "steps": 0, "tokens_seen": 0,
        "n_train_tokens": 0, "n_eval_tokens": int(split.eval_in_scope.sum()), "resumed_from_step": None,
        **{k: ov[k] for k in ("l0", "mse", "centred_fvu", "dead_fraction", "dense_fraction")},
        "eval": evals, "timings_s": {"eval": round(time.perf_counter() - t0, 3)},
    }
    write_json(out_dir / Files.METRICS, metrics)
    return metrics


def train_sae(store: ActivationStore, params: dict[str, Any], out_dir: str | Path, checkpoint_dir: str | Path,
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
    layer, steps, batch_size = int(params["layer"]), int(params["steps"]), int(params["batch_size"])
    store.array(layer)  # InputError if the layer was not extracted
    device = resolve_device(params["device"])
    split = select_tokens(store.tokens, params["scope"], params["include_special"], params["eval_fraction"])
    schedule = BatchSchedule(split.train_rows, store.n_tokens, store.chunk_tokens, params["buffer_chunks"],
                             batch_size, params["seed"])
    d_in = store.d_model
    d_sae = max(1, int(round(params["expansion"] * d_in)))
    arch = params["architecture"]
    if arch not in ARCHITECTURES:
        raise InputError("--params", "architecture", f"unknown SAE architecture {arch!r} (have {sorted(ARCHITECTURES)})")
    sae_cls = ARCHITECTURES[arch]
    k = None
    if arch == "topk":
        k = int(params["k"])
        if k > d_sae:
            raise InputError("--params", "k", f"k={k} exceeds d_sae={d_sae} (expansion {params['expansion']} x d_in {d_in})")
    apply_b_dec = params.get("apply_b_dec_to_input")
    if apply_b_dec is None:
        apply_b_dec = sae_cls.default_apply_b_dec_to_input
    positions = store.tokens["position"]
    meta: dict[str, Any] = {
        "model_name": "unknown",
        "hook_name": hook_name(layer),
        "hook_layer": layer,
        "hook_head_index": None,
        "context_size": int(positions.max()) + 1 if len(positions) else 0,
        "prepend_bos": True,
        "dataset_path": str(store.folder),
        "dataset_trust_remote_code": False,
        **(metadata or {}),
        "scope": params["scope"],
        "include_special": params["include_special"],
        "l1_coefficient": params["l1_coefficient"] if sae_cls.uses_l1 else None,
        "normalize": params["normalize"],
        "scale_inputs": params["scale_inputs"],
        "train_params": {k: v for k, v in params.items() if k != "device"},
        "mmsae_version": __version__,
    }
    cfg = SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, device=str(device),
        apply_b_dec_to_input=bool(apply_b_dec),
        normalize_activations="constant_norm_rescale" if params["normalize"] == "token" else "none",
        metadata=meta, k=k,
    )
    sae = build_sae(cfg, seed=params["seed"]).to(device)
    sae.configure_training(params)
    if arch == "topk":
        meta.update(k=k, aux_k=sae.aux_k, aux_coefficient=sae.aux_coefficient)
    opt = torch.optim.Adam(sae.parameters(), lr=params["lr"], betas=(0.9, 0.999))
    counters = {
        "tokens_since_fire": torch.zeros(d_sae, dtype=torch.int64, device=device),
        "fire_counts": torch.zeros(d_sae, dtype=torch.int64, device=device),
    }
    key = _checkpoint_key(params, store)
    curve: list[dict[str, float]] = []
    start, resumed_from = 0, None
    ck = latest_checkpoint(checkpoint_dir, key)
    if ck is not None:
        state, tensors = ck
        _restore(sae, opt, tensors, counters)
        start = resumed_from = int(state["step"])
        sae.input_scale = float(state["input_scale"])
        curve = list(state["curve"])
        log.info("train_sae: resuming from %s at step %d", checkpoint_dir, start)
    elif params["scale_inputs"] and params["normalize"] == "none":
        sae.input_scale = estimate_input_scale(schedule, store, layer, d_in)
    log.info("train_sae: layer %d, %d train / %d eval tokens, d_in %d, d_sae %d, input scale %.4g, device %s",
             layer, len(split.train_rows), len(split.eval_rows), d_in, d_sae, sae.input_scale, device)

    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, mse, sparsity, l0, aux since last record
    dead_window = int(params["dead_window"])
    n_sum = 0
    log_every = max(1, min(100, steps // 50))
    stop = steps if stop_after is None else min(steps, stop_after)
    t_train = time.perf_counter()
    bar = tqdm(total=steps, initial=start, file=sys.stderr, disable=not progress, desc="train_sae", mininterval=2.0)
    precision = precision_context(device, params["precision"])
    for step, x in schedule.iter_batches(store, layer, start, stop, device=device):
        if step == 0:  # a fresh run (a resumed one starts at a checkpointed step >= 1)
            sae.init_from_batch(x)
        lr, l1 = lr_at(step, params), (l1_at(step, params) if sae.uses_l1 else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        with precision:  # autocast on CUDA (bf16); the backward runs outside it, as autocast wants
            out = sae.loss(x, l1, dead_mask=counters["tokens_since_fire"] >= dead_window)
        optimizer_step(sae, opt, out.loss, params["grad_clip"])
        with torch.no_grad():
            # one mask; an int32 sum / count_nonzero: torch's int64 sum of a bool [n, d_sae] took ~10x longer (CPU)
            active = out.codes > 0
            fired = active.sum(0, dtype=torch.int32)
            counters["fire_counts"] += fired
            counters["tokens_since_fire"] += len(x)
            counters["tokens_since_fire"][fired > 0] = 0
            l0 = torch.count_nonzero(active).double() / len(x)
            aux = out.aux.detach().double() if out.aux is not None else torch.zeros((), dtype=torch.float64, device=device)
            sums += torch.stack([out.loss.detach().double(), out.mse.detach().double(), out.sparsity.detach().double(),
                                 l0, aux])
            n_sum += 1
        done = step + 1
        bar.update(1)
        if done % log_every == 0:
            bar.set_postfix(loss=f"{float(out.loss.detach()):.4g}", l0=f"{float(l0):.1f}", refresh=False)
        if done % params["checkpoint_every"] == 0 or done == steps:
            avg = (sums / n_sum).tolist()
            curve.append({"step": done, "loss": avg[0], "mse": avg[1], "sparsity": avg[2], "l0": avg[3],
                          "aux": avg[4], "lr": lr, "l1_coefficient": l1})
            sums.zero_()
            n_sum = 0
            save_checkpoint(checkpoint_dir, done, sae, opt, counters,
                            {"key": key, "input_scale": sae.input_scale, "curve": curve, "tokens_seen": done * batch_size})
    bar.close()
    timings["train"] = time.perf_counter() - t_train
    done_steps = max(start, stop)
    if done_steps < steps:
        return None

    t_eval = time.perf_counter()
    tokens_seen = steps * batch_size
    window = min(dead_window, tokens_seen)

    with torch.no_grad():
        evals, overall = evaluate_blocks(sae, eval_blocks(store, layer, split), params["dense_threshold"],
                                         counters["tokens_since_fire"], window)
    if overall.n > 0:
        sparsity = log10_frequency(overall.fire_counts, overall.n)
    else:
        sparsity = log10_frequency(counters["fire_counts"], tokens_seen)
    timings["eval"] = time.perf_counter() - t_eval

    t_save = time.perf_counter()
    save_sae(sae, out_dir / "sae", sparsity)
    timings["save"] = time.perf_counter() - t_save
    timings["total"] = time.perf_counter() - t_start
    ov = evals["overall"]
    metrics: dict[str, Any] = {
        "architecture": cfg.architecture,
        "k": k,
        "layer": layer,
        "hook_name": hook_name(layer),
        "scope": params["scope"],
        "d_in": d_in,
        "d_sae": d_sae,
        "steps": steps,
        "batch_size": batch_size,
        "tokens_seen": tokens_seen,
        "n_train_tokens": len(split.train_rows),
        "n_eval_tokens": int(split.eval_in_scope.sum()),
        "n_train_samples": split.n_train_samples,
        "n_eval_samples": split.n_eval_samples,
        "epochs": tokens_seen / max(len(split.train_rows), 1),
        "input_scale": sae.input_scale,
        "l0": ov["l0"],
        "mse": ov["mse"],
        "centred_fvu": ov["centred_fvu"],
        "dead_fraction": ov["dead_fraction"],
        "dense_fraction": ov["dense_fraction"],
        "dead_fraction_train_window": float((counters["tokens_since_fire"] >= window).double().mean()),
        "dead_window_tokens": window,
        "eval": evals,
        "curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "resumed_from_step": resumed_from,
        "device": str(device),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "definitions": {
            "loss": sae.loss_definition,
            "curve": "loss, mse (normalised space), sparsity, l0 and aux (auxiliary loss before its coefficient; "
                     "0 without one) averaged over the steps since the previous checkpoint",
            "l0": "mean number of latents > 0 per token",
            "mse": "mean over tokens of the squared error summed over d_in (raw activation scale)",
            "centred_fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens",
            "dead_fraction": "never fired on the eval tokens nor in the last dead_window_tokens training tokens",
            "dense_fraction": "firing frequency on the eval tokens > dense_threshold",
            "overall": "held-out tokens of the trained scope; per-modality entries cover all held-out tokens",
        },
    }
    write_json(out_dir / Files.METRICS, metrics)
    return metrics
