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

import sys
from pathlib import Path

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.config import stage_params
from mmsae.errors import InputError
from mmsae.features import read_columns


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("patch_filter", __doc__)
    argp.add_argument("--toyworld", default=None, help="toyworld artifact folder (heldout.parquet): the toy labelled set")
    argp.add_argument("--images", default=None, help="ImageFolder root <root>/<label>/*.png (overrides patch_filter.images)")
    argp.add_argument("--model", required=True, help="model folder or hub id (a fixed-grid LLaVA model)")
    argp.add_argument("--model-params", default="{}", help="the 'model' config slice: dtype, device, trust_remote_code")
    argp.add_argument("--sae", required=True, help="train_sae artifact folder (or SAELens folder)")
    argp.add_argument("--features", required=True, help="features artifact folder of that SAE (features.parquet)")

    def body(args, params):
        import torch

        from mmsae.interpret import patches
        from mmsae.models import load_model
        from mmsae.sae.io import check_d_in, load_sae

        torch.manual_seed(params["seed"])
        timer = Timer()
        images_root = args.images or params["images"]
        with timer("images"):
            if images_root:
                images = patches.image_folder_set(images_root, params["max_images"], params["seed"])
            elif args.toyworld:
                images = patches.toy_image_set(Path(args.toyworld) / Files.HELDOUT, params["question"],
                                               params["max_images"], params["seed"])
            else:
                raise InputError("--images", "patch_filter.images", "give an ImageFolder (--images) or --toyworld")
        model_params = stage_params("model", args.model_params, source="--model-params")
        with timer("load_model"):
            adapter = load_model(args.model, dtype=model_params["dtype"], device=model_params["device"],
                                 trust_remote_code=model_params["trust_remote_code"])
        grid = patches.patch_grid(adapter)
        sae = load_sae(args.sae, device=adapter.device)
        check_d_in(sae, adapter.d_model, args.model)
        layer = sae.cfg.metadata.get("hook_layer")
        if layer is None:
            raise InputError(sae.source / Files.SAE_CFG, "metadata.hook_layer", "the SAE does not say which layer it reads")
        layer = adapter.check_layers([int(layer)], "train_sae.layer")[0]
        fmanifest = read_manifest(args.features)
        counts = fmanifest.get("counts", {})
        if counts.get("layer") not in (None, layer) or counts.get("d_sae") not in (None, sae.cfg.d_sae):
            raise InputError(Path(args.features) / Files.MANIFEST, "counts",
                             f"features are for layer {counts.get('layer')} / d_sae {counts.get('d_sae')}, "
                             f"the SAE for layer {layer} / d_sae {sae.cfg.d_sae}")
        features = read_columns(Path(args.features) / Files.FEATURES, ("feature", "weight", "class"))
        rule = fmanifest.get("params", {}).get("rule", "per_modality")
        with timer("patch_filter"):
            result = patches.patch_filter(adapter, sae, layer, features, images, params,
                                          text_modalities=("text", "special") if rule == "release" else ("text",))
        acc = result["accuracy"]
        chance = 1.0 / len(images.label_set)
        for row in acc.itertuples(index=False):
            print(f"{row.method:>10} kept {row.fraction:.2f}: accuracy {row.accuracy:.3f} ({row.n_correct}/{row.n_images})",
                  file=sys.stderr)
        with atomic_dir(args.out) as tmp:
            acc.to_parquet(tmp / Files.ACCURACY, index=False)
            result["predictions"].to_parquet(tmp / Files.PREDICTIONS, index=False)
            result["patch_scores"].to_parquet(tmp / Files.PATCH_SCORES, index=False)
            patches.plot_accuracy(acc, chance, tmp / Files.ACCURACY_PLOT,
                                  f"{params['question']} ({len(images)} images, {params['classify']})")
            patches.plot_examples(adapter, images, result["patch_scores"], params["methods"],
                                  min(params["fractions"]), params["seed"], tmp / Files.EXAMPLES_PLOT)
            table = {m: {f"{f:g}": float(a) for f, a in zip(part["fraction"], part["accuracy"], strict=True)}
                     for m, part in acc.groupby("method", sort=False)}
            inputs = {"model": args.model, "sae": args.sae, "features": args.features,
                      **({"images": images_root} if images_root else {"toyworld": args.toyworld})}
            write_manifest(tmp, "patch_filter", params, inputs,
                           {"n_images": len(images), "labels": images.label_set, "chance": chance,
                            "grid": grid.as_dict(), "layer": layer, "d_sae": sae.cfg.d_sae, "feature_rule": rule,
                            "accuracy": table}, timer.timings)

    return cli.run("patch_filter", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
