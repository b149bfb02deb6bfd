"""One prompt format for training, extraction and scoring, so token positions mean the same everywhere.

The prompt comes from the processor's own chat template (every HF multimodal checkpoint ships one);
the response is appended as plain text plus the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def user_message(question: str, has_image: bool) -> list[dict[str, Any]]:
    return segments_message([0, question] if has_image else [question])


def segments_message(segments: Sequence[str | int]) -> list[dict[str, Any]]:
    """The user turn of text pieces and images in order (`Record.segments()`: an int is an image)."""
    content = [{"type": "text", "text": s} if isinstance(s, str) else {"type": "image"} for s in segments]
    return [{"role": "user", "content": content}]


def format_prompt(processor: Any, question: str, has_image: bool) -> str:
    """The text of the user turn plus the generation prompt, with the model's image placeholder."""
    return format_segments(processor, [0, question] if has_image else [question])


def format_segments(processor: Any, segments: Sequence[str | int]) -> str:
    """format_prompt for a turn of several images placed in the text: one placeholder per image, where
    `segments` puts it (the chat template writes each one)."""
    return processor.apply_chat_template(segments_message(segments), add_generation_prompt=True, tokenize=False)


def format_response(processor: Any, response: str) -> str:
    """Text appended after the prompt for a response (space-separated, then EOS)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = tokenizer.eos_token or ""
    return f" {response.strip()}{(' ' + eos) if eos else ''}"
