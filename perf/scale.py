"""Encode, features and score as the data grows: throughput and peak memory at 1x and `--factor`x.

For each size, a synthetic extract store (perf/_data.py) and one random TopK SAE (k active latents
per token, so the codes have a known size) are made; then each stage runs in its own subprocess, as
the pipeline runs it:

- encode:   `mmsae.sae.encode.encode_store` -> codes.parquet;
- features: `mmsae.features.feature_table` + `write_features` (top-K per modality, cross-modal weights);
- score:    `mmsae.scoring.score_samples` with every method that needs no model loss, the SAE given
            (offdist's reconstruction error), as workflow/scripts/score.py builds its ScoringContext.
            The scored sample ids are read (from tokens.parquet's sample_id column, as a dictionary)
            before the memory baseline: the pipeline takes them from samples.parquet, one per sample.

The concept-feature set XMc (score.consistency) of the schema's defaults is empty on this synthetic store
(a random SAE's features fire on many words: no cross-modal feature passes min_selectivity with the rest),
so the consistency passes (concept_sums, binding) would hold nothing. score therefore runs with
--consistency, by default a loose selection (min_per_modality 1, min_selectivity 0, max_doc_freq 1,
min_balance 0: every cross-modal feature, 898 -> 1,008 of 1,024 at the default sizes), which makes those
passes as heavy as they get. The XMc size is printed and recorded (`n_concept_features`).

Memory: the subprocess's peak RSS (VmHWM, reset right after the set-up where Linux allows it, so it is the
stage's own peak, not that of loading the SAE) and its increase over the RSS measured right before the
stage (after imports and set-up): that increase should stay flat as the data grows
10x if the stage streams. The stages stream in blocks (encode: --batch-tokens tokens; features and
score: --batch-rows codes rows; score's pass over the store: 8 store chunks), so the 1x size must
already span a few blocks for the comparison to mean anything: the defaults use smaller blocks than
the pipeline's to keep the run short. Prints one line with the throughputs and the memory ratios.
--score-steps also records score's RSS after each of its shared passes (where the peak comes from).

Pipeline block sizes (about 3 minutes here): --samples 1200 --batch-rows 1048576 --chunk-tokens 8192

H100: --device cuda --d-in 4096 --d-sae 65536 --k 64 --samples 2000 --factor 10 --batch-tokens 4096
(the feature and score stages run on the CPU whatever the device: only encode uses it).

7B widths on this CPU (--widths 7b = --d-in 4096 --d-sae 65536 --k 64; perf/README.md section 4):
  --widths 7b --samples 4 --factor 10 --batch-tokens 64 --batch-rows 4096 --chunk-tokens 64
256 -> 2,560 tokens, blocks small enough that 1x spans 4 of each; about 25 minutes on the shared 2-core
machine (the SAE's 2 x 4096 x 65,536 GEMMs in encode and in score's reconstruction error dominate).
The SAE itself is 2 GB (fp32 W_enc + W_dec), in the baseline of encode and score; the peak *increase*
is what must stay flat.

--synthetic-codes (perf/_codes.py): the real features and score stages (`mmsae.features.run`,
`mmsae.scoring.stage.run`, as the pipeline's scripts call them, schema defaults for the rest) on a drawn
pool: a store, codes.parquet written with the encode stage's CodesWriter (Zipf latents, ~k per token),
the token index and samples.parquet; sizes `--factors` x `--samples` samples of 1,024 tokens (98% image,
3 images per sample). Encode is not run in this mode (it needs the SAE over real activations: the mode
above). Score runs without the SAE (sae=None: offdist / consistency_gated without the reconstruction
error, which is ~12 ms per image token on a CPU: hours at these sizes), with every other method but
model_loss. The flat regime at d 4096 x 65,536 (perf/README.md, section 4's last part; ~35 minutes, 6 GB of disk):
  MALLOC_MMAP_THRESHOLD_=65536 python perf/scale.py --synthetic-codes --widths 7b --samples 64 --factors 1,3,10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mmsae.artifacts import MANIFEST, Files, read_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_common_args,
    current_rss_mb,
    machine,
    now,
    peak_rss_mb,
    report,
    reset_peak_rss,
    setup,
)

STAGES = ("encode", "features", "score")
# score.methods that need no model loss (model_loss needs a model_loss artifact)
METHODS = ("cosine", "l0", "l1", "cooc_l0", "random", "nosae_cosine", "consistency", "consistency_cos", "offdist",
           "consistency_gated", "consistency_binding", "consistency_binding_gated")
# ScoringContext's cached passes, in the order --score-steps computes them (then all METHODS)
SCORE_STEPS = ("token_index", "code_stats", "concept_features", "concept_sums", "binding", "image_stats")
# score.consistency for the bench (see the docstring): a non-empty XMc on the synthetic store
CONSISTENCY = {"min_per_modality": 1, "min_selectivity": 0.0, "max_doc_freq": 1.0, "min_balance": 0.0}


def run_worker(stage: str, work: Path, label: str, passthrough: list[str]) -> dict[str, Any]:
    """One stage in its own process (so its peak RSS is its own): the worker's last stdout line, as JSON."""
    cmd = [sys.executable, __file__, "--worker", stage, "--dir", str(work), *passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {stage} at {label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(work: Path, samples: int, args: argparse.Namespace) -> None:
    """work/extract (store) and work/sae (a random TopK SAE in the SAELens layout)."""
    from _data import write_store

    from mmsae.sae.io import save_sae
    from mmsae.sae.model import SAEConfig, build_sae

    write_store(work / "extract", samples, args.d_in, args.seed, chunk_tokens=args.chunk_tokens)
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture="topk", k=args.k, apply_b_dec_to_input=True,
                    metadata={"hook_layer": 0, "hook_name": "blocks.0.hook_resid_post"})
    save_sae(build_sae(cfg, seed=args.seed), work / "sae")


def synthetic_worker(stage: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the real features or score stage on work/ (perf/_codes.py's pool); its time and memory."""
    setup(args.threads, "cpu")
    from mmsae import features as features_stage
    from mmsae.artifacts import read_manifest
    from mmsae.params import FeaturesParams, ScoreParams
    from mmsae.scoring import stage as score_stage

    n_tokens = read_manifest(work / "encode")["counts"]["n_tokens"]
    base = current_rss_mb()
    reset = reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if stage == "features":
        out = work / "features"
        features_stage.run(features_stage.Inputs(encode=work / "encode", extract=work / "extract"),
                           FeaturesParams.load({"cosine_memory_mb": args.cosine_memory_mb}), out)
    else:
        out = work / "score"
        params = ScoreParams.load({"methods": list(METHODS), "consistency": json.loads(args.consistency)})
        score_stage.run(score_stage.Inputs(samples=work / "sample", extract=work / "extract", encode=work / "encode",
                                           features=work / "features"), params, out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    counts = read_manifest(out)["counts"]
    extra: dict[str, Any] = {}
    if stage == "features":  # the d_sae-bounded structures that fill as tokens grow (perf/README.md: the flat regime)
        xm = counts["classes"]["cross-modal"]
        group = features_stage.cosine_group_size(args.d_in, args.cosine_memory_mb << 20)
        extra = {"cross_modal": xm, "cosine_groups": -(-xm // group),
                 "cosine_sums_mb": min(xm, group) * features_stage.cosine_feature_bytes(args.d_in) / 2**20}
    else:
        extra = {"n_concept_features": counts.get("n_concept_features"), "n_samples": counts["n_samples"]}
    return {"stage": stage, "n_tokens": n_tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": n_tokens / wall,
            "tokens_per_cpu_s": n_tokens / cpu, "rss_before_mb": base, "peak_rss_mb": peak_rss_mb(),
            "peak_increase_mb": peak_rss_mb() - base, "peak_reset": reset, **extra}


def synthetic_pool(work: Path, samples: int, args: argparse.Namespace, keep: bool) -> dict[str, Any]:
    """perf/_codes.py's pool in work/ (its counts and write time); with `keep`, one written there before for
    the same sizes is reused (its stage outputs removed)."""
    from _codes import write_pool

    if keep and (work / "encode" / MANIFEST).exists():
        counts = read_manifest(work / "encode")["counts"]
        want = {"n_samples": samples, "d_sae": args.d_sae, "n_tokens": samples * args.tokens_per_sample}
        if any(counts.get(k) != v for k, v in want.items()):
            raise SystemExit(f"error: the kept pool in {work} is not this size ({want}); remove it")
        for out in ("features", "score"):
            shutil.rmtree(work / out, ignore_errors=True)
        return {**counts, "write_s": 0.0}
    t0 = time.perf_counter()
    counts = write_pool(work, samples, args.d_in, args.d_sae, args.k, seed=args.seed,
                        tokens_per_sample=args.tokens_per_sample, images=args.images, image_tokens=args.image_tokens,
                        zipf=args.zipf, chunk_tokens=args.chunk_tokens, part_tokens=args.part_tokens)
    return {**counts, "write_s": time.perf_counter() - t0}


def synthetic_main(args: argparse.Namespace) -> int:
    """--synthetic-codes: features and score at each of --factors x --samples samples (see the docstring)."""
    stages = [s for s in args.stages.split(",") if s and s != "encode"]
    factors = [int(f) for f in args.factors.split(",")]
    runs: dict[str, dict[str, Any]] = {}
    passthrough = ["--synthetic-codes", "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k),
                   "--threads", str(args.threads), "--consistency", args.consistency,
                   "--cosine-memory-mb", str(args.cosine_memory_mb)]
    keep = args.keep and args.work
    with contextlib.nullcontext(args.work) if keep else tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for f in factors:
            label, work = f"{f}x", Path(tmp) / f"{f}x"
            runs[label] = {"pool": synthetic_pool(work, args.samples * f, args, bool(keep))}
            for stage in stages:
                runs[label][stage] = (synthetic_worker(stage, work, args) if args.inline
                                      else run_worker(stage, work, label, passthrough))
            print(f"{label}: " + json.dumps(runs[label]), file=sys.stderr, flush=True)
    small, big = runs[f"{factors[0]}x"], runs[f"{factors[-1]}x"]
    ratios = {s: {"peak_rss": big[s]["peak_rss_mb"] / small[s]["peak_rss_mb"],
                  "peak_increase": big[s]["peak_increase_mb"] / max(small[s]["peak_increase_mb"], 1.0)} for s in stages}
    parts = [f"{s} peak RSS " + " -> ".join(f"{runs[k][s]['peak_rss_mb']:,.0f}" for k in runs) + " MB (increase "
             + " -> ".join(f"{runs[k][s]['peak_increase_mb']:,.0f}" for k in runs) + " MB)" for s in stages]
    tokens = " -> ".join(f"{runs[k]['pool']['n_tokens']:,}" for k in runs)
    line = (f"scale synthetic codes ({tokens} tokens, d {args.d_in}, d_sae {args.d_sae}, k {args.k}): "
            + "; ".join(parts) + " (goal: memory flat)")
    report("scale", line, {"mode": "synthetic_codes", "ratios_big_over_small": ratios, "runs": runs,
                           "sizes": {"samples": {f"{f}x": args.samples * f for f in factors},
                                     "tokens_per_sample": args.tokens_per_sample, "images": args.images,
                                     "image_tokens": args.image_tokens, "d_in": args.d_in, "d_sae": args.d_sae,
                                     "k": args.k, "zipf": args.zipf, "chunk_tokens": args.chunk_tokens,
                                     "part_tokens": args.part_tokens, "cosine_memory_mb": args.cosine_memory_mb},
                           "score_methods": list(METHODS), "score_consistency": json.loads(args.consistency),
                           "machine": machine(setup(args.threads, "cpu"), args.threads)}, args.json)
    return 0


def worker(stage: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage on work/; its throughput and memory."""
    dev = setup(args.threads, args.device)
    import pyarrow.parquet as pq

    from mmsae.activations import ActivationStore
    from mmsae.features import feature_table, feature_weights, read_columns, write_features
    from mmsae.params import ScoreParams
    from mmsae.sae.encode import encode_store
    from mmsae.sae.io import load_sae
    from mmsae.scoring import CONCEPT_COLUMNS, ScoringContext, score_samples

    store = ActivationStore(work / "extract")
    n_tokens = store.n_tokens
    sae = load_sae(work / "sae", device=dev) if stage in ("encode", "score") else None
    if stage == "score":  # set-up: one id per sample (in the pipeline, from samples.parquet)
        column = pq.read_table(store.folder / Files.TOKENS, columns=["sample_id"], read_dictionary=["sample_id"])
        ids = sorted({str(s) for chunk in column.column(0).chunks for s in chunk.dictionary.to_pylist()})
        del column
    base = current_rss_mb()
    # the peak from here on: loading the SAE (before the baseline) transiently holds twice its weights
    reset = reset_peak_rss()
    t0, c0 = now(dev), time.process_time()
    out: dict[str, Any] = {}
    if stage == "encode":
        out.update(encode_store(sae, store, 0, 0.0, args.batch_tokens, work / Files.CODES, progress=False))
    elif stage == "features":
        df = feature_table(work / Files.CODES, store, 0, args.d_sae, 30, "per_modality", 5, batch_rows=args.batch_rows)
        write_features(df, work / Files.FEATURES)
        out["cross_modal"] = int((df["class"] == "cross-modal").sum())
    else:
        features = read_columns(work / Files.FEATURES, CONCEPT_COLUMNS)
        ctx = ScoringContext(ids, codes=work / Files.CODES, weights=feature_weights(features, args.d_sae),
                             store=store, layer=0, features=features, sae=sae, batch_rows=args.batch_rows,
                             consistency=ScoreParams.load({"consistency": json.loads(args.consistency)}).consistency)
        if args.score_steps:  # the shared passes one at a time: peak / current RSS after each
            out["steps"] = []
            for step in SCORE_STEPS:
                getattr(ctx, step)
                out["steps"].append({"step": step, "peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb()})
        scores = score_samples(ctx, METHODS)
        out["n_samples"] = len(scores)
        out["n_concept_features"] = int(ctx.concept_features["selected"].sum())
    wall, cpu = now(dev) - t0, time.process_time() - c0
    return {"stage": stage, "n_tokens": n_tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": n_tokens / wall,
            "tokens_per_cpu_s": n_tokens / cpu, "rss_before_mb": base, "peak_rss_mb": peak_rss_mb(),
            "peak_increase_mb": peak_rss_mb() - base, "peak_reset": reset, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=400, help="samples of 64 tokens at 1x")
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16, help="active latents per token (codes rows per token)")
    p.add_argument("--widths", choices=("7b",), default=None,
                   help="7b: --d-in 4096 --d-sae 65536 --k 64 (LLaVA-NeXT-7B and the preset's SAE)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="encode.batch_tokens")
    p.add_argument("--batch-rows", type=int, default=1 << 18,
                   help="codes rows per streamed batch in features and score (the pipeline's default: 1048576)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="store chunk (extract.chunk_tokens; default 2048, with --synthetic-codes the pipeline's 8192); "
                        "score reads 8 chunks at a time")
    p.add_argument("--consistency", default=json.dumps(CONSISTENCY),
                   help="score.consistency for score, JSON (default: a loose XMc, see above; '{}' = the schema's)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work", default=None, help="folder for the synthetic data (default: a temp folder)")
    p.add_argument("--score-steps", action="store_true",
                   help="score: compute the shared passes one at a time first, recording the RSS after each "
                        "(JSON runs.<size>.score.steps)")
    p.add_argument("--inline", action="store_true",
                   help="run the stages in this process (quick checks only: the peak memory is then cumulative)")
    p.add_argument("--synthetic-codes", action="store_true",
                   help="features and score (the real stages) on drawn codes, no encode: see the docstring")
    p.add_argument("--factors", default="1,3,10", help="--synthetic-codes: sizes, as multiples of --samples")
    p.add_argument("--tokens-per-sample", type=int, default=1024, help="--synthetic-codes: tokens per sample")
    p.add_argument("--images", type=int, default=3, help="--synthetic-codes: images per sample")
    p.add_argument("--image-tokens", type=int, default=334, help="--synthetic-codes: tokens per image")
    p.add_argument("--zipf", type=float, default=1.0, help="--synthetic-codes: Zipf exponent of latent frequency")
    p.add_argument("--part-tokens", type=int, default=1 << 20, help="--synthetic-codes: encode.part_tokens")
    p.add_argument("--cosine-memory-mb", type=int, default=1024,
                   help="--synthetic-codes: features.cosine_memory_mb (the cross-modal weights' sums per group)")
    p.add_argument("--keep", action="store_true",
                   help="--synthetic-codes with --work: keep the pools in WORK/<f>x and reuse them on the next run")
    p.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    add_common_args(p, "scale")
    args = p.parse_args(argv)
    if args.widths == "7b":
        args.d_in, args.d_sae, args.k = 4096, 65536, 64
    if args.chunk_tokens is None:
        args.chunk_tokens = 8192 if args.synthetic_codes else 2048
    if args.worker:
        run = synthetic_worker if args.synthetic_codes else worker
        print(json.dumps(run(args.worker, Path(args.dir), args)))
        return 0
    if args.synthetic_codes:
        return synthetic_main(args)

    dev = setup(args.threads, args.device)
    stages = [s for s in args.stages.split(",") if s]
    sizes = {"1x": args.samples, f"{args.factor}x": args.samples * args.factor}
    runs: dict[str, dict[str, Any]] = {}
    passthrough = ["--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch-tokens",
                   str(args.batch_tokens), "--batch-rows", str(args.batch_rows), "--device", args.device,
                   "--threads", str(args.threads), "--consistency", args.consistency,
                   *(["--score-steps"] if args.score_steps else [])]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for label, samples in sizes.items():
            work = Path(tmp) / label
            prepare(work, samples, args)
            runs[label] = {}
            for stage in stages:
                runs[label][stage] = (worker(stage, work, args) if args.inline
                                      else run_worker(stage, work, label, passthrough))
    small, big = runs["1x"], runs[f"{args.factor}x"]
    ratios = {s: {"throughput": big[s]["tokens_per_s"] / small[s]["tokens_per_s"],
                  "throughput_cpu": big[s]["tokens_per_cpu_s"] / small[s]["tokens_per_cpu_s"],
                  "peak_rss": big[s]["peak_rss_mb"] / small[s]["peak_rss_mb"],
                  "peak_increase": big[s]["peak_increase_mb"] / max(small[s]["peak_increase_mb"], 1.0)}
              for s in stages}
    parts = [f"{s} {small[s]['tokens_per_s']:,.0f} -> {big[s]['tokens_per_s']:,.0f} tok/s, peak RSS "
             f"{small[s]['peak_rss_mb']:,.0f} -> {big[s]['peak_rss_mb']:,.0f} MB (x{ratios[s]['peak_rss']:.2f}; "
             f"increase {small[s]['peak_increase_mb']:,.0f} -> {big[s]['peak_increase_mb']:,.0f} MB)" for s in stages]
    if "score" in stages:
        parts.append("XMc " + " -> ".join(f"{runs[k]['score']['n_concept_features']:,}" for k in runs) + " features")
    line = (f"scale ({args.device}, {sizes['1x'] * 64:,} -> {sizes[f'{args.factor}x'] * 64:,} tokens, d_sae "
            f"{args.d_sae}, k {args.k}): " + "; ".join(parts) + " (goal: memory flat)")
    report("scale", line, {"ratios_big_over_small": ratios, "runs": runs,
                           "sizes": {"samples": sizes, "tokens_per_sample": 64, "d_in": args.d_in, "d_sae": args.d_sae,
                                     "k": args.k, "batch_tokens": args.batch_tokens, "batch_rows": args.batch_rows,
                                     "chunk_tokens": args.chunk_tokens},
                           "score_consistency": json.loads(args.consistency),
                           "machine": machine(dev, args.threads)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
