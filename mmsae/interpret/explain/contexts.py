"""Text contexts: a feature's top text tokens with their neighbours, decoded by the model's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import require_columns


def render_context(tokenizer: Any, window: pd.DataFrame, target_position: int, mark: tuple[str, str] = ("<<", ">>")) -> str:
    """The window's tokens (position, modality, token_id; sorted) as text: text tokens decoded
    incrementally (each piece = decode(run + [id]) minus decode(run), so spacing is the tokenizer's),
    one <image> per run of image tokens, special tokens left out, the target token marked."""
    out: list[str] = []
    run: list[int] = []
    prev = ""
    for pos, mod, tid in zip(window["position"], window["modality"], window["token_id"], strict=True):
        if mod == "image":
            if not out or out[-1] != " <image>":
                out.append(" <image>")
            run, prev = [], ""
            continue
        if mod != "text":
            continue
        full = tokenizer.decode([*run, int(tid)])
        piece = full[len(prev):] if full.startswith(prev) else tokenizer.decode([int(tid)])
        if not run and out:  # a new run after an image or at the window start: keep one space
            piece = " " + piece.lstrip()
        run.append(int(tid))
        prev = full
        if int(pos) == target_position:
            stripped = piece.lstrip()
            piece = piece[: len(piece) - len(stripped)] + mark[0] + stripped + mark[1]
        out.append(piece)
    return "".join(out).strip()


def text_contexts(features: pd.DataFrame, tokens: pd.DataFrame, selected: Sequence[int], tokenizer: Any,
                  n: int, context_tokens: int) -> dict[int, list[str]]:
    """feature -> up to n contexts of its top text tokens (features.parquet top_text_rows, in order)."""
    require_columns(Files.FEATURES, list(features.columns), ("feature", "top_text_rows"))
    require_columns(Files.TOKENS, list(tokens.columns), ("row", "sample_id", "position", "modality", "token_id"))
    tops = {int(f): [int(r) for r in rows][:n]
            for f, rows in zip(features["feature"], features["top_text_rows"], strict=True) if int(f) in set(selected)}
    by_row = tokens.set_index("row")
    need = {int(r) for rows in tops.values() for r in rows if int(r) in by_row.index}
    sids = set(by_row.loc[sorted(need), "sample_id"].astype(str)) if need else set()
    per_sample = {str(s): d.sort_values("position")
                  for s, d in tokens[tokens["sample_id"].astype(str).isin(sids)].groupby("sample_id")}
    out = {}
    for f in selected:
        contexts = []
        for r in tops.get(int(f), []):
            if r not in by_row.index:
                raise InputError(Files.TOKENS, "row", f"feature {f}: top text row {r} is not in tokens.parquet")
            sid, pos = str(by_row.at[r, "sample_id"]), int(by_row.at[r, "position"])
            toks = per_sample[sid]
            win = toks[(toks["position"] >= pos - context_tokens) & (toks["position"] <= pos + context_tokens)]
            contexts.append(render_context(tokenizer, win, pos))
        out[int(f)] = contexts
    return out
