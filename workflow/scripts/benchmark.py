"""Evaluate a model: toy-world held-out exact match and/or LLaVA-Bench (In-the-Wild); see
mmsae/evaluation/benchmarks.py and mmsae/evaluation/llava_bench.py.

--toy-heldout PARQUET   the toyworld stage's heldout.parquet (clean questions): greedy exact match,
                        overall and per question type (`task`)
--llava-bench DIR       questions.jsonl, context.jsonl, answers_gpt4.jsonl, images/: greedy answers,
                        then an LLM judge behind an OpenAI-compatible endpoint (benchmark.judge.*)
                        rates reference and candidate 1-10; relative score = 100 * mean(candidate) /
                        mean(reference) per category and overall. Without judge.base_url the answers
                        are written and judging is skipped (said in results.json and the log).

Writes, atomically:
  OUT/results.json          {"toy": {...}, "llava_bench": {... "judge": <setup>, "scores": {...}}}
  OUT/toy.parquet           per question: sample_id, task, question, answer, reference, correct,
                            answer_logprob (mean log-prob per token of the reference answer)
  OUT/llava_bench.parquet   per question: ids, category, question, reference, answer, scores, judge reply/error
  OUT/manifest.json

Example:
  python workflow/scripts/benchmark.py --model results/demo/finetune-xxxx/model --out results/demo/benchmark-yyyy \\
      --toy-heldout results/demo/toyworld-zzzz/heldout.parquet
  JUDGE_KEY=... python workflow/scripts/benchmark.py --model M --out O --llava-bench data/llava-bench-in-the-wild \\
      --params '{"judge": {"base_url": "http://judge:8000/v1", "model": "Qwen2.5-72B-Instruct", "api_key_env": "JUDGE_KEY"}}'
"""

from __future__ import annotations

import logging
import sys

from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.cli import parser, run
from mmsae.errors import InputError

STAGE = "benchmark"
log = logging.getLogger("mmsae.benchmark")


def build_parser():
    p = parser(STAGE, __doc__)
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--model-params", default="{}", help="the 'model' config slice: dtype, device, trust_remote_code")
    p.add_argument("--toy-heldout", default=None, help="toy world heldout.parquet")
    p.add_argument("--llava-bench", default=None, help="LLaVA-Bench (In-the-Wild) folder (default: benchmark.llava_bench)")
    return p


def body(args, params: dict) -> None:
    from mmsae.config import stage_params
    from mmsae.data.schema import read_frame
    from mmsae.models import load_model

    args.llava_bench = args.llava_bench or params["llava_bench"]
    if not (args.toy_heldout or args.llava_bench):
        raise InputError("arguments", "--toy-heldout/--llava-bench", "give at least one benchmark")
    from mmsae.evaluation import benchmarks as bm
    from mmsae.evaluation import llava_bench as llava

    timer = Timer()
    model_params = stage_params("model", args.model_params, source="--model-params")
    with timer("load_model"):
        adapter = load_model(args.model, dtype=model_params["dtype"], device=model_params["device"],
                             trust_remote_code=model_params["trust_remote_code"])
    results: dict = {"model": args.model, "model_family": adapter.family}
    frames = {}
    counts: dict = {}
    if args.toy_heldout:
        with timer("toy"):
            heldout = read_frame(args.toy_heldout)
            frame, summary = bm.toy_benchmark(adapter.model, adapter.processor, heldout, params["toy_max_samples"],
                                              params["toy_batch_size"])
            frame, logprob = bm.toy_answer_logprob(adapter, frame, heldout, params["toy_batch_size"])
            summary.update(logprob)
        frames["toy"], results["toy"] = frame, summary
        counts["toy_questions"] = summary["n_eval"]
        log.info("toy benchmark: exact match %.4f %s, answer log-prob %.4f", summary["exact_match"],
                 summary["exact_match_by_task"], summary["answer_logprob"])
    if args.llava_bench:
        bench = llava.read_llava_bench(args.llava_bench)
        with timer("llava_bench_generate"):
            answers = llava.generate_llava_bench(adapter, bench, args.llava_bench, params["max_new_tokens"])
        judge = params["judge"]
        lb: dict = {"n_questions": len(bench), "max_new_tokens": params["max_new_tokens"], "decoding": "greedy"}
        if judge["base_url"]:
            cfg = llava.JudgeConfig(**judge)
            with timer("llava_bench_judge"):
                judged = llava.judge_llava_bench(bench, answers, cfg)
            lb["judge"] = cfg.setup()
            lb["scores"] = llava.relative_scores(judged)
            counts["llava_bench_judge_failures"] = lb["scores"]["overall"]["n_failed"]
            log.info("llava_bench: relative score %s (judge %s at %s, %s)", lb["scores"]["overall"]["relative"],
                     cfg.model, cfg.base_url, cfg.order)
        else:
            judged = bench.assign(answer=answers)
            lb["judge"] = {"skipped": "no benchmark.judge.base_url configured: answers generated, not judged"}
            log.info("llava_bench: judging skipped (no benchmark.judge.base_url configured)")
        frames["llava_bench"], results["llava_bench"] = judged, lb
        counts["llava_bench_questions"] = len(bench)
    with atomic_dir(args.out) as tmp:
        for name, frame in frames.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / Files.RESULTS, results)
        inputs = {"model": args.model}
        if args.toy_heldout:
            inputs["toy_heldout"] = args.toy_heldout
        if args.llava_bench:
            inputs["llava_bench"] = args.llava_bench
        write_manifest(tmp, STAGE, {**params, "model": model_params}, inputs=inputs, counts=counts,
                       timings=timer.timings)


if __name__ == "__main__":
    sys.exit(run(STAGE, build_parser(), body))
