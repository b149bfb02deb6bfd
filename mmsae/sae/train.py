"""Stage train_sae: train a sparse autoencoder on one layer of an extract artifact.

Writes, atomically, into --out:

  sae/            SAELens layout: cfg.json, sae_weights.safetensors, sparsity.safetensors (log10 freq),
                  README.md (model card: YAML metadata + how to load; mmsae.sae.card)
  metrics.json    held-out L0, MSE, centred FVU, dead and dense fractions (overall and per modality),
                  loss curve at checkpoints, token counts
  manifest.json   params, inputs, counts (n_train_tokens, n_eval_tokens, d_in, d_sae, layer), timings

With train_sae.pretrained set, a published SAE (SAELens layout) is checked against the store, evaluated on
the same held-out split and saved instead of a trained one.

Checkpoints go to --checkpoints (outside --out): a rerun with the same params resumes from the latest
one and ends with the same weights as an uninterrupted run. How training works: mmsae.sae.training.

Example:
  python workflow/scripts/train_sae.py --extract results/demo/extract-1234abcd --out results/demo/train_sae-x \\
      --checkpoints results/demo/train_sae-x.checkpoints --params '{"layer": 1, "steps": 2000}'
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import MANIFEST, Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.params import TrainSaeParams
from mmsae.sae.card import training_data, write_card
from mmsae.sae.training import import_sae, train_sae

STAGE = "train_sae"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    extract: Path = cli.arg("extract artifact folder (acts.zarr + tokens.parquet)")
    checkpoints: Path = cli.arg("checkpoint folder, kept outside --out so a rerun resumes")


def model_name(extract: str | Path) -> str:
    """The model an extract artifact came from (its manifest's inputs.model), if recorded."""
    if not (Path(extract) / MANIFEST).exists():
        return "unknown"
    return str(read_manifest(extract).get("inputs", {}).get("model", "unknown"))


def run(inputs: Inputs, params: TrainSaeParams, out: Path) -> None:
    timer = Timer()
    store = ActivationStore(inputs.extract)
    with atomic_dir(out) as tmp:
        with timer("train_sae"):
            if params.pretrained:
                metrics = import_sae(store, params, params.pretrained, tmp)
            else:
                metrics = train_sae(store, params, tmp, inputs.checkpoints,
                                    metadata={"model_name": model_name(inputs.extract)})
        write_card(tmp / Files.SAE_DIR, metrics, training_data(inputs.extract))
        counts = {k: metrics[k] for k in ("n_train_tokens", "n_eval_tokens", "d_in", "d_sae", "layer")}
        counts.update(hook_name=metrics["hook_name"], steps=metrics["steps"], tokens_seen=metrics["tokens_seen"],
                      resumed_from_step=metrics["resumed_from_step"])
        timings = {**timer.timings, **{f"train_sae.{k}": v for k, v in metrics["timings_s"].items()}}
        manifest_inputs = {"extract": inputs.extract, **({"pretrained": params.pretrained} if params.pretrained else {})}
        write_manifest(tmp, STAGE, params.as_dict(), manifest_inputs, counts, timings)
    # finished: a checkpoint only resumes an interrupted run, so a forced rerun trains from scratch
    shutil.rmtree(inputs.checkpoints, ignore_errors=True)
