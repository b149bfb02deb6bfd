"""The toy MLLM: a tiny LLaVA (CLIP vision tower + projector + Llama) trained on the toy world on a CPU.

Everything is a stock Hugging Face object built from configs, saved with `save_pretrained` and loaded
back through `AutoModelForImageTextToText` / `AutoProcessor`, so later stages treat it like any hub
model.

Recipe (LLaVA-like, "staged + patch alignment", see shared/reference/toyworld-measurements.md):

0. text:   the LM alone learns a text rendering of the world, alternating two renderings per step
           (`text_rendering: both`): (a) the caption words "c1 s1 c2 s2" take the place of the image
           (the text-only task as a plain text turn); (b) the 16 image slots hold, per patch, the sum
           of the word embeddings of what it shows (E[colour] + E[shape]; background: E[<image>]).
           (b) teaches the LM to read colour and shape bound in one patch vector - the layout the
           aligned projector produces; with (a) alone "what color is the {shape} ?" stayed near chance (0.43);
1. vision: the LM is frozen; the vision tower + projector learn to answer from the image, plus a
           per-patch alignment loss 1 - cos(projector output at an object's patch,
           E[colour word] + E[shape word]) from the ground-truth boxes. This is what makes one
           direction mean "blue" both for the word and for blue patches (the premise of SAE-V);
2. joint:  a short full fine-tune at lr * joint_lr_scale (alignment loss kept, targets detached).

The loss is on response tokens only; the budget is in steps, so a rerun is identical. The LM as it
stands after stage 0 (before it saw any image) is saved too, as a LlamaForCausalLM in `base_model/`:
the base LLM of the SAE transfer test, as Mistral-7B is for LLaVA-NeXT-7B.

Stage toy_model (`run`): reads DIR/train.parquet and DIR/heldout.parquet (the toyworld stage's
artifact), runs the recipe above and writes, atomically:

  OUT/model/          save_pretrained model + processor (safetensors), loadable by
                      AutoModelForImageTextToText / AutoProcessor
  OUT/base_model/     the LM after the text stage (LlamaForCausalLM + tokenizer): the base LLM of the
                      SAE transfer test (evaluate_sae)
  OUT/metrics.json    held-out exact match of the reloaded model (overall, per task), final losses
  OUT/manifest.json

Example:
  python workflow/scripts/toy_model.py --toyworld results/demo/toyworld-xxxx --out results/demo/toy_model-yyyy \\
      --params '{"steps_text": 1200}'

Modules: build (tokenizer, processor, model config), data (renderings, patch targets, alignment loss),
training (the three stages, save + reload), evaluation (greedy answers, exact match).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.data.schema import read_frame
from mmsae.models.toy.build import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    GRID,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    MAX_NEW_TOKENS,
    N_IMAGE_TOKENS,
    PAD,
    PATCH_SIZE,
    SPECIAL_TOKENS,
    TEMPLATE_WORDS,
    UNK,
    build_model,
    build_processor,
    build_tokenizer,
    vocabulary,
)
from mmsae.models.toy.data import (
    alignment_loss,
    decode_images,
    expand_image_tokens,
    image_rendering,
    normalize_images,
    patch_targets,
    preferred_response,
    text_rendering,
)
from mmsae.models.toy.evaluation import (
    exact_match,
    exact_match_frame,
    generate_answers,
    max_logit_diff,
    model_inputs,
    summarize_exact_match,
)
from mmsae.models.toy.training import (
    TrainingData,
    base_lm_copy,
    fit_toy_model,
    image_embeds,
    image_features,
    patch_rendering_embeds,
    train_toy_model,
)
from mmsae.params import ToyModelParams

STAGE = "toy_model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    toyworld: Path = cli.arg("the toyworld artifact folder (train.parquet, heldout.parquet)")


def run(inputs: Inputs, params: ToyModelParams, out: Path) -> None:
    """Read the splits, train, save the model, its base LM, metrics.json and the manifest."""
    timer = Timer()
    with timer("read"):
        train = read_frame(inputs.toyworld / Files.TRAIN)
        heldout = read_frame(inputs.toyworld / Files.HELDOUT)
    with atomic_dir(out) as tmp:
        with timer("train"):
            metrics = train_toy_model(train, heldout, params, tmp)
        write_json(tmp / Files.METRICS, metrics)
        write_manifest(
            tmp, STAGE, params.as_dict(),
            inputs={"toyworld": inputs.toyworld},
            counts={"train": len(train), "heldout": len(heldout), "eval": metrics["n_eval"],
                    "parameters": metrics["n_params"]},
            timings={**timer.timings, **{f"train.{k}": v for k, v in metrics["timings_s"].items()}},
        )


__all__ = [
    "BOS", "CHAT_TEMPLATE", "EOS", "GRID", "IMAGE_SIZE", "IMAGE_TOKEN", "MAX_NEW_TOKENS", "N_IMAGE_TOKENS", "PAD",
    "PATCH_SIZE", "SPECIAL_TOKENS", "STAGE", "TEMPLATE_WORDS", "UNK", "Inputs", "TrainingData", "alignment_loss",
    "base_lm_copy", "build_model", "build_processor", "build_tokenizer", "decode_images", "exact_match",
    "exact_match_frame", "expand_image_tokens", "fit_toy_model", "generate_answers", "image_embeds",
    "image_features", "image_rendering", "max_logit_diff", "model_inputs", "normalize_images",
    "patch_rendering_embeds", "patch_targets", "preferred_response", "run", "summarize_exact_match",
    "text_rendering", "train_toy_model", "vocabulary",
]
