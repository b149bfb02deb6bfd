"""The model card of an SAE folder: README.md in the Hugging Face convention of SAELens releases.

YAML front matter (library_name, tags, base_model, hook, training data, token count, architecture, sizes,
sparsity setting, modality_mix, held-out metrics), then a short body on loading the folder with sae_lens
and with mmsae. Every value of the front matter goes through yaml.safe_dump, which quotes and escapes
what it must: model names, data set paths and config values come from users and data sets, and a name
holding a newline, '---' or ': ' stays one string and cannot end the front matter or add keys. The body
holds no data-derived text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mmsae.artifacts import Files

TAGS = ["sae_lens", "mmsae", "sparse-autoencoder", "sae-v", "multimodal"]
SPARSITY_KEY = {"relu": "l1_coefficient", "jumprelu": "l0_coefficient"}  # the topk family: k


def _metric(evals: dict[str, Any], modality: str, key: str) -> float | None:
    v = evals.get(modality, {}).get(key)
    return None if v is None else float(v)


def card_metadata(cfg: dict[str, Any], metrics: dict[str, Any], training_data: dict[str, Any]) -> dict[str, Any]:
    """The front matter of one SAE: its cfg.json (SAELens layout), train_sae's metrics and where its
    training tokens came from."""
    meta = cfg.get("metadata", {})
    evals = metrics.get("eval", {})
    arch = meta.get("mmsae_architecture", metrics.get("architecture"))
    train = meta.get("train_params", {})
    # the architecture's own sparsity setting, from the params it was trained with (cfg.json may hold it
    # elsewhere: SAELens saves batchtopk / jumprelu for inference with their options in metadata)
    key = SPARSITY_KEY.get(arch, "k")
    value = train.get(key, meta.get(key, cfg.get(key)))
    sparsity = {key: value} if value is not None else {}
    return {
        "library_name": "saelens",
        "tags": TAGS,
        "base_model": str(meta.get("model_name", "unknown")),
        "hook_name": meta.get("hook_name"),
        "hook_layer": meta.get("hook_layer"),
        "architecture": cfg.get("architecture"),  # SAELens' name (relu = "standard")
        "mmsae_architecture": arch,
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        **sparsity,
        "scope": metrics.get("scope"),
        "modality_mix": metrics.get("modality_mix", "natural"),
        "normalize_activations": cfg.get("normalize_activations"),
        "training_data": training_data,
        "training_tokens": metrics.get("tokens_seen"),
        "metrics": {
            "split": "held-out samples (train_sae.eval_fraction)",
            "l0": _metric(evals, "overall", "l0"),
            "dead_fraction": _metric(evals, "overall", "dead_fraction"),
            "fvu": _metric(evals, "overall", "centred_fvu"),
            **{f"fvu_{m}": _metric(evals, m, "centred_fvu") for m in ("image", "text") if m in evals},
            **{f"l0_{m}": _metric(evals, m, "l0") for m in ("image", "text") if m in evals},
        },
        "mmsae_version": meta.get("mmsae_version"),
    }


BODY = """
# Sparse autoencoder (mmsae)

A sparse autoencoder trained by mmsae on the residual stream of a multimodal LLM
(the hook and layer above), on {tokens}. The front matter above lists the training data, the
architecture, its sparsity setting and the held-out metrics (centred FVU overall and per modality, L0,
dead fraction).

## Load with SAELens

```python
from sae_lens import SAE

sae = SAE.load_from_disk("path/to/this/folder")  # cfg.json + sae_weights.safetensors
codes = sae.encode(activations)                  # activations: [tokens, d_in] at the hook above
```

## Load with mmsae

```python
from mmsae.sae.io import load_sae

sae = load_sae("path/to/this/folder")            # also accepts the train_sae artifact folder
codes = sae.encode(activations)
```

`sparsity.safetensors` holds the log10 firing frequency of every latent on the held-out tokens.
"""


def render_card(meta: dict[str, Any]) -> str:
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False, default_flow_style=False, width=10**6)
    tokens = "image and text tokens" if meta.get("scope") == "all" else "text tokens"
    return f"---\n{front}---\n{BODY.format(tokens=tokens)}"


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The front matter of a README.md (for tests and uploads)."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML front matter")
    end = text.index("\n---\n", 3)
    return yaml.safe_load(text[4:end + 1])


def training_data(extract: str | os.PathLike) -> dict[str, Any]:
    """Where an extract artifact's tokens came from: its folder (name = config hash), the sample folder and
    the data set source and format recorded in the sample's manifest, when they can be read."""
    extract = Path(extract)
    out: dict[str, Any] = {"extract": extract.name}
    try:
        ex = json.loads((extract / Files.MANIFEST).read_text())
    except (OSError, ValueError):
        return out
    out["extraction_key"] = ex.get("counts", {}).get("extraction_key")
    samples = ex.get("inputs", {}).get("samples")
    if samples:
        out["sample"] = Path(samples).name
        for cand in (Path(samples), extract.parent / Path(samples).name):
            try:
                sm = json.loads((cand / Files.MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            data = sm.get("params", {}).get("data", {})
            out.update(source=data.get("source"), format=data.get("format"), sample_hash=sm.get("config_hash"),
                       data_file=sm.get("inputs", {}).get("data") or None)
            break
    return {k: v for k, v in out.items() if v is not None}


def write_card(sae_dir: str | os.PathLike, metrics: dict[str, Any], data: dict[str, Any]) -> Path:
    """Write sae_dir/README.md from its cfg.json, the metrics and the training data."""
    sae_dir = Path(sae_dir)
    cfg = json.loads((sae_dir / Files.SAE_CFG).read_text())
    path = sae_dir / Files.MODEL_CARD
    path.write_text(render_card(card_metadata(cfg, metrics, data)))  # inside train_sae's atomic folder
    return path
