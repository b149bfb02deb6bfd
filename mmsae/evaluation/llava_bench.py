"""LLaVA-Bench (In-the-Wild): reading it, generating the answers, and the LLM judge.

LLaVA-Bench (In-the-Wild), from local files
    `questions.jsonl` (question_id, image, text, category), `context.jsonl` (image, caption: a string
    or a list of lines), `answers_gpt4.jsonl` (question_id, text: the reference answers) and an
    `images/` folder. Answers are generated greedily, one question at a time (no padding), in the
    pipeline's prompt format through `ModelAdapter.build_batch`, so any model `load_model` loads works.
    A text-only judge behind any OpenAI-compatible endpoint (POST {base_url}/chat/completions) rates
    the reference (GPT-4) answer and the candidate 1-10 with LLaVA's rule prompt for the question's
    category (`llava_bench_conv` / `_detail` / `_complex`, rule.json of the LLaVA release), given the
    caption and the question. The first non-empty line of the reply must hold the two scores;
    commas, "Assistant 1:"-style labels, "/10" and markdown are tolerated. A reply that does not parse,
    or a request that fails after its retries, is a recorded failure (`judge_error`), counted per
    category and left out of the means, never dropped silently. (LLaVA's summariser averages failures
    in as -1; we do not.) Relative score = 100 * mean(candidate) / mean(reference), per category and
    pooled over all judged questions ("overall", LLaVA's "all"). The judge setup (model, base URL,
    answer order, averaging, temperature) is stored with every score: scores are only comparable
    under the same setup. The API key is read from the environment variable named in the config and
    never logged or stored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.models.adapters import ModelAdapter

log = logging.getLogger("mmsae.benchmarks")

# --------------------------------------------------------------------------------------------------
# LLaVA-Bench: data and generation

QUESTIONS, CONTEXT, ANSWERS, IMAGES = "questions.jsonl", "context.jsonl", "answers_gpt4.jsonl", "images"
CATEGORIES = ("conv", "detail", "complex")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {i}", f"not JSON ({exc.msg})") from exc
    return rows


def _field(row: dict[str, Any], key: str, path: Path) -> Any:
    if key not in row:
        raise InputError(path, key, f"missing in row {row!r:.120}")
    return row[key]


def read_llava_bench(folder: str | os.PathLike) -> pd.DataFrame:
    """One row per question: question_id, category, image (file name), question, caption, reference."""
    folder = Path(folder)
    qpath, cpath, apath = folder / QUESTIONS, folder / CONTEXT, folder / ANSWERS
    captions = {}
    for row in _jsonl(cpath):
        cap = _field(row, "caption", cpath)
        captions[str(_field(row, "image", cpath))] = "\n".join(cap) if isinstance(cap, list) else str(cap)
    refs = {_field(r, "question_id", apath): str(_field(r, "text", apath)) for r in _jsonl(apath)}
    rows = []
    for q in _jsonl(qpath):
        qid, image = _field(q, "question_id", qpath), str(_field(q, "image", qpath))
        category = str(_field(q, "category", qpath))
        if category not in CATEGORIES:
            raise InputError(qpath, "category", f"question {qid}: {category!r} is not one of {CATEGORIES}")
        if image not in captions:
            raise InputError(cpath, "caption", f"no caption for image {image!r} (question {qid})")
        if qid not in refs:
            raise InputError(apath, "question_id", f"no reference answer for question {qid}")
        if not (folder / IMAGES / image).exists():
            raise InputError(folder / IMAGES / image, "image", f"missing image of question {qid}")
        rows.append({"question_id": qid, "category": category, "image": image, "question": str(_field(q, "text", qpath)),
                     "caption": captions[image], "reference": refs[qid]})
    if not rows:
        raise InputError(qpath, "question_id", "no questions")
    return pd.DataFrame(rows)


@torch.no_grad()
def generate_answer(adapter: ModelAdapter, question: str, image: Any, max_new_tokens: int) -> str:
    """Greedy answer of any adapter's model to one question (pipeline prompt format, no padding)."""
    record = Record("q", question, image, [], -1)
    inputs, _ = adapter.build_batch([record], include_response=False)
    tok = adapter.tokenizer
    out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate_llava_bench(adapter: ModelAdapter, bench: pd.DataFrame, folder: str | os.PathLike,
                         max_new_tokens: int) -> list[str]:
    from mmsae.data.schema import decode_image

    answers = []
    for i, row in enumerate(bench.itertuples(index=False)):
        path = Path(folder) / IMAGES / row.image
        image = decode_image(path.read_bytes(), path, str(row.question_id))
        answers.append(generate_answer(adapter, row.question, image, max_new_tokens))
        if (i + 1) % 10 == 0 or i + 1 == len(bench):
            log.info("llava_bench: %d/%d answers", i + 1, len(bench))
    return answers


