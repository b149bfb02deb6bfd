"""The toy model's staged training (text -> vision + patch alignment -> joint) and the save + reload
of the trained model and its base LM."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmsae.artifacts import Files
from mmsae.models.toy.build import build_model, build_processor
from mmsae.models.toy.data import (
    alignment_loss,
    decode_images,
    image_rendering,
    normalize_images,
    patch_targets,
    text_rendering,
)
from mmsae.models.toy.evaluation import exact_match, max_logit_diff
from mmsae.params import ToyModelParams

log = logging.getLogger("mmsae.toy")

LossFn = Callable[[torch.Tensor, int], dict[str, torch.Tensor]]


def _lr_lambda(steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterable[torch.Tensor]:
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def _run_stage(name: str, model, params_to_train: list[torch.nn.Parameter], steps: int, lr: float,
               batch_size: int, n: int, gen: torch.Generator, loss_fn: LossFn) -> dict[str, float]:
    """AdamW + warmup/cosine for `steps` steps; returns the mean losses over the last 10% of steps."""
    if steps <= 0:
        return {}
    model.train()
    opt = torch.optim.AdamW(params_to_train, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, min(100, max(1, steps // 10))))
    tail = max(1, steps // 10)
    every = max(100, steps // 5)  # log lines (tqdm shows every step on a terminal)
    sums: dict[str, float] = {}
    bar = tqdm(_batches(n, batch_size, steps, gen), total=steps, desc=f"toy_model {name}", file=sys.stderr,
               mininterval=10.0, disable=None)
    start = time.perf_counter()
    for step, idx in enumerate(bar):
        losses = loss_fn(idx, step)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params_to_train, 1.0)
        opt.step()
        sched.step()
        if step >= steps - tail:
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        last = step == steps - 1
        if step % 50 == 0 or step % every == 0 or last:
            msg = " ".join(f"{k}={float(v.detach()):.4f}" for k, v in losses.items())
            bar.set_postfix_str(msg, refresh=False)
            if step % every == 0 or last:
                log.info("toy_model %s step %d/%d %s (%.1f s)", name, step + 1, steps, msg,
                         time.perf_counter() - start)
    out = {f"{name}_{k}": v / tail for k, v in sums.items()}
    log.info("toy_model %s: %d steps in %.1f s, %s", name, steps, time.perf_counter() - start,
             " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


def _set_trainable(model, modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projector outputs [N, P, H] of a LLaVA model: its vision tower and projector called directly.

    The forward's own image outputs are not stable across transformers minor versions (5.25 turned
    `image_hidden_states` into a deprecated alias, announced to become per-layer states); these two
    modules and the config's feature layer / select strategy are.
    """
    cfg, inner = model.config, model.model
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"toy model: vision_feature_layer must be one int, got {layer!r}")
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    if cfg.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]  # drop CLS
    return inner.multi_modal_projector(hidden)


