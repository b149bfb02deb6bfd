"""SAE checkpoints in the SAELens folder layout (safetensors only; pickles are never loaded).

    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations ("none" | "constant_norm_rescale"), metadata {...}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    sparsity.safetensors      key "sparsity": log10 firing frequency per latent (optional)

Our `relu` architecture is SAELens' "standard"; cfg.json says "standard" so SAELens loads it. `jumprelu`,
`batchtopk` and `matryoshka_batchtopk` are written as SAELens 6 writes them for inference: architecture
"jumprelu" plus a `threshold` tensor [d_sae] in sae_weights.safetensors (BatchTopK's one threshold repeated
per latent), the training architecture and its options in metadata.training_architecture(_details);
`metadata.mmsae_architecture` brings ours back as the class it was trained as (a SAELens-published
BatchTopK loads as our jumprelu: the same inference). Our `topk`
is SAELens' "topk": cfg.json has `k` at the top level (SAELens 6 TopKSAEConfig.k) and
`rescale_acts_by_decoder_norm: false`, plus `activation_fn_str: "topk"` / `activation_fn_kwargs: {k}` for
readers of the pre-6 layout. Loading also accepts a SAELens TopK with `rescale_acts_by_decoder_norm: true`
(its decoder norms are folded into W_enc, b_enc and W_dec, which gives the same codes and reconstruction)
and a pre-6 file with `activation_fn_str: "topk"`. The LLM
fields (model_name, hook_name, hook_layer, context_size, ...) are written both inside `metadata`
(SAELens >= 6) and at the top level (SAELens < 6 reads them there; SAELens 6 converts such a file).
`load_sae` reads our files, SAELens 6 files and older 3.x-5.x files (hook_point, hook_point_layer, ...).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmsae import __version__
from mmsae.artifacts import Files, require_finished, write_json
from mmsae.errors import InputError
from mmsae.sae.model import SAE, SAEConfig, build_sae

# our architecture name <-> SAELens' name (of the saved, inference SAE: SAELens saves BatchTopK and
# Matryoshka BatchTopK as JumpReLU with one threshold; metadata.training_architecture keeps the training name)
TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
              "matryoshka_batchtopk": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                "matryoshka_batchtopk": "matryoshka_batchtopk"}
THRESHOLD_ARCHS = ("jumprelu", "batchtopk", "matryoshka_batchtopk")  # a `threshold` tensor [d_sae] in the file
# LLM fields SAELens < 6 keeps at the top level of cfg.json (SAELens 6 moved them into metadata)
LEGACY_TOP_LEVEL = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                    "dataset_path", "dataset_trust_remote_code", "model_from_pretrained_kwargs",
                    "sae_lens_training_version", "neuronpedia_id", "seqpos_slice")
LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "hook_point_head_index": "hook_head_index"}


def hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after decoder layer `layer` (0-based)."""
    return f"blocks.{layer}.hook_resid_post"


def sae_folder(path: str | os.PathLike) -> Path:
    """The folder holding cfg.json: `path` itself, or `path/sae` for a train_sae artifact folder."""
    path = Path(path)
    if not (path / Files.SAE_CFG).exists() and (path / Files.SAE_DIR / Files.SAE_CFG).exists():
        require_finished(path)
        return path / Files.SAE_DIR
    return path


