"""Fine-tuning data in TRL's vision format: prompt / completion (SFT) or chosen / rejected (DPO) strings
in the pipeline's own prompt format, and the processor TRL tokenises them with."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from mmsae.data.schema import EXTRA_IMAGES, Record, extra_image_bytes
from mmsae.errors import InputError
from mmsae.models.prompts import format_response, format_segments


def special_prefix(tokenizer: Any, text: str) -> str:
    """The special tokens the tokenizer adds in front of `text` by itself (e.g. BOS), as text.

    TRL tokenises with `add_special_tokens=False`; our stages tokenise with the default (True). Writing
    these tokens into the prompt gives the same ids both ways. Empty when the chat template already
    wrote them (the toy model) or the tokenizer adds none (Qwen2-VL).
    """
    with_special = tokenizer(text)["input_ids"]
    without = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    if n <= 0 or with_special[n:] != without:
        return ""  # nothing added in front (suffix-only additions are not used by our formats)
    return "".join(tokenizer.convert_ids_to_tokens(with_special[:n]))


def pair(record: Record, method: str, path: str | os.PathLike = "<data>") -> tuple[str, str | None]:
    """(chosen, rejected) responses of one record; InputError when it has too few responses."""
    if not record.responses:
        raise InputError(path, "responses", f"sample {record.sample_id!r}: no responses to fine-tune on")
    chosen = record.responses[record.preferred]
    if method == "sft":
        return chosen, None
    others = [r for i, r in enumerate(record.responses) if i != record.preferred]
    if not others:
        raise InputError(path, "responses", f"sample {record.sample_id!r}: DPO needs a second (rejected) response")
    return chosen, others[0]


def trl_rows(records: Sequence[Record], processor: Any, method: str,
             path: str | os.PathLike = "<data>") -> list[dict[str, Any]]:
    """TRL vision-format rows (without images) for `records`: prompt + completion or chosen/rejected."""
    tokenizer = getattr(processor, "tokenizer", processor)
    cache: dict[tuple, str] = {}
    rows = []
    for r in records:
        key = tuple(r.segments())  # text pieces and images in order: one placeholder per image
        if key not in cache:
            p = format_segments(processor, key)
            cache[key] = special_prefix(tokenizer, p) + p
        chosen, rejected = pair(r, method, path)
        if method == "sft":
            rows.append({"prompt": cache[key], "completion": format_response(processor, chosen)})
        else:
            rows.append({"prompt": cache[key], "chosen": format_response(processor, chosen),
                         "rejected": format_response(processor, rejected)})
    return rows


def build_dataset(df: pd.DataFrame, processor: Any, method: str, path: str | os.PathLike = "<data>"):
    """A `datasets.Dataset` in TRL's vision format; images stay encoded and decode to RGB on access. A
    multi-image record carries all its images, in order (its prompt has one placeholder per image), as
    TRL's vision collators pass them to the processor."""
    from datasets import Dataset, Features, Image, Sequence, Value

    records = _text_records(df)
    rows = trl_rows(records, processor, method, path)
    columns: dict[str, list[Any]] = {k: [row[k] for row in rows] for k in rows[0]}
    extra = df[EXTRA_IMAGES] if EXTRA_IMAGES in df.columns else [None] * len(df)
    columns["images"] = [[{"bytes": bytes(b), "path": None} for b in [first, *extra_image_bytes(more)]]
                         for first, more in zip(df["image"], extra, strict=True)]
    text = {k: Value("string") for k in rows[0]}
    features = Features({"images": Sequence(Image(mode="RGB")), **text})
    return Dataset.from_dict(columns, features=features)


def _text_records(df: pd.DataFrame) -> list[Record]:
    """Records without decoded images (the dataset decodes them lazily); `image` and `extra_images` are
    truthy stubs (only their number matters for the prompt)."""
    out = []
    extra = df[EXTRA_IMAGES] if EXTRA_IMAGES in df.columns else [None] * len(df)
    for sid, q, responses, pref, more in zip(df["sample_id"], df["question"], df["responses"], df["preferred"], extra,
                                             strict=True):
        responses = [] if responses is None else list(responses)
        out.append(Record(str(sid), q, True, responses, int(pref) if responses else -1,  # type: ignore[arg-type]
                          extra_images=[True] * len(extra_image_bytes(more))))
    return out


def load_processor(adapter_cls: type, path: str, trust_remote_code: bool = False) -> Any:
    """The family's processor, with the chat template restored where the processor dropped it on load
    (ChameleonProcessor in transformers 5.23; the tokenizer read the same file), as ModelAdapter does."""
    processor = adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if processor is not tokenizer and getattr(processor, "chat_template", None) is None:
        processor.chat_template = getattr(tokenizer, "chat_template", None)
    return processor


def text_completion_processor(processor: Any, adapter_cls: type) -> Any:
    """The processor, made to pass the adapter's extra processor kwargs on every call (Chameleon:
    `return_for_text_completion=True`, i.e. no separator token), so TRL tokenises as our stages do."""
    extra = adapter_cls.processor_kwargs(None)  # a constant per family
    if not extra:
        return processor
    base = type(processor)

    def __call__(self, *args, **kwargs):  # noqa: N807
        return base.__call__(self, *args, **{**extra, **kwargs})

    processor.__class__ = type(base.__name__, (base,), {"__call__": __call__})
    return processor