def image_embeds(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The LM's input embeddings with the image slots (`<image>` ids, P per row) filled by `features`."""
    emb = model.get_input_embeddings()(input_ids)
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return emb.masked_scatter(slots, features.to(emb.dtype))


def patch_rendering_embeds(embed: torch.nn.Embedding, input_ids: torch.Tensor, concept_ids: torch.Tensor,
                           image_token_id: int) -> torch.Tensor:
    """Input embeddings with every image slot replaced by the sum of the word embeddings of the concepts
    that patch shows (E[colour] + E[shape]); background patches keep the `<image>` embedding.

    The stage-0 "patch rendering": the LM learns to read the 16-slot layout the aligned projector will
    produce, with colour and shape bound in one vector as in a real patch.
    """
    emb = embed(input_ids)
    valid = concept_ids >= 0
    concept = (embed(concept_ids.clamp(min=0)) * valid.unsqueeze(-1)).sum(2)  # [B, P, H]
    slots = input_ids == image_token_id  # [B, L], P per row
    fill = torch.where(valid.any(-1, keepdim=True), concept, emb[slots].view_as(concept))
    return emb.masked_scatter(slots.unsqueeze(-1), fill)



@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The training split as tensors, made once up front: both renderings, pixels and patch targets."""

    text_ids: torch.Tensor
    text_labels: torch.Tensor
    img_ids: torch.Tensor
    img_labels: torch.Tensor
    pixels: torch.Tensor
    concepts: torch.Tensor

    @classmethod
    def of(cls, train_df: pd.DataFrame, processor) -> TrainingData:
        text_ids, text_labels = text_rendering(train_df, processor)
        img_ids, img_labels = image_rendering(train_df, processor)
        pixels = normalize_images(decode_images(train_df["image"]), processor)
        return cls(text_ids, text_labels, img_ids, img_labels, pixels, patch_targets(train_df, processor.tokenizer))


def _loss_fns(model, processor, data: TrainingData, params: ToyModelParams) -> tuple[LossFn, LossFn]:
    """(the text stage's loss, the vision and joint stages' loss) of a batch of sample indices."""
    embed = model.get_input_embeddings()
    rendering = params.text_rendering
    align_weight = float(params.align_weight)

    def text_loss(idx, step):
        if rendering == "caption" or (rendering == "both" and step % 2 == 0):
            return {"lm": model(input_ids=data.text_ids[idx], labels=data.text_labels[idx]).loss}
        embeds = patch_rendering_embeds(embed, data.img_ids[idx], data.concepts[idx], processor.image_token_id)
        return {"lm": model(inputs_embeds=embeds, labels=data.img_labels[idx]).loss}

    def image_loss(idx, step):
        feats = image_features(model, data.pixels[idx])
        embeds = image_embeds(model, data.img_ids[idx], feats)
        losses = {"lm": model(inputs_embeds=embeds, labels=data.img_labels[idx]).loss}
        if align_weight > 0:  # targets detached: the words keep their meaning, the patches move to them
            losses["align"] = align_weight * alignment_loss(feats, data.concepts[idx], embed.weight.detach())
        return losses

    return text_loss, image_loss


def _train_stages(model, processor, data: TrainingData, params: ToyModelParams, n: int, gen: torch.Generator,
                  eval_df: pd.DataFrame | None, metrics: dict[str, Any], timings: dict[str, float]) -> None:
    """Run the three stages in order, adding their final losses (and in-memory exact match) to metrics."""
    batch_size, lr = int(params.batch_size), float(params.lr)
    text_loss, image_loss = _loss_fns(model, processor, data, params)
    stages = [
        ("text", params.steps_text, lr, [model.model.language_model, model.lm_head], text_loss),
        ("vision", params.steps_vision, lr, [model.model.vision_tower, model.model.multi_modal_projector],
         image_loss),
        ("joint", params.steps_joint, lr * float(params.joint_lr_scale), [model], image_loss),
    ]
    for name, steps, stage_lr, modules, fn in stages:
        t = time.perf_counter()
        trainable = _set_trainable(model, modules)
        metrics.update(_run_stage(name, model, trainable, int(steps), stage_lr, batch_size, n, gen, fn))
        timings[f"train_{name}"] = time.perf_counter() - t
        if name == "text":  # the text-only LM the MLLM is built on: the base LLM of the transfer test
            metrics["base_lm"] = base_lm_copy(model)
        if eval_df is not None and name != "text" and steps > 0:
            model.eval()
            metrics[f"exact_match_after_{name}"] = exact_match(model, processor, eval_df)["exact_match"]
            log.info("toy_model %s: in-memory exact match %.3f", name, metrics[f"exact_match_after_{name}"])


def fit_toy_model(train_df: pd.DataFrame, params: ToyModelParams, eval_df: pd.DataFrame | None = None):
    """Build and train the staged toy model in memory: (model, processor, metrics with final losses).

    `params` is the `toy_model` config slice. With `eval_df`, the in-memory exact match after the vision
    and joint stages is added to the metrics.
    """
    seed = int(params.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if params.num_threads:
        torch.set_num_threads(int(params.num_threads))

    torch.manual_seed(seed)  # before the model is built: its initial weights
    processor = build_processor()
    tok = processor.tokenizer
    model = build_model(params, len(tok), processor.image_token_id, tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("toy_model: %d parameters, %d training samples", n_params, len(train_df))

    train_df = train_df.reset_index(drop=True)
    data = TrainingData.of(train_df, processor)
    timings["prepare"] = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(seed)  # the batches of all three stages, in order
    n = len(train_df)
    metrics: dict[str, Any] = {"n_params": n_params, "n_train": n}
    _train_stages(model, processor, data, params, n, gen, eval_df, metrics, timings)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    metrics["timings_s"] = timings
    torch.set_num_threads(threads_before)
    return model, processor, metrics


def base_lm_copy(model) -> torch.nn.Module:
    """The language model of `model` (decoder + LM head) as a stand-alone LlamaForCausalLM copy."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(model.config.text_config)
    base.model.load_state_dict(model.model.language_model.state_dict())
    base.lm_head.load_state_dict(model.lm_head.state_dict())
    return base.eval()



def train_toy_model(train_df: pd.DataFrame, heldout_df: pd.DataFrame, params: ToyModelParams,
                    out_dir: str | Path) -> dict[str, Any]:
    """Train the staged toy model, save it to out_dir/model, reload it, evaluate the reloaded copy.

    Returns metrics: heldout exact match and answer match (overall, per task) of the model loaded back through
    AutoModelForImageTextToText / AutoProcessor, final losses per stage, timings.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t0 = time.perf_counter()
    eval_df = heldout_df.iloc[: int(params.eval_samples)].reset_index(drop=True)
    model, processor, metrics = fit_toy_model(train_df, params, eval_df)
    timings = metrics.pop("timings_s")
    base_lm = metrics.pop("base_lm")

    # save, then measure the model as any later stage sees it: loaded back through the Auto classes
    t = time.perf_counter()
    model_dir = Path(out_dir) / Files.MODEL_DIR
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    # the base LLM (after stage 0, before any image was seen) with the same tokenizer
    base_lm.save_pretrained(Path(out_dir) / Files.BASE_MODEL_DIR)
    processor.tokenizer.save_pretrained(Path(out_dir) / Files.BASE_MODEL_DIR)
    reloaded = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    reproc = AutoProcessor.from_pretrained(model_dir)
    timings["save_reload"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics["reload_max_logit_diff"] = max_logit_diff(model, reloaded, reproc, eval_df.iloc[:16])
    em = exact_match(reloaded, reproc, eval_df)
    timings["evaluate"] = time.perf_counter() - t
    metrics.update(em)
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["wall_s"] = round(time.perf_counter() - t0, 2)
    log.info("toy_model: heldout exact match %.3f %s, answer match %.3f", em["exact_match"], em["exact_match_by_task"],
             em["answer_match"])
    return metrics