def save_sae(sae: SAE, folder: str | os.PathLike, sparsity: torch.Tensor | None = None) -> Path:
    """Write `sae` (input scale folded into the weights) in the SAELens layout; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folded = sae.fold_input_scale()
    cfg = folded.cfg
    meta = dict(cfg.metadata)
    meta.setdefault("mmsae_version", __version__)
    meta["mmsae_architecture"] = cfg.architecture
    meta["input_scale_folded"] = float(sae.input_scale)
    doc: dict[str, Any] = {
        "architecture": TO_SAELENS.get(cfg.architecture, cfg.architecture),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "activation_fn_str": "relu",
        "finetuning_scaling_factor": False,
        "metadata": meta,
    }
    if cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
        doc["k"] = cfg.k  # ignored by SAELens' JumpReLU config; read back by load_sae
    if cfg.architecture == "topk":
        # folding the input scale leaves the pre-activations (hence the top k) unchanged; the saved W_dec
        # rows have norm 1 / input_scale, so the selection must not be rescaled by decoder norms
        doc.update(k=cfg.k, rescale_acts_by_decoder_norm=False, activation_fn_str="topk",
                   activation_fn_kwargs={"k": cfg.k})
    for key in LEGACY_TOP_LEVEL:
        if key in meta:
            doc[key] = meta[key]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in folded.weights().items()}
    save_file(tensors, str(folder / Files.SAE_WEIGHTS))
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().to("cpu", torch.float32).contiguous()}, str(folder / Files.SAE_SPARSITY))
    write_json(folder / Files.SAE_CFG, doc)
    return folder


def _normalisation(value: Any, cfg_path: Path) -> str:
    if value is None or value is False:
        return "none"
    if value is True or value == "expected_average_only_in":
        # SAELens folds this estimate into the weights at save time; it is the identity at inference
        return "none"
    if value in ("none", "constant_norm_rescale"):
        return value
    raise InputError(cfg_path, "normalize_activations", f"unsupported value {value!r} (have none, constant_norm_rescale)")


def read_cfg(folder: str | os.PathLike) -> SAEConfig:
    """Parse a cfg.json of ours or of any SAELens version into an SAEConfig."""
    folder = sae_folder(folder)
    cfg_path = folder / Files.SAE_CFG
    if not cfg_path.exists():
        raise InputError(cfg_path, Files.SAE_CFG, "not an SAE folder (cfg.json missing)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(cfg_path, Files.SAE_CFG, f"unreadable JSON ({exc.__class__.__name__})") from exc
    raw = {LEGACY_RENAMES.get(k, k): v for k, v in raw.items()}
    meta = {LEGACY_RENAMES.get(k, k): v for k, v in (raw.get("metadata") or {}).items()}
    for key in LEGACY_TOP_LEVEL:
        if key in raw and key not in meta:
            meta[key] = raw[key]
    arch_raw = meta.get("mmsae_architecture") or raw.get("architecture", "standard")
    if arch_raw not in FROM_SAELENS:
        raise InputError(cfg_path, "architecture", f"unsupported SAE architecture {arch_raw!r} (have {sorted(FROM_SAELENS)})")
    arch = FROM_SAELENS[arch_raw]
    act = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    if act == "topk" and arch == "relu":  # SAELens < 6: a "standard" SAE with a topk activation
        arch = "topk"
    if act not in (None, "relu", "topk"):
        raise InputError(cfg_path, "activation_fn", f"unsupported activation {act!r} for a {arch_raw} SAE")
    k = None
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        details = meta.get("training_architecture_details") or {}
        k = raw.get("k", meta.get("k", details.get("k") if isinstance(details, dict) else None))
        if isinstance(k, float) and k.is_integer():
            k = int(k)
    if arch == "topk":
        kwargs = raw.get("activation_fn_kwargs") or {}
        k = raw.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk") and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise InputError(cfg_path, "k", f"missing or not a positive integer (a {arch} SAE needs k)")
    for key in ("d_in",):
        if not isinstance(raw.get(key), int):
            raise InputError(cfg_path, key, "missing or not an integer")
    d_sae = raw.get("d_sae")
    if d_sae is None and isinstance(raw.get("expansion_factor"), int | float):
        d_sae = int(raw["d_in"] * raw["expansion_factor"])
    if not isinstance(d_sae, int):
        raise InputError(cfg_path, "d_sae", "missing or not an integer")
    if k is not None and k > d_sae:
        raise InputError(cfg_path, "k", f"k={k} exceeds d_sae={d_sae}")
    if meta.get("hook_layer") is None and isinstance(meta.get("hook_name"), str):
        m = re.match(r"blocks\.(\d+)\.", meta["hook_name"])
        if m:
            meta["hook_layer"] = int(m.group(1))
    return SAEConfig(
        d_in=raw["d_in"],
        d_sae=d_sae,
        architecture=arch,
        dtype="float32",
        device=str(raw.get("device", "cpu")),
        # SAELens' default for configs that predate the field
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=_normalisation(raw.get("normalize_activations", "none"), cfg_path),
        metadata=meta,
        k=k,
    )


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str = "float32") -> SAE:
    """Load an SAE folder (ours or SAELens-published; safetensors only) onto `device`.

    `path` may also be a train_sae artifact folder (its `sae/` subfolder is used). The returned module has
    `.source` = the folder it came from and `.cfg.metadata` with hook_name / hook_layer where known.
    """
    folder = sae_folder(path)
    cfg = read_cfg(folder)
    cfg.dtype = dtype
    wpath = folder / Files.SAE_WEIGHTS
    if not wpath.exists():
        pickles = sorted(p.name for p in folder.glob("*.p*t"))
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise InputError(wpath, Files.SAE_WEIGHTS, f"missing{hint}")
    with safe_open(str(wpath), framework="pt", device="cpu") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture in THRESHOLD_ARCHS:
        if "threshold" not in state and "log_threshold" in state:  # SAELens < 6.x JumpReLU training checkpoints
            state["threshold"] = state.pop("log_threshold").double().exp().float()
        expected["threshold"] = (cfg.d_sae,)
    for key, shape in expected.items():
        if key not in state:
            raise InputError(wpath, key, "tensor missing")
        if tuple(state[key].shape) != shape:
            raise InputError(wpath, key, f"shape {tuple(state[key].shape)} does not match cfg.json ({shape})")
    for key in ("scaling_factor", "finetuning_scaling_factor"):  # SAELens' fine-tuning scale: f * s before decode
        if key in state:
            state["W_dec"] = state["W_dec"] * state.pop(key).to(state["W_dec"].dtype)[:, None]
    if cfg.architecture == "topk" and json.loads((folder / Files.SAE_CFG).read_text()).get("rescale_acts_by_decoder_norm"):
        # SAELens TopK with rescale_acts_by_decoder_norm: top k of pre * n, decoded as (f / n) @ W_dec, n = ||W_dec,i||.
        # Folding n: W_enc * n, b_enc * n, W_dec / n gives the same codes and reconstruction (SAELens _fold_norm_topk).
        n = state["W_dec"].double().norm(dim=1)
        state["W_enc"] = (state["W_enc"].double() * n[None, :]).to(state["W_enc"].dtype)
        state["b_enc"] = (state["b_enc"].double() * n).to(state["b_enc"].dtype)
        state["W_dec"] = (state["W_dec"].double() / n[:, None]).to(state["W_dec"].dtype)
    sae = build_sae(cfg, seed=None)
    with torch.no_grad():
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, key).copy_(state[key].to(getattr(torch, dtype)))
        if cfg.architecture == "jumprelu":
            sae.threshold.copy_(state["threshold"].to(getattr(torch, dtype)))
        elif cfg.architecture in THRESHOLD_ARCHS:  # BatchTopK: one threshold for every latent
            thr = state["threshold"].double()
            if thr.numel() and not torch.equal(thr, thr[:1].expand_as(thr)):
                raise InputError(wpath, "threshold", f"a {cfg.architecture} SAE has one threshold, found several")
            sae.topk_threshold.fill_(float(thr[0]) if thr.numel() else 0.0)
    sae.source = folder
    return sae.to(device)


def load_sparsity(path: str | os.PathLike) -> torch.Tensor | None:
    """log10 firing frequencies from sparsity.safetensors, or None if the folder has none."""
    p = sae_folder(path) / Files.SAE_SPARSITY
    if not p.exists():
        return None
    with safe_open(str(p), framework="pt", device="cpu") as fh:
        return fh.get_tensor("sparsity")


def check_d_in(sae: SAE, d_model: int, source: str | os.PathLike) -> None:
    """InputError naming cfg.json field d_in when the SAE does not fit activations of width d_model."""
    if sae.cfg.d_in != d_model:
        cfg_path = Path(getattr(sae, "source", Path("."))) / Files.SAE_CFG
        raise InputError(cfg_path, "d_in", f"SAE expects d_in={sae.cfg.d_in} but {source} has d_model={d_model}")


def log10_frequency(fire_counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """SAELens' sparsity: log10(firing frequency + 1e-10)."""
    freq = fire_counts.double() / max(n_tokens, 1)
    return torch.log10(freq + 1e-10).float()


__all__ = ["check_d_in", "hook_name", "load_sae", "load_sparsity", "log10_frequency",
           "read_cfg", "sae_folder", "save_sae"]