# --------------------------------------------------------------------------------------------------
# LLaVA-Bench: the judge

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"
# LLaVA's rule.json, llava_bench_{conv,detail,complex} (the three are the same text in the release).
RULE_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
RULES = {c: {"role": ROLE, "prompt": RULE_PROMPT} for c in CATEGORIES}
AVERAGING = ("per category and overall: 100 * mean(candidate) / mean(reference) over the questions whose reply "
             "parsed; overall pools all questions (LLaVA's 'all'); failures counted, not averaged in")


@dataclass
class JudgeConfig:
    base_url: str
    model: str = "gpt-4-0314"
    api_key_env: str | None = None
    temperature: float = 0.2
    max_tokens: int = 1024
    order: str = "reference_first"
    timeout_s: float = 120.0
    retries: int = 3

    def setup(self) -> dict[str, Any]:
        """What makes a score comparable: stored with every score (no key, only the variable's name)."""
        return {**{k: v for k, v in asdict(self).items() if k not in ("timeout_s", "retries")},
                "system_prompt": SYSTEM_PROMPT, "rules": "LLaVA rule.json llava_bench_{conv,detail,complex}",
                "score_line": "first non-empty line: '<assistant 1> <assistant 2>'", "averaging": AVERAGING}


class JudgeError(Exception):
    """A judge request that failed (after retries) or a reply that does not parse."""


def judge_content(caption: str, question: str, answer1: str, answer2: str, category: str) -> str:
    """The user message LLaVA's eval_gpt_review_bench.py sends (answer 1 / answer 2 in that order)."""
    rule = RULES[category]
    role, prompt = rule["role"], rule["prompt"]
    return (f"[Context]\n{caption}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n")


