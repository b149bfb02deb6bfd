"""The toy model's training data: the text and image renderings of the toy world, patch targets and
the patch-to-word alignment loss."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mmsae.data import toyworld
from mmsae.models.prompts import format_prompt, format_response
from mmsae.models.toy.build import GRID, IMAGE_SIZE, N_IMAGE_TOKENS


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


def preferred_response(row) -> str:
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

