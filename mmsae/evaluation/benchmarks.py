"""Benchmarks for fine-tuned models: the toy benchmark (the LLaVA-Bench benchmark is in
`mmsae.evaluation.llava_bench`).

Toy benchmark
    Exact match of greedy answers on the toy world's clean held-out split, per question type (`task`),
    through `mmsae.models.toy.exact_match_frame` (the same evaluation the toy_model stage reports).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from mmsae.errors import InputError
from mmsae.models.adapters import ModelAdapter

# --------------------------------------------------------------------------------------------------
# toy benchmark


def toy_benchmark(model: Any, processor: Any, heldout: pd.DataFrame, max_samples: int | None = None,
                  batch_size: int = 128) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(per-question frame, summary) of greedy exact match on the clean held-out questions."""
    from mmsae.models.toy import exact_match_frame, summarize_exact_match

    df = heldout
    n_dropped = 0
    if "corruption" in df.columns:
        clean = df["corruption"].isna()
        n_dropped = int((~clean).sum())
        df = df[clean]
    if max_samples is not None:
        df = df.iloc[:max_samples]
    if len(df) == 0:
        raise InputError("heldout", "corruption", "no clean held-out questions")
    frame = exact_match_frame(model, processor, df.reset_index(drop=True), batch_size=batch_size)
    summary = summarize_exact_match(frame)
    summary["n_not_clean_skipped"] = n_dropped
    return frame, summary


def toy_answer_logprob(adapter: ModelAdapter, frame: pd.DataFrame, heldout: pd.DataFrame,
                       batch_size: int = 128) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add `answer_logprob` (mean log-probability per token of the reference answer, EOS included,
    given image and question; teacher-forced) to a `toy_benchmark` frame, and its summary overall and
    per task. Unlike exact match it still moves when a model's argmax does not, so it shows what
    training on bad data costs a model that answers almost everything right."""
    from mmsae.data.schema import records_from_frame
    from mmsae.models.loss import response_loss

    rows = heldout.set_index(heldout["sample_id"].astype(str)).loc[frame["sample_id"]].reset_index(drop=True)
    loss = response_loss(adapter, records_from_frame(rows), batch_size, progress=False)
    frame = frame.assign(answer_logprob=-loss["loss"].to_numpy())
    by_task = frame.groupby("task")["answer_logprob"].mean()
    return frame, {"answer_logprob": round(float(frame["answer_logprob"].mean()), 6),
                   "answer_logprob_by_task": {t: round(float(v), 6) for t, v in by_task.items()}}

