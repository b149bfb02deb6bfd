"""The toy model's evaluation: greedy answers, their exact match against the preferred response, and
`answer_match` (the concept words the answer adds to the question, in order, equal the reference's, and
no unhelpful phrase): the metric for the alignment setting's multi-word answers in varied phrasings."""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import torch
from PIL import Image

from mmsae.data.toyvocab import CONCEPTS, UNHELPFUL
from mmsae.models.prompts import format_prompt
from mmsae.models.toy.build import MAX_NEW_TOKENS
from mmsae.models.toy.data import preferred_response


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


def _added_concepts(text: str, question: str) -> list[str]:
    asked = set(question.split())
    return [w for w in text.split() if w in CONCEPTS and w not in asked]


def answer_match(answer: str, reference: str, question: str) -> bool:
    """Does `answer` say what `reference` says, in any phrasing?

    The concept words (colours, shapes, sides) each adds to the question, in order, must be equal, and
    the answer must hold no unhelpful phrase (toyvocab.UNHELPFUL, e.g. "i can not tell"). So "left",
    "on the left" and "the red square is on the left" all match "it is on the left" for "which side is
    the red square on ?"; "right", "left right" and "" do not. Order counts ("describe ?" asks for the
    left object first). A reference without concept words (the text-only task: "color") needs an exact
    match.
    """
    answer, reference = " ".join(answer.split()), " ".join(reference.split())
    padded = f" {answer} "
    if any(f" {p} " in padded for p in UNHELPFUL):
        return False
    want = _added_concepts(reference, question)
    if not want:
        return answer == reference
    return _added_concepts(answer, question) == want


def exact_match_frame(model, processor, df: pd.DataFrame, batch_size: int = 128) -> pd.DataFrame:
    """Per question: sample_id, task ("all" without a task column), question, the greedy answer, the
    reference (the preferred response, whitespace-normalised), whether they are equal (`correct`) and
    whether the answer says the same in any phrasing (`answer_match`)."""
    answers = generate_answers(model, processor, list(df["question"]), list(df["image"]), batch_size=batch_size)
    refs = [" ".join(preferred_response(r).split()) for r in df.itertuples(index=False)]
    tasks = df["task"].astype(str).tolist() if "task" in df.columns else ["all"] * len(df)
    return pd.DataFrame({"sample_id": df["sample_id"].astype(str).tolist(), "task": tasks,
                         "question": list(df["question"]), "answer": answers, "reference": refs,
                         "correct": [a == r for a, r in zip(answers, refs, strict=True)],
                         "answer_match": [answer_match(a, r, q) for a, r, q in zip(answers, refs, df["question"],
                                                                                   strict=True)]})


def summarize_exact_match(frame: pd.DataFrame) -> dict[str, Any]:
    """Overall and per-task exact match and answer match of an `exact_match_frame`."""
    tasks = frame["task"].to_numpy()
    out: dict[str, Any] = {}
    for key, column in (("exact_match", "correct"), ("answer_match", "answer_match")):
        if column in frame.columns:
            hits = frame[column].to_numpy(dtype=bool)
            out[key] = round(float(hits.mean()), 4)
            out[f"{key}_by_task"] = {t: round(float(hits[tasks == t].mean()), 4) for t in sorted(set(tasks))}
    out["n_eval"] = len(frame)
    return out


def exact_match(model, processor, df: pd.DataFrame) -> dict[str, Any]:
    """Exact match and answer match of greedy answers against the preferred response, overall and per task."""
    return summarize_exact_match(exact_match_frame(model, processor, df))
