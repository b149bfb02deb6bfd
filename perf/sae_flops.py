"""Achieved FLOP/s of mmsae's SAE training step against the machine's dense matmul peak, same run.

The step is the trainer's own: `sae.loss(x, l1, dead_mask)` + `mmsae.sae.training.optimizer_step`
(backward, gradient hook, clipping, Adam, weight hook) on a batch of synthetic activations already on
the device (no data loading: that is sae_train.py's business). FLOPs counted are the matmuls of
forward + backward only (elementwise work, Adam and clipping count 0), with B = batch, D = d_in,
S = d_sae, k = active latents:

- relu: encoder x W_enc (2BDS), its weight gradient (2BDS; x needs no gradient), decoder f W_dec
  (2BDS) and its two gradients (4BDS): 10 BDS. This is the dense step (train_sae.sparse_max_density 0
  here), the one a fresh SAE takes; once codes are sparse, the trainer's sparse path does less matmul
  work (sae_train.py times that regime).
- topk: encoder forward (2BDS, dense: the top-k needs every pre-activation), its weight gradient at the
  k selected latents only (2BkD, sparse: mmsae/sae/model/sparse.py SelectedPreGrad), the sparse decoder
  gather (2BkD) and its two gradients (4BkD): 2 BDS + 8 BkD (AuxK off: no latent is dead yet). So few
  matmul FLOPs are left that the top-k selection and the elementwise passes over [B, S] weigh as much:
  the topk fraction of peak says how far the step is from matmul-bound, not how fast it is (tokens/s).

Peak: torch.mm of square operands in the step's matmul dtype (fp32, or bf16 with --precision bf16),
best of a few sizes (perf/_common.py), on the same device and thread count. Prints achieved / peak (goal >= 0.5) and the time split (torch
profiler, CPU self time) of one step per architecture.

H100 (7B-shaped): --device cuda --d-in 4096 --d-sae 65536 --batch 4096 --steps 20 --peak-sizes 8192,16384
                  [--precision bf16]  (bf16 = the trainer's CUDA default, train_sae.precision)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, machine, matmul_peak, now, report, setup, timed_reps  # noqa: E402


def step_flops(arch: str, b: int, d: int, s: int, k: int) -> float:
    if arch == "relu":
        return 10.0 * b * d * s
    return 2.0 * b * d * s + 8.0 * b * k * d


def time_steps(arch: str, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """Mean seconds per trainer step (after warm-up) and the profile of one step."""
    from _data import synthetic_acts

    from mmsae.params import TrainSaeParams
    from mmsae.sae.model import SAEConfig, build_sae
    from mmsae.sae.training import optimizer_step

    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=arch,
                    apply_b_dec_to_input=arch == "topk", k=args.k if arch == "topk" else None)
    sae = build_sae(cfg, seed=args.seed).to(dev)
    # relu: the dense step, whose FLOPs are counted above (a sparse batch would take the sparse path)
    sae.configure_training(TrainSaeParams.load({"sparse_max_density": 0.0} if arch == "relu" else {}))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    xs = [torch.from_numpy(synthetic_acts(args.batch, args.d_in, args.seed, i * args.batch)).to(dev)
          for i in range(4)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    dead = torch.zeros(args.d_sae, dtype=torch.bool, device=dev)
    sae.init_from_batch(xs[0])

    def step(i: int) -> None:
        with autocast:  # as the trainer: the forward under autocast, the backward outside it
            out = sae.loss(xs[i % len(xs)], 0.3, dead_mask=dead)
        optimizer_step(sae, opt, out.loss, 1.0)

    for i in range(args.warmup):
        step(i)
    counter = iter(range(1 << 30))
    t = timed_reps(lambda: step(next(counter)), dev, args.steps)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(0)
        now(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    top = [{"op": e.key, "share": getattr(e, key) / total, "calls": e.count} for e in events[:8]]
    flops = step_flops(arch, args.batch, args.d_in, args.d_sae, args.k)
    return {"s_per_step": t, "flops_per_step": flops, "flops_per_s": flops / t["best_s"],
            "flops_per_s_median": flops / t["median_s"], "flops_per_cpu_s": flops / t["cpu_s"],
            "tokens_per_s": args.batch / t["best_s"], "profile_top": top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per architecture")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--archs", default="relu,topk")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                   help="cuda: the trainer's train_sae.precision (bf16 autocast / TF32 / strict fp32); the peak is "
                        "measured in bf16 for bf16, else fp32 (with TF32 for tf32). The CPU is always fp32")
    p.add_argument("--peak-sizes", default="1024,2048,3072", help="square torch.mm sizes for the peak")
    add_common_args(p, "sae_flops")
    args = p.parse_args(argv)
    dev = setup(args.threads, args.device)
    if args.precision != "fp32" and dev.type != "cuda":
        raise SystemExit("error: --precision tf32 / bf16 need --device cuda (the trainer runs fp32 on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dev, dtype, [int(n) for n in args.peak_sizes.split(",")])
    runs = {a: time_steps(a, args, dev) for a in args.archs.split(",") if a}
    peak_after = matmul_peak(dev, dtype, [peak["best_size"]])  # the machine is shared: bracket the steps
    ceil = {k: max(peak[k], peak_after[k]) for k in ("flops_per_s", "flops_per_s_median", "flops_per_cpu_s")}
    for r in runs.values():
        r["fraction_of_peak"] = r["flops_per_s"] / ceil["flops_per_s"]
        r["fraction_of_peak_median"] = r["flops_per_s_median"] / ceil["flops_per_s_median"]
        r["fraction_of_peak_cpu"] = r["flops_per_cpu_s"] / ceil["flops_per_cpu_s"]
    parts = [f"{a} {r['flops_per_s'] / 1e9:,.1f} GFLOP/s = {r['fraction_of_peak']:.2f} of peak "
             f"(median {r['fraction_of_peak_median']:.2f}, CPU-time {r['fraction_of_peak_cpu']:.2f})"
             for a, r in runs.items()]
    line = (f"sae_flops ({args.device}, {args.precision}, d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}): "
            f"matmul peak {ceil['flops_per_s'] / 1e9:,.1f} GFLOP/s; " + "; ".join(parts) + " (goal >= 0.5)")
    report("sae_flops", line, {"peak": peak, "peak_after": peak_after, "peak_flops_per_s": ceil, "runs": runs,
                               "sizes": {"d_in": args.d_in, "d_sae": args.d_sae, "batch": args.batch, "k": args.k,
                                         "precision": args.precision},
                               "machine": machine(dev, args.threads)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
