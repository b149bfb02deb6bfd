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

import dataclasses
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
    prompt_hash,
    read_images,
    reference_activations,
    select_features,
    text_contexts,
    top_images,
    write_table,
)
from mmsae.models import load_tokenizer
from mmsae.params import ExplainParams

STAGE = "explain"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("sample artifact folder (samples.parquet: the images)")
    extract: Path = cli.arg("extract artifact folder (tokens.parquet, image grid)")
    encode: Path = cli.arg("encode artifact folder (codes.parquet: activation maps)")
    features: Path = cli.arg("features artifact folder (features.parquet)")
    model: str = cli.arg("model folder or hub id (its tokenizer decodes the text contexts)")


def run(inputs: Inputs, params: ExplainParams, out: Path) -> None:
    timer = Timer()
    cfg = explainer_config(params)  # before any work: no endpoint, no run
    prompt = params.prompt or DEFAULT_PROMPT
    features = read_columns(Path(inputs.features) / Files.FEATURES, ("feature", "class", "weight", "top_text_rows"))
    selected = select_features(features, params.top_n, params.features)
    tokens = ActivationStore(inputs.extract).tokens
    grid = image_grid(inputs.extract, tokens)
    with timer("activations"):
        acts = image_activations(Path(inputs.encode) / Files.CODES, tokens, selected, grid)
        tops = top_images(acts, params.n_images, params.image_rank, grid)
        refs = reference_activations(acts)
    with timer("inputs"):
        images = read_images(inputs.samples, sorted({s for ids in tops.values() for s in ids}))
        views = feature_images(tops, acts, refs, images, grid, params.mask_threshold, params.dim,
                               params.center_crop, params.min_side)
        texts = text_contexts(features, tokens, selected, load_tokenizer(inputs.model), params.n_texts,
                              params.context_tokens)
    with timer("explain"):
        df = explain_features(selected, {f: [png for _, png in v] for f, v in views.items()}, texts, prompt, cfg)
    if len(df) and df["error"].notna().all():
        raise InputError(cfg.base_url, "explain.base_url", f"every request failed; the first: {df['error'].iloc[0]}")
    weight = features.set_index("feature")["weight"]
    df["weight"] = [float(weight.get(f)) if weight.get(f) is not None else None for f in df["feature"]]
    df["ref_activation"] = [refs.get(f) for f in df["feature"]]
    df["image_samples"] = [[s for s, _ in views.get(f, [])] for f in df["feature"]]
    df["texts"] = [texts.get(f, []) for f in df["feature"]]
    with atomic_dir(out) as tmp:
        write_table(df, tmp / Files.EXPLANATIONS, EXPLANATION_SCHEMA)
        (tmp / IMAGES).mkdir()
        for f, v in views.items():
            for i, (_, png) in enumerate(v):
                (tmp / IMAGES / f"feature{f}_{i}.png").write_bytes(png)
        counts = {"n_features": len(df), "n_explained": int(df["explanation"].notna().sum()),
                  "n_errors": int(df["error"].notna().sum()), "grid": [grid.rows, grid.cols, grid.first],
                  "prompt_hash": prompt_hash(prompt), "model": cfg.model}
        read = {"samples": inputs.samples, "extract": inputs.extract, "encode": inputs.encode,
                "features": inputs.features, "model": inputs.model}
        write_manifest(tmp, STAGE, params.as_dict(), read, counts, timer.timings)
