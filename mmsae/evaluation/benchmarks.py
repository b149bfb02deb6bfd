"""Stage benchmark: evaluate a model on the toy-world held-out questions and/or LLaVA-Bench (In-the-Wild).
The toy benchmark is here; the LLaVA-Bench benchmark is in `mmsae.evaluation.llava_bench`.

--toy-heldout PARQUET   the toyworld stage's heldout.parquet (clean questions): greedy exact match and
                        answer match (the answer names the reference's colours, shapes and sides, in
                        order, in any phrasing, and refuses nothing: the metric for the alignment
                        setting's multi-word answers), overall and per question type (`task`), through
                        `mmsae.models.toy.exact_match_frame` (the same evaluation the toy_model stage
                        reports), plus the mean log-prob per token of the reference answer
--llava-bench DIR       questions.jsonl, context.jsonl, answers_gpt4.jsonl, images/: greedy answers,
                        then an LLM judge behind an OpenAI-compatible endpoint (benchmark.judge.*)
                        rates reference and candidate 1-10; relative score = 100 * mean(candidate) /
                        mean(reference) per category and overall. Without judge.base_url the answers
                        are written and judging is skipped (said in results.json and the log).

Writes, atomically:
  OUT/results.json          {"toy": {...}, "llava_bench": {... "judge": <setup>, "scores": {...}}}
  OUT/toy.parquet           per question: sample_id, task, question, answer, reference, correct,
                            answer_match, answer_logprob (mean log-prob per token of the reference answer)
  OUT/llava_bench.parquet   per question: ids, category, question, reference, answer, scores, judge reply/error
  OUT/manifest.json

Example:
  python workflow/scripts/benchmark.py --model results/demo/finetune-xxxx/model --out results/demo/benchmark-yyyy \\
      --toy-heldout results/demo/toyworld-zzzz/heldout.parquet
  JUDGE_KEY=... python workflow/scripts/benchmark.py --model M --out O --llava-bench data/llava-bench-in-the-wild \\
      --params '{"judge": {"base_url": "http://judge:8000/v1", "model": "Qwen2.5-72B-Instruct", "api_key_env": "JUDGE_KEY"}}'
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.data.schema import read_frame
from mmsae.errors import InputError
from mmsae.evaluation import llava_bench as llava
from mmsae.models import load_model_with
from mmsae.models.adapters import ModelAdapter
from mmsae.params import BenchmarkParams, ModelParams

log = logging.getLogger("mmsae.benchmark")

# --------------------------------------------------------------------------------------------------
# toy benchmark


def toy_benchmark(model: Any, processor: Any, heldout: pd.DataFrame, max_samples: int | None = None,
                  batch_size: int = 128) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(per-question frame, summary) of greedy exact match and answer match on the clean held-out questions."""
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


# --------------------------------------------------------------------------------------------------
# the stage

STAGE = "benchmark"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    model: str = cli.arg("model folder or hub id")
    model_params: ModelParams = cli.arg("the 'model' config slice: dtype, device, trust_remote_code",
                                        default_factory=lambda: ModelParams.load({}))
    toy_heldout: Path | None = cli.arg("toy world heldout.parquet", default=None)
    llava_bench: Path | None = cli.arg("LLaVA-Bench (In-the-Wild) folder (default: benchmark.llava_bench)",
                                       default=None)


@dataclasses.dataclass
class _Results:
    """What the benchmarks add up to: results.json, the per-question frames, the manifest counts."""

    results: dict[str, Any]
    frames: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)


def run(inputs: Inputs, params: BenchmarkParams, out: Path) -> None:
    llava_bench = inputs.llava_bench or params.llava_bench
    if not (inputs.toy_heldout or llava_bench):
        raise InputError("arguments", "--toy-heldout/--llava-bench", "give at least one benchmark")
    timer = Timer()
    with timer("load_model"):
        adapter = load_model_with(inputs.model, inputs.model_params)
    acc = _Results({"model": inputs.model, "model_family": adapter.family})
    if inputs.toy_heldout:
        _run_toy(adapter, inputs.toy_heldout, params, timer, acc)
    if llava_bench:
        _run_llava_bench(adapter, llava_bench, params, timer, acc)
    with atomic_dir(out) as tmp:
        for name, frame in acc.frames.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / Files.RESULTS, acc.results)
        manifest_inputs = {"model": inputs.model}
        if inputs.toy_heldout:
            manifest_inputs["toy_heldout"] = inputs.toy_heldout
        if llava_bench:
            manifest_inputs["llava_bench"] = llava_bench
        write_manifest(tmp, STAGE, cli.manifest_params(params, inputs.model_params),
                       inputs=manifest_inputs, counts=acc.counts, timings=timer.timings)


def _run_toy(adapter: ModelAdapter, heldout_path: Path, params: BenchmarkParams, timer: Timer,
             acc: _Results) -> None:
    with timer("toy"):
        heldout = read_frame(heldout_path)
        frame, summary = toy_benchmark(adapter.model, adapter.processor, heldout, params.toy_max_samples,
                                       params.toy_batch_size)
        frame, logprob = toy_answer_logprob(adapter, frame, heldout, params.toy_batch_size)
        summary.update(logprob)
    acc.frames["toy"], acc.results["toy"] = frame, summary
    acc.counts["toy_questions"] = summary["n_eval"]
    log.info("toy benchmark: answer match %.4f %s, exact match %.4f, answer log-prob %.4f", summary["answer_match"],
             summary["answer_match_by_task"], summary["exact_match"], summary["answer_logprob"])


def _run_llava_bench(adapter: ModelAdapter, folder: str | Path, params: BenchmarkParams, timer: Timer,
                     acc: _Results) -> None:
    bench = llava.read_llava_bench(folder)
    with timer("llava_bench_generate"):
        answers = llava.generate_llava_bench(adapter, bench, folder, params.max_new_tokens)
    judge = params.judge
    lb: dict = {"n_questions": len(bench), "max_new_tokens": params.max_new_tokens, "decoding": "greedy"}
    if judge.base_url:
        cfg = llava.JudgeConfig(**judge.as_dict())
        with timer("llava_bench_judge"):
            judged = llava.judge_llava_bench(bench, answers, cfg)
        lb["judge"] = cfg.setup()
        lb["scores"] = llava.relative_scores(judged)
        acc.counts["llava_bench_judge_failures"] = lb["scores"]["overall"]["n_failed"]
        log.info("llava_bench: relative score %s (judge %s at %s, %s)", lb["scores"]["overall"]["relative"],
                 cfg.model, cfg.base_url, cfg.order)
    else:
        judged = bench.assign(answer=answers)
        lb["judge"] = {"skipped": "no benchmark.judge.base_url configured: answers generated, not judged"}
        log.info("llava_bench: judging skipped (no benchmark.judge.base_url configured)")
    acc.frames["llava_bench"], acc.results["llava_bench"] = judged, lb
    acc.counts["llava_bench_questions"] = len(bench)
