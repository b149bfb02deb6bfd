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
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmsae.data import toyvocab, toyworld
from mmsae.models.prompts import format_prompt, format_response

log = logging.getLogger("mmsae.toy")

PAD, BOS, EOS, UNK, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
TEMPLATE_WORDS = ("answer", ":")  # emitted by the chat template's generation prompt
PATCH_SIZE = 8
IMAGE_SIZE = toyworld.IMAGE_SIZE
GRID = IMAGE_SIZE // PATCH_SIZE
N_IMAGE_TOKENS = GRID * GRID  # CLS is dropped ("default" feature select strategy)
MAX_NEW_TOKENS = 6  # longest answer: four caption words + EOS

# User turn: "<s> <image> what color is the circle ?"; generation prompt " answer :"; an assistant
# turn is " answer : {text} </s>". Text-only user turns have no "<image>". Content may be a string or
# a list of typed blocks (image blocks first, as in `prompts.user_message`).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set blocks = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set blocks = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %} answer :"
    "{% for b in blocks %}{% if b['type'] == 'text' %} {{ b['text'] }}{% endif %}{% endfor %} {{ eos_token }}"
    "{% else %}"
    "{% for b in blocks %}{% if b['type'] == 'image' %} <image>{% endif %}{% endfor %}"
    "{% for b in blocks %}{% if b['type'] == 'text' %} {{ b['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# tokenizer, processor, model


def vocabulary() -> list[str]:
    words = [w for w in toyvocab.VOCAB_WORDS if w not in SPECIAL_TOKENS]
    words += [w for w in TEMPLATE_WORDS if w not in words]
    return list(SPECIAL_TOKENS) + words


