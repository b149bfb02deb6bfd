"""Extraction overhead: `mmsae.activations.extract` (forward hooks + capture of the real tokens + zarr
write through an ActivationWriter, closed) against the bare model forward on the same batches.

The model is a random-weight LLaVA (CLIP vision tower + projector + Llama decoder) built from configs
with the test suite's word-level tokenizer (tests/helpers.py), larger than the test models: by default
text hidden 512, 8 decoder layers, 64 image tokens per image. Records are toy-world samples.

- bare: for each batch, `adapter.build_batch` + `adapter.forward` (the full model, logits included),
  under inference_mode;
- extract: `extract(adapter, batch, layers, batch_size, writer)` appending to one ActivationWriter,
  + its `close()` (last shard, tokens.parquet), capturing `--capture` layers (default: the middle and the last decoder layer, so the
  forward the hooks cut short after the last one skips only the final norm and the LM head).

The two are interleaved batch by batch (the order alternating), so both see the same machine load, and
the whole set runs `--repeats` times; the ratio uses each side's fastest repeat (the least disturbed on a
shared machine; the JSON also has medians and CPU time, which counts zarr's writer threads too). Overhead = extract / bare - 1 (goal <= 10%).

H100: --device cuda --dtype bfloat16 --store-dtype bfloat16 --hidden 4096 --intermediate 14336
      --layers 8 --heads 32 --vision-hidden 1024 --vision-layers 4 --image-size 336 --patch 14
      --samples 512 --batch 32  (576 image tokens per image, LLaVA-1.5-7B-shaped decoder layers)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_common_args, machine, now, report, setup  # noqa: E402


def build_model(args: argparse.Namespace, dev: torch.device):
    """A LlavaAdapter over a random LLaVA of the requested shape."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import CHAT_TEMPLATE, tiny_tokenizer
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mmsae.models.adapters import LlavaAdapter

    tok = tiny_tokenizer()
    n_patches = (args.image_size // args.patch) ** 2
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                              image_size=args.image_size, patch_size=args.patch, projection_dim=args.vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_patches, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).eval().to(device=dev, dtype=getattr(torch, args.dtype))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": args.image_size},
                                            crop_size={"height": args.image_size, "width": args.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=args.patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return LlavaAdapter(model, processor)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--capture", default=None, help="comma-separated decoder layers (default: middle,last)")
    p.add_argument("--dtype", default="float32", help="model dtype")
    p.add_argument("--store-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    add_common_args(p, "extract_overhead")
    args = p.parse_args(argv)
    dev = setup(args.threads, args.device)
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import tiny_records

    from mmsae.activations import ActivationWriter, extract

    adapter = build_model(args, dev)
    layers = ([int(x) for x in args.capture.split(",")] if args.capture
              else sorted({args.layers // 2, args.layers - 1}))
    records = tiny_records(args.samples, seed=args.seed)

    def bare(batch: list) -> None:
        with torch.inference_mode():
            inputs, _ = adapter.build_batch(batch, include_response=True)
            adapter.forward(inputs)

    def timed(fn, *a) -> tuple[float, float]:
        t0, c0 = now(dev), time.process_time()
        fn(*a)
        return now(dev) - t0, time.process_time() - c0

    def extract_batch(batch: list, writer: ActivationWriter) -> None:
        counts["n_tokens"] += extract(adapter, batch, layers, len(batch), writer, progress=False)["n_tokens"]

    batches = [records[s : s + args.batch] for s in range(0, len(records), args.batch)]
    bare(batches[0])  # warm-up
    counts: dict[str, int] = {"n_tokens": 0}
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "extract": []}
    for r in range(args.repeats):
        total = {"bare": [0.0, 0.0], "extract": [0.0, 0.0]}
        with tempfile.TemporaryDirectory() as tmp:
            writer = ActivationWriter(tmp, layers, adapter.d_model, args.store_dtype)
            for i, batch in enumerate(batches):  # interleaved batch by batch: both see the same machine load
                order = ("bare", "extract") if (i + r) % 2 == 0 else ("extract", "bare")
                for name in order:
                    if name == "bare":
                        w, c = timed(bare, batch)
                    else:
                        w, c = timed(extract_batch, batch, writer)
                    total[name][0] += w
                    total[name][1] += c
            w, c = timed(writer.close)  # the last shard's write and tokens.parquet
            total["extract"][0] += w
            total["extract"][1] += c
        for name, (w, c) in total.items():
            times[name].append((w, c))
    best = {k: min(w for w, _ in v) for k, v in times.items()}
    median = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    overhead = best["extract"] / best["bare"] - 1
    n_tok = counts["n_tokens"] // args.repeats
    line = (f"extract_overhead ({args.device}, hidden {args.hidden}, {args.layers} layers, {n_tok:,} tokens, "
            f"capture {layers}): bare {n_tok / best['bare']:,.0f} tok/s, extract {n_tok / best['extract']:,.0f} tok/s "
            f"= {100 * overhead:+.1f}% overhead (median {100 * (median['extract'] / median['bare'] - 1):+.1f}%, "
            f"CPU-time {100 * (cpu['extract'] / cpu['bare'] - 1):+.1f}%) (goal <= +10%)")
    report("extract_overhead", line, {
        "overhead": overhead, "overhead_median": median["extract"] / median["bare"] - 1,
        "overhead_cpu": cpu["extract"] / cpu["bare"] - 1, "times_wall_cpu_s": times,
        "tokens": n_tok, "tokens_per_s": {k: n_tok / v for k, v in best.items()},
            "sizes": {k: getattr(args, k) for k in ("samples", "batch", "hidden", "intermediate", "layers", "heads",
                                                 "vision_hidden", "vision_layers", "image_size", "patch", "dtype",
                                                 "store_dtype")} | {"capture": layers},
        "machine": machine(dev, args.threads)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
