"""Stage patch_filter: image-patch filtering (SAE-V paper, Section 3.2).

Scores every base-grid patch of labelled images (SAE-V l0, l1, cooc_l0, cosine; random; attention from
the last prompt token), keeps the best 75 / 50 / 25 % (config patch_filter.fractions), blacks out the
rest in pixel space and classifies the image with the model. Images: an ImageFolder (--images, or
config patch_filter.images: <root>/<label>/*.png) or the toy world's held-out split (--toyworld,
labelled by the answer to patch_filter.question). Writes accuracy.parquet (method, fraction, n_images,
n_correct, accuracy; method 'none' = unmasked), predictions.parquet, patch_scores.parquet,
accuracy.png and examples.png. See mmsae.interpret.patches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.errors import InputError
from mmsae.features import feature_rule, read_columns, text_modalities
from mmsae.params import ModelParams, PatchFilterParams

STAGE = "patch_filter"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    toyworld: Path | None = cli.arg("toyworld artifact folder (heldout.parquet): the toy labelled set", default=None)
    images: Path | None = cli.arg("ImageFolder root <root>/<label>/*.png (overrides patch_filter.images)", default=None)
    model: str = cli.arg("model folder or hub id (a fixed-grid LLaVA model)")
    model_params: ModelParams = cli.arg("the 'model' config slice: dtype, device, trust_remote_code (JSON)",
                                        default_factory=lambda: ModelParams.load({}))
    sae: Path = cli.arg("train_sae artifact folder (or SAELens folder)")
    features: Path = cli.arg("features artifact folder of that SAE (features.parquet)")


def image_set(inputs: Inputs, params: PatchFilterParams) -> tuple[Any, str | Path | None]:
    """(the labelled images, the ImageFolder root or None for the toy world's held-out split)."""
    from mmsae.interpret import patches

    root = inputs.images or params.images
    if root:
        return patches.image_folder_set(root, params.max_images, params.seed), root
    if inputs.toyworld:
        return patches.toy_image_set(Path(inputs.toyworld) / Files.HELDOUT, params.question, params.max_images,
                                     params.seed), None
    raise InputError("--images", "patch_filter.images", "give an ImageFolder (--images) or --toyworld")


def sae_and_layer(inputs: Inputs, adapter: Any) -> tuple[Any, int]:
    """The SAE on the model's device and the decoder layer it reads, checked against the model and the features."""
    from mmsae.sae.io import check_d_in, load_sae

    sae = load_sae(inputs.sae, device=adapter.device)
    check_d_in(sae, adapter.d_model, inputs.model)
    layer = sae.cfg.metadata.get("hook_layer")
    if layer is None:
        raise InputError(sae.source / Files.SAE_CFG, "metadata.hook_layer", "the SAE does not say which layer it reads")
    layer = adapter.check_layers([int(layer)], "train_sae.layer")[0]
    counts = read_manifest(inputs.features).get("counts", {})
    if counts.get("layer") not in (None, layer) or counts.get("d_sae") not in (None, sae.cfg.d_sae):
        raise InputError(Path(inputs.features) / Files.MANIFEST, "counts",
                         f"features are for layer {counts.get('layer')} / d_sae {counts.get('d_sae')}, "
                         f"the SAE for layer {layer} / d_sae {sae.cfg.d_sae}")
    return sae, layer


def run(inputs: Inputs, params: PatchFilterParams, out: Path) -> None:
    import torch

    from mmsae.interpret import patches
    from mmsae.models import load_model_with

    torch.manual_seed(params.seed)
    timer = Timer()
    with timer("images"):
        images, images_root = image_set(inputs, params)
    with timer("load_model"):
        adapter = load_model_with(inputs.model, inputs.model_params)
    grid = patches.patch_grid(adapter)
    sae, layer = sae_and_layer(inputs, adapter)
    features = read_columns(Path(inputs.features) / Files.FEATURES, ("feature", "weight", "class"))
    rule = feature_rule(inputs.features)
    with timer("patch_filter"):
        result = patches.patch_filter(adapter, sae, layer, features, images, params,
                                      text_modalities=text_modalities(rule))
    acc = result["accuracy"]
    chance = 1.0 / len(images.label_set)
    for row in acc.itertuples(index=False):
        print(f"{row.method:>10} kept {row.fraction:.2f}: accuracy {row.accuracy:.3f} ({row.n_correct}/{row.n_images})",
              file=sys.stderr)
    with atomic_dir(out) as tmp:
        acc.to_parquet(tmp / Files.ACCURACY, index=False)
        result["predictions"].to_parquet(tmp / Files.PREDICTIONS, index=False)
        result["patch_scores"].to_parquet(tmp / Files.PATCH_SCORES, index=False)
        patches.plot_accuracy(acc, chance, tmp / Files.ACCURACY_PLOT,
                              f"{params.question} ({len(images)} images, {params.classify})")
        patches.plot_examples(adapter, images, result["patch_scores"], params.methods,
                              min(params.fractions), params.seed, tmp / Files.EXAMPLES_PLOT)
        table = {m: {f"{f:g}": float(a) for f, a in zip(part["fraction"], part["accuracy"], strict=True)}
                 for m, part in acc.groupby("method", sort=False)}
        read = {"model": inputs.model, "sae": inputs.sae, "features": inputs.features,
                **({"images": images_root} if images_root else {"toyworld": inputs.toyworld})}
        write_manifest(tmp, STAGE, params.as_dict(), read,
                       {"n_images": len(images), "labels": images.label_set, "chance": chance,
                        "grid": grid.as_dict(), "layer": layer, "d_sae": sae.cfg.d_sae, "feature_rule": rule,
                        "accuracy": table}, timer.timings)
