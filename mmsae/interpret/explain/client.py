"""The explainer: any OpenAI-compatible chat endpoint, one request per feature."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm import tqdm

from mmsae.errors import InputError
from mmsae.interpret.explain.tables import prompt_hash
from mmsae.params import ExplainParams

log = logging.getLogger("mmsae.explain")


@dataclass
class ExplainerConfig:
    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.0
    max_tokens: int = 64
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0


class ChatError(Exception):
    """A request that failed after its retries, or a reply with no usable text."""


def api_key(cfg: ExplainerConfig) -> str | None:
    """The key from the variable named by api_key_env (never stored or logged)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise InputError("explain params", "explain.api_key_env", f"environment variable {cfg.api_key_env!r} is not set")
    return key


def chat(cfg: ExplainerConfig, messages: list[dict[str, Any]], key: str | None = None,
         sleep: Callable[[float], None] = time.sleep) -> str:
    """One chat completion; the reply's text. Retries connection errors, timeouts, 429 and 5xx up to
    cfg.retries times (backoff_s x 2^k seconds between, at most 60); ChatError otherwise."""
    # llava_bench.chat_completion fixes the judge's system prompt and a text-only user turn, so it
    # cannot carry the explainer's multimodal message; this client takes the messages as they are.
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                       "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = cfg.base_url.rstrip("/") + "/chat/completions"

    def redact(text: str) -> str:
        return text.replace(key, "<redacted>") if key else text

    last = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            sleep(min(60.0, cfg.backoff_s * 2 ** (attempt - 1)))
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200] if exc.fp else ""
            last = f"HTTP {exc.code}: {redact(detail)}"
            if exc.code != 429 and exc.code < 500:
                raise ChatError(last) from exc
            continue
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
            last = f"{exc.__class__.__name__}: {redact(str(exc))}"
            continue
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ChatError(f"unexpected response shape: {redact(json.dumps(reply)[:200])}") from exc
    raise ChatError(f"request failed after {cfg.retries + 1} attempts: {last}")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_messages(prompt: str, images: Sequence[bytes], texts: Sequence[str]) -> list[dict[str, Any]]:
    """One user turn: the prompt, the masked images (PNG data URIs), then the numbered text contexts."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for i, png in enumerate(images):
        content.append({"type": "text", "text": f"Image {i + 1}:"})
        content.append({"type": "image_url", "image_url": {"url": data_uri(png)}})
    lines = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts)) if texts else "(none)"
    content.append({"type": "text", "text": f"Text passages:\n{lines}"})
    return [{"role": "user", "content": content}]


def parse_explanation(reply: str) -> str:
    """The first non-empty line, without markdown emphasis, quotes or a final full stop."""
    lines = [ln.strip() for ln in (reply or "").splitlines() if ln.strip()]
    if not lines:
        raise ChatError("empty reply")
    text = re.sub(r"^(?:explanation|answer|concept)\s*:\s*", "", lines[0], flags=re.I)
    text = text.strip("*_`\"' ").rstrip(".").strip()
    if not text:
        raise ChatError(f"no explanation in reply: {lines[0][:120]!r}")
    return text[:300]


def explain_features(selected: Sequence[int], images: Mapping[int, Sequence[bytes]], texts: Mapping[int, Sequence[str]],
                     prompt: str, cfg: ExplainerConfig,
                     complete: Callable[[list[dict[str, Any]]], str] | None = None) -> pd.DataFrame:
    """Per feature: explanation (null on failure), raw_response, error, n_images, n_texts, model,
    prompt_hash. A failed request or unusable reply is recorded, not raised. `complete` (messages ->
    reply text) replaces the HTTP client in tests."""
    if complete is None:
        key = api_key(cfg)

        def complete(messages: list[dict[str, Any]]) -> str:
            return chat(cfg, messages, key)

    rows = []
    for f in tqdm(selected, desc="explain", unit="feature", mininterval=5):
        imgs, txts = list(images.get(f, [])), list(texts.get(f, []))
        reply, explanation, error = None, None, None
        try:
            reply = complete(build_messages(prompt, imgs, txts))
            explanation = parse_explanation(reply)
        except ChatError as exc:
            error = str(exc)
            log.warning("explain: feature %d failed: %s", f, error)
        rows.append({"feature": int(f), "explanation": explanation, "model": cfg.model,
                     "prompt_hash": prompt_hash(prompt), "n_images": len(imgs), "n_texts": len(txts),
                     "raw_response": reply, "error": error})
    return pd.DataFrame(rows)


def explainer_config(params: ExplainParams) -> ExplainerConfig:
    """The client settings of the `explain` config slice; base_url is required."""
    if not params.base_url:
        raise InputError("explain params", "explain.base_url",
                         "not set: give the explainer's OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    return ExplainerConfig(base_url=params.base_url, model=params.model, api_key_env=params.api_key_env,
                           temperature=params.temperature, max_tokens=params.max_tokens,
                           timeout_s=params.timeout_s, retries=params.retries, backoff_s=params.backoff_s)
