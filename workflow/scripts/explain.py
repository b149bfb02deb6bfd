"""Stage explain: ask a multimodal LLM what each selected SAE feature means (mmsae.interpret.explain).

Per feature (the top `top_n` cross-modal features by weight, or `features`): its top images with the
region where it does not fire dimmed, and its top text contexts with the activating token marked
<<like this>>, sent to an OpenAI-compatible chat endpoint (`base_url`, `model`, key from the variable
named by `api_key_env`). Writes explanations.parquet (feature, explanation, model, prompt_hash,
n_images, n_texts, raw_response, error, weight, ref_activation, image_samples, texts) and images/
(the masked images as sent). A failed request is recorded in `error`; if every request fails, the
stage stops (exit 2) and writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.errors import InputError
from mmsae.features import read_columns
from mmsae.interpret.explain import (
    DEFAULT_PROMPT,
    EXPLANATION_SCHEMA,
    IMAGES,
    explain_features,
    explainer_config,
    feature_images,
    image_activations,
    image_grid,
    load_tokenizer,
    prompt_hash,
    read_images,
    reference_activations,
    select_features,
    text_contexts,
    top_images,
    write_table,
)


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("explain", __doc__)
    argp.add_argument("--samples", required=True, help="sample artifact folder (samples.parquet: the images)")
    argp.add_argument("--extract", required=True, help="extract artifact folder (tokens.parquet, image grid)")
    argp.add_argument("--encode", required=True, help="encode artifact folder (codes.parquet: activation maps)")
    argp.add_argument("--features", required=True, help="features artifact folder (features.parquet)")
    argp.add_argument("--model", required=True, help="model folder or hub id (its tokenizer decodes the text contexts)")

    def body(args, params):
        timer = Timer()
        cfg = explainer_config(params)  # before any work: no endpoint, no run
        prompt = params["prompt"] or DEFAULT_PROMPT
        features = read_columns(Path(args.features) / Files.FEATURES, ("feature", "class", "weight", "top_text_rows"))
        selected = select_features(features, params["top_n"], params["features"])
        tokens = ActivationStore(args.extract).tokens
        grid = image_grid(args.extract, tokens)
        with timer("activations"):
            acts = image_activations(Path(args.encode) / Files.CODES, tokens, selected, grid)
            tops = top_images(acts, params["n_images"], params["image_rank"], grid)
            refs = reference_activations(acts)
        with timer("inputs"):
            images = read_images(args.samples, sorted({s for ids in tops.values() for s in ids}))
            views = feature_images(tops, acts, refs, images, grid, params["mask_threshold"], params["dim"],
                                   params["center_crop"], params["min_side"])
            texts = text_contexts(features, tokens, selected, load_tokenizer(args.model), params["n_texts"],
                                  params["context_tokens"])
        with timer("explain"):
            df = explain_features(selected, {f: [png for _, png in v] for f, v in views.items()}, texts, prompt, cfg)
        if len(df) and df["error"].notna().all():
            raise InputError(cfg.base_url, "explain.base_url", f"every request failed; the first: {df['error'].iloc[0]}")
        weight = features.set_index("feature")["weight"]
        df["weight"] = [float(weight.get(f)) if weight.get(f) is not None else None for f in df["feature"]]
        df["ref_activation"] = [refs.get(f) for f in df["feature"]]
        df["image_samples"] = [[s for s, _ in views.get(f, [])] for f in df["feature"]]
        df["texts"] = [texts.get(f, []) for f in df["feature"]]
        with atomic_dir(args.out) as tmp:
            write_table(df, tmp / Files.EXPLANATIONS, EXPLANATION_SCHEMA)
            (tmp / IMAGES).mkdir()
            for f, v in views.items():
                for i, (_, png) in enumerate(v):
                    (tmp / IMAGES / f"feature{f}_{i}.png").write_bytes(png)
            counts = {"n_features": len(df), "n_explained": int(df["explanation"].notna().sum()),
                      "n_errors": int(df["error"].notna().sum()), "grid": [grid.rows, grid.cols, grid.first],
                      "prompt_hash": prompt_hash(prompt), "model": cfg.model}
            write_manifest(tmp, "explain", params, {"samples": args.samples, "extract": args.extract,
                                                    "encode": args.encode, "features": args.features,
                                                    "model": args.model}, counts, timer.timings)

    return cli.run("explain", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