def build_tokenizer():
    """Word-level tokenizer built in memory: special tokens, the toy world's words, the template's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=128,
        chat_template=CHAT_TEMPLATE,
    )
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == vocab[IMAGE_TOKEN]
    return tok


def build_processor(tokenizer=None):
    """LlavaProcessor: 32x32 images, patch 8, CLS dropped -> 16 `<image>` tokens per image."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_resize=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped again by "default"
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(params: dict[str, Any], vocab_size: int, image_token_id: int, pad_token_id: int = 0,
                bos_token_id: int = 1, eos_token_id: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    h = int(params.get("hidden_size", 64))
    heads = max(1, h // 16)
    vision = CLIPVisionConfig(
        hidden_size=h, intermediate_size=4 * h, num_hidden_layers=int(params.get("vision_layers", 2)),
        num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        projection_dim=h,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h,
        num_hidden_layers=int(params.get("num_layers", 4)), num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, max_position_embeddings=128, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, image_seq_length=N_IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    gc.do_sample, gc.max_new_tokens = False, MAX_NEW_TOKENS
    return model


# --------------------------------------------------------------------------------------------------
# data


def decode_images(images: Iterable[bytes]) -> torch.Tensor:
    """PNG bytes -> uint8 tensor [N, 3, H, W] (decoded once, up front)."""
    arrs = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            arrs.append(np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def normalize_images(images_u8: torch.Tensor, processor) -> torch.Tensor:
    """What the processor does to a 32x32 image (rescale + normalise), in torch on a uint8 batch."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_u8.float() * float(ip.rescale_factor) - mean) / std


def expand_image_tokens(processor, text: str) -> str:
    """The prompt with each `<image>` expanded to the image's token count, as the processor does."""
    return text.replace(processor.image_token, processor.image_token * N_IMAGE_TOKENS)


def _encode(tokenizer, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and labels (-100 everywhere but the response tokens)."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer([p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=False)["input_ids"]
    n, length = len(f_ids), max(len(s) for s in f_ids)
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for i, (p, f) in enumerate(zip(p_ids, f_ids, strict=True)):
        if f[: len(p)] != p:
            raise ValueError(f"prompt tokens are not a prefix of prompt+response: {prompts[i]!r}")
        ids[i, : len(f)] = torch.tensor(f)
        labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
    return ids, labels


def _prompts(processor, df: pd.DataFrame, has_image: list[bool]) -> list[str]:
    cache: dict[tuple[str, bool], str] = {}  # few distinct questions: render each once
    out = []
    for q, img in zip(df["question"], has_image, strict=True):
        if (q, img) not in cache:
            cache[(q, img)] = format_prompt(processor, q, img)
        out.append(cache[(q, img)])
    return out


def _responses(processor, df: pd.DataFrame) -> list[str]:
    return [format_response(processor, list(r)[int(k)]) for r, k in zip(df["responses"], df["preferred"], strict=True)]


def _response(row) -> str:
    return list(row.responses)[int(row.preferred)]


def text_rendering(df: pd.DataFrame, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 0 data: the caption words take the place of the image; the text-only task has no image."""
    has_image = [t != "text_only" for t in df["task"]]
    prompts = [
        p.replace(processor.image_token, toyworld.Scene(json.loads(o)).caption()) if img else p
        for p, img, o in zip(_prompts(processor, df, has_image), has_image, df["objects"], strict=True)
    ]
    return _encode(processor.tokenizer, prompts, _responses(processor, df))


def image_rendering(df: pd.DataFrame, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 1-2 data: the real prompt (image placeholder expanded) and the preferred response."""
    prompts = [expand_image_tokens(processor, p) for p in _prompts(processor, df, [True] * len(df))]
    return _encode(processor.tokenizer, prompts, _responses(processor, df))


def patch_targets(df: pd.DataFrame, tokenizer, max_concepts: int = 4) -> torch.Tensor:
    """Per sample and patch, the token ids of the concept words it shows ([N, 16, K], -1 = none)."""
    vocab = tokenizer.get_vocab()
    out = np.full((len(df), N_IMAGE_TOKENS, max_concepts), -1, dtype=np.int64)
    for i, objects in enumerate(df["objects"]):
        for j, concepts in enumerate(toyworld.patch_concepts(objects, GRID)):
            ids = sorted(vocab[c] for c in concepts)[:max_concepts]
            out[i, j, : len(ids)] = ids
    return torch.from_numpy(out)


def alignment_loss(image_features: torch.Tensor, concept_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over patches showing an object of 1 - cos(projector output, sum of its concept word embeddings).

    image_features [B, P, H]; concept_ids [B, P, K] (-1 = none); embeddings [V, H] (the LM's input
    embeddings). Patches without any concept do not count; 0 when no patch has one.
    """
    valid = concept_ids >= 0
    target = (embeddings[concept_ids.clamp(min=0)] * valid.unsqueeze(-1)).sum(2)
    mask = valid.any(-1)
    if not mask.any():
        return image_features.sum() * 0.0
    cos = torch.nn.functional.cosine_similarity(image_features[mask], target[mask], dim=-1)
    return (1.0 - cos).mean()


# --------------------------------------------------------------------------------------------------
# training


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
               batch_size: int, n: int, gen: torch.Generator, loss_fn) -> dict[str, float]:
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


def fit_toy_model(train_df: pd.DataFrame, params: dict[str, Any], eval_df: pd.DataFrame | None = None):
    """Build and train the staged toy model in memory: (model, processor, metrics with final losses).

    `params` is the `toy_model` config slice; missing keys take the schema defaults. With `eval_df`,
    the in-memory exact match after the vision and joint stages is added to the metrics.
    """
    from mmsae.config import stage_params

    params = stage_params("toy_model", dict(params), source="toy_model params")
    seed, batch_size, lr = int(params["seed"]), int(params["batch_size"]), float(params["lr"])
    align_weight = float(params["align_weight"])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if params.get("num_threads"):
        torch.set_num_threads(int(params["num_threads"]))

    torch.manual_seed(seed)
    processor = build_processor()
    tok = processor.tokenizer
    model = build_model(params, len(tok), processor.image_token_id, tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("toy_model: %d parameters, %d training samples", n_params, len(train_df))

    train_df = train_df.reset_index(drop=True)
    text_ids, text_labels = text_rendering(train_df, processor)
    img_ids, img_labels = image_rendering(train_df, processor)
    pixels = normalize_images(decode_images(train_df["image"]), processor)
    concepts = patch_targets(train_df, tok)
    timings["prepare"] = time.perf_counter() - t0

    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    n = len(train_df)

    rendering = params["text_rendering"]

    def text_loss(idx, step):
        if rendering == "caption" or (rendering == "both" and step % 2 == 0):
            return {"lm": model(input_ids=text_ids[idx], labels=text_labels[idx]).loss}
        embeds = patch_rendering_embeds(embed, img_ids[idx], concepts[idx], processor.image_token_id)
        return {"lm": model(inputs_embeds=embeds, labels=img_labels[idx]).loss}

    def image_loss(idx, step):
        feats = image_features(model, pixels[idx])
        embeds = image_embeds(model, img_ids[idx], feats)
        losses = {"lm": model(inputs_embeds=embeds, labels=img_labels[idx]).loss}
        if align_weight > 0:  # targets detached: the words keep their meaning, the patches move to them
            losses["align"] = align_weight * alignment_loss(feats, concepts[idx], embed.weight.detach())
        return losses

    metrics: dict[str, Any] = {"n_params": n_params, "n_train": n}
    stages = [
        ("text", params["steps_text"], lr, [model.model.language_model, model.lm_head], text_loss),
        ("vision", params["steps_vision"], lr, [model.model.vision_tower, model.model.multi_modal_projector],
         image_loss),
        ("joint", params["steps_joint"], lr * float(params["joint_lr_scale"]), [model], image_loss),
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


def train_toy_model(train_df: pd.DataFrame, heldout_df: pd.DataFrame, params: dict[str, Any],
                    out_dir: str | Path) -> dict[str, Any]:
    """Train the staged toy model, save it to out_dir/model, reload it, evaluate the reloaded copy.

    Returns metrics: heldout exact match (overall, per task) of the model loaded back through
    AutoModelForImageTextToText / AutoProcessor, final losses per stage, timings.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsae.config import stage_params

    params = stage_params("toy_model", dict(params), source="toy_model params")
    t0 = time.perf_counter()
    eval_df = heldout_df.iloc[: int(params["eval_samples"])].reset_index(drop=True)
    model, processor, metrics = fit_toy_model(train_df, params, eval_df)
    timings = metrics.pop("timings_s")
    base_lm = metrics.pop("base_lm")

    # save, then measure the model as any later stage sees it: loaded back through the Auto classes
    t = time.perf_counter()
    model_dir = Path(out_dir) / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    # the base LLM (after stage 0, before any image was seen) with the same tokenizer
    base_lm.save_pretrained(Path(out_dir) / "base_model")
    processor.tokenizer.save_pretrained(Path(out_dir) / "base_model")
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
    log.info("toy_model: heldout exact match %.3f %s", em["exact_match"], em["exact_match_by_task"])
    return metrics


# --------------------------------------------------------------------------------------------------
# evaluation


def _pil(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def model_inputs(processor, questions: list[str], images: list[bytes]) -> dict[str, torch.Tensor]:
    """Processor inputs (prompt via the chat template, image placeholder expanded) for a batch."""
    prompts = [format_prompt(processor, q, True) for q in questions]
    return processor(text=prompts, images=[_pil(x) for x in images], padding=True, return_tensors="pt")


@torch.no_grad()
def max_logit_diff(a, b, processor, df: pd.DataFrame) -> float:
    """Largest absolute logit difference of two models on the same samples."""
    inputs = model_inputs(processor, list(df["question"]), list(df["image"]))
    return float((a(**inputs).logits - b(**inputs).logits).abs().max())


@torch.no_grad()
def generate_answers(model, processor, questions: list[str], images: list[bytes], batch_size: int = 128) -> list[str]:
    """Greedy answers, batched by prompt length (no padding needed) through the processor."""
    prompts = [format_prompt(processor, q, True) for q in questions]
    lengths = [len(processor.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    answers: list[str] = [""] * len(prompts)
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] == lengths[i] and len(groups[-1]) < batch_size:
            groups[-1].append(i)
        else:
            groups.append([i])
    tok = processor.tokenizer
    for g in groups:
        inputs = processor(text=[prompts[i] for i in g], images=[_pil(images[i]) for i in g], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1] :]
        for i, text in zip(g, tok.batch_decode(new, skip_special_tokens=True), strict=True):
            answers[i] = " ".join(text.split())
    return answers


def exact_match_frame(model, processor, df: pd.DataFrame, batch_size: int = 128) -> pd.DataFrame:
    """Per question: sample_id, task ("all" without a task column), question, the greedy answer, the
    reference (the preferred response, whitespace-normalised) and whether they are equal."""
    answers = generate_answers(model, processor, list(df["question"]), list(df["image"]), batch_size=batch_size)
    refs = [" ".join(_response(r).split()) for r in df.itertuples(index=False)]
    tasks = df["task"].astype(str).tolist() if "task" in df.columns else ["all"] * len(df)
    return pd.DataFrame({"sample_id": df["sample_id"].astype(str).tolist(), "task": tasks,
                         "question": list(df["question"]), "answer": answers, "reference": refs,
                         "correct": [a == r for a, r in zip(answers, refs, strict=True)]})


def summarize_exact_match(frame: pd.DataFrame) -> dict[str, Any]:
    """Overall and per-task exact match of an `exact_match_frame`."""
    hits, tasks = frame["correct"].to_numpy(dtype=bool), frame["task"].to_numpy()
    by_task = {t: round(float(hits[tasks == t].mean()), 4) for t in sorted(set(tasks))}
    return {"exact_match": round(float(hits.mean()), 4), "exact_match_by_task": by_task, "n_eval": len(frame)}


def exact_match(model, processor, df: pd.DataFrame) -> dict[str, Any]:
    """Exact match of greedy answers against the preferred response, overall and per task."""
    return summarize_exact_match(exact_match_frame(model, processor, df))