def chat_completion(cfg: JudgeConfig, content: str, api_key: str | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """One chat completion (system + user message); the reply's text. Retries connection errors,
    timeouts, 429 and 5xx up to `cfg.retries` times with exponential backoff; JudgeError otherwise."""
    body = json.dumps({"model": cfg.model, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                                        {"role": "user", "content": content}],
                       "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    last = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
            try:
                return str(reply["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError) as exc:
                raise JudgeError(f"unexpected response shape: {_redact(json.dumps(reply)[:200], api_key)}") from exc
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200] if exc.fp else ""
            last = f"HTTP {exc.code}: {_redact(detail, api_key)}"
            if exc.code != 429 and exc.code < 500:
                raise JudgeError(last) from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
            last = f"{exc.__class__.__name__}: {_redact(str(exc), api_key)}"
    raise JudgeError(f"request failed after {cfg.retries + 1} attempts: {last}")


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "<redacted>") if key else text


_LABEL = re.compile(r"\b(?:assistant|answer|response|score)\s*[12]\b\s*[:=]?", re.I)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_scores(reply: str) -> tuple[float, float]:
    """The two scores on the first non-empty line of a judge reply; JudgeError when it has not exactly two
    numbers in [0, 10]. Tolerates commas, 'Assistant 1: 8'-style labels, '8/10', markdown and text."""
    lines = [ln for ln in (reply or "").splitlines() if ln.strip()]
    if not lines:
        raise JudgeError("empty reply")
    line = _LABEL.sub(" ", lines[0].replace(",", " "))
    line = re.sub(r"/\s*10(?:\.0+)?\b", " ", line)
    numbers = [float(x) for x in _NUMBER.findall(line)]
    if len(numbers) != 2:
        raise JudgeError(f"first line has {len(numbers)} numbers, expected 2: {lines[0][:120]!r}")
    if not all(0.0 <= x <= 10.0 for x in numbers):
        raise JudgeError(f"score out of range 0-10: {lines[0][:120]!r}")
    return numbers[0], numbers[1]


def judge_llava_bench(bench: pd.DataFrame, answers: Sequence[str], cfg: JudgeConfig,
                      complete: Callable[[str], str] | None = None) -> pd.DataFrame:
    """Per question: the bench columns, the candidate answer, score_reference / score_candidate
    (NaN on failure), judge_ok, judge_error and the raw replies. `complete` (content -> reply text)
    replaces the HTTP client in tests."""
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise InputError("benchmark params", "benchmark.judge.api_key_env",
                             f"environment variable {cfg.api_key_env!r} is not set")
    if complete is None:
        def complete(content: str) -> str:
            return chat_completion(cfg, content, api_key)

    orders = {"reference_first": [True], "candidate_first": [False], "both": [True, False]}[cfg.order]
    rows = []
    for i, (row, answer) in enumerate(zip(bench.itertuples(index=False), answers, strict=True)):
        ref_scores, cand_scores, replies, errors = [], [], [], []
        for ref_first in orders:
            a1, a2 = (row.reference, answer) if ref_first else (answer, row.reference)
            reply = None
            try:
                reply = complete(judge_content(row.caption, row.question, a1, a2, row.category))
                s1, s2 = parse_scores(reply)
                ref_scores.append(s1 if ref_first else s2)
                cand_scores.append(s2 if ref_first else s1)
            except JudgeError as exc:
                errors.append(f"{'reference' if ref_first else 'candidate'}_first: {exc}")
            replies.append(reply)
        ok = not errors
        rows.append({**row._asdict(), "answer": answer,
                     "score_reference": float(np.mean(ref_scores)) if ok else math.nan,
                     "score_candidate": float(np.mean(cand_scores)) if ok else math.nan,
                     "judge_ok": ok, "judge_error": "; ".join(errors) if errors else None,
                     "judge_reply": replies[0], "judge_reply_swapped": replies[1] if len(replies) > 1 else None})
        if errors:
            log.warning("llava_bench judge: question %s failed: %s", row.question_id, "; ".join(errors))
        if (i + 1) % 10 == 0 or i + 1 == len(bench):
            log.info("llava_bench judge: %d/%d questions", i + 1, len(bench))
    return pd.DataFrame(rows)


def relative_scores(judged: pd.DataFrame) -> dict[str, Any]:
    """Per category and overall: n, n_failed, mean reference / candidate score, relative score."""
    def stats(part: pd.DataFrame) -> dict[str, Any]:
        ok = part[part["judge_ok"]]
        ref, cand = ok["score_reference"].mean(), ok["score_candidate"].mean()
        rel = 100.0 * cand / ref if len(ok) and ref > 0 else None
        return {"n": int(len(part)), "n_judged": int(len(ok)), "n_failed": int(len(part) - len(ok)),
                "mean_reference": float(ref) if len(ok) else None, "mean_candidate": float(cand) if len(ok) else None,
                "relative": float(rel) if rel is not None else None}

    out = {c: stats(judged[judged["category"] == c]) for c in CATEGORIES if (judged["category"] == c).any()}
    out["overall"] = stats(judged)
    return out

