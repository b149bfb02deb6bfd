"""SAE training throughput: mmsae's trainer vs SAELens's trainer on the same cached activations.

One synthetic extract store (perf/_data.py, written with mmsae's ActivationWriter) is trained on by

- mmsae: `mmsae.sae.training.train_sae` itself (reads its zarr store through the deterministic batch
  schedule, dead-latent counters, loss curve);
- SAELens: `SAETrainer.fit()` on the same activations, exported to .npy and held in memory as one
  tensor (no I/O at all: conservative for mmsae), in its own venv (perf/.venv-saelens; `make perf`
  builds it).

relu is timed twice: from the fresh init (about half the codes active: a dense step) and from an SAE that
mmsae trained for --relu-init-steps steps first (untimed; both trainers then start from its weights, with
fresh Adam state), where codes are sparse as in most of a real run and mmsae's relu takes its sparse step.

Same d_in, d_sae, batch size, number of steps, fp32, Adam, lr; relu = ReLU + decoder-norm-weighted L1
(SAELens "standard"), topk = TopK + AuxK (SAELens "topk", its default dense decoder; `--saelens-sparse`
adds its sparse-activation variant, which fails on the CPU in SAELens 6.54.12 and is then reported as
an error), batchtopk = BatchTopK + AuxK (SAELens "batchtopk"), jumprelu = JumpReLU + step L0 penalty
(SAELens "jumprelu", same l0_coefficient, bandwidth, initial threshold), matryoshka_batchtopk = BatchTopK
with a loss per nested prefix (SAELens "matryoshka_batchtopk", the same widths). On CUDA, `--precision` picks strict fp32 on both sides (default) or bf16 autocast on both
(mmsae's train_sae default there). No input normalisation on either side. Each run is a fresh
subprocess with the same thread count. Both loops are clocked the same way (perf/_common.StepClock):
a mark each time the loop takes its next batch, step 0 left out, so the checkpoint mmsae writes after its
last step is not counted. Prints one line with tokens/s of each and the ratio (wall time of the loop;
the JSON adds CPU-time rates and the best / median step, steadier on a shared machine).

H100 (7B-shaped): --device cuda --d-in 4096 --d-sae 65536 --batch 4096 --steps 200 --samples 8192
                  [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mmsae.artifacts import Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, StepClock, add_common_args, machine, report, setup  # noqa: E402

SAELENS_PY = BENCH / ".venv-saelens" / "bin" / "python"


def mmsae_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train with mmsae's trainer on --store; the JSON of the run."""
    from safetensors.torch import load_file

    import mmsae.sae.training.loop as T
    from mmsae.activations import ActivationStore
    from mmsae.params import TrainSaeParams

    dev = setup(args.threads, args.device)
    clock = StepClock(dev)
    schedule_batches = T.BatchSchedule.iter_batches

    def clocked(self, *a, **kw):  # the training loop's own batch stream, clocked
        return clock.wrap(schedule_batches(self, *a, **kw))

    T.BatchSchedule.iter_batches = clocked
    if args.init_weights:  # start from given weights (a trained SAE) instead of the seeded init
        build = T.build_sae

        def build_from(cfg, seed=0):
            sae = build(cfg, seed=seed)
            sae.load_state_dict(load_file(args.init_weights))
            return sae

        T.build_sae = build_from
    store = ActivationStore(args.store)
    params = TrainSaeParams.load(json.dumps({
        "architecture": args.arch, "k": args.k, "layer": 0, "expansion": args.d_sae / store.d_model,
        "steps": args.steps, "batch_size": args.batch, "lr": args.lr, "lr_warmup_steps": 0, "lr_decay_steps": 0,
        "l1_coefficient": args.l1, "l1_warmup_steps": 0, "normalize": "none", "scale_inputs": False,
        "l0_coefficient": args.l0, "jumprelu_bandwidth": args.jumprelu_bandwidth,
        "jumprelu_init_threshold": args.jumprelu_init_threshold,
        "matryoshka_widths": matryoshka(args),
        "eval_fraction": args.eval_fraction, "checkpoint_every": args.steps, "seed": args.seed, "device": str(dev),
        "precision": args.precision,
    }))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        m = T.train_sae(store, params, Path(tmp) / "out", Path(tmp) / "ckpt", progress=False)
        if args.save_weights:
            shutil.copyfile(Path(tmp) / "out" / "sae" / Files.SAE_WEIGHTS, args.save_weights)
    return {"impl": "mmsae", "arch": args.arch, "d_in": m["d_in"], "d_sae": m["d_sae"], "batch": args.batch,
            "steps": m["steps"], **clock.summary(args.batch), "trainer_train_s": m["timings_s"]["train"],
            "final_loss": m["final_loss"], "l0_eval": m["l0"]}


def matryoshka(args: argparse.Namespace) -> list[int]:
    """The matryoshka levels of both trainers: --matryoshka-widths, or d_sae / 16, / 8, / 4, / 2, d_sae."""
    from mmsae.sae.model import matryoshka_widths

    given = [int(w) for w in args.matryoshka_widths.split(",") if w] or None
    return matryoshka_widths(given, args.d_sae)


def run_json(cmd: list[str], optional: bool = False) -> dict[str, Any]:
    """Run a worker; its last stdout line is its JSON. A failure stops the bench, or with `optional`
    comes back as {"error": <the exception line>}."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln)]
    msg = errors[-1][:500] if errors else "\n".join(lines[-20:])
    if optional:
        return {"error": msg}
    raise SystemExit(f"error: worker failed ({proc.returncode}): {' '.join(cmd)}\n{msg}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=512, help="synthetic samples of 64 tokens in the store")
    p.add_argument("--k", type=int, default=32, help="topk: active latents per token")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=0.3, help="relu: L1 coefficient")
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: l0_coefficient (both trainers)")
    p.add_argument("--jumprelu-bandwidth", type=float, default=0.05)
    p.add_argument("--jumprelu-init-threshold", type=float, default=0.01)
    p.add_argument("--matryoshka-widths", default="",
                   help="matryoshka_batchtopk: comma-separated prefix widths (default d_sae / 16 ... d_sae)")
    p.add_argument("--archs", default="relu,topk,batchtopk,jumprelu,matryoshka_batchtopk",
                   help="SAELens 6 trains each of these: one ratio per architecture, in one run")
    p.add_argument("--relu-init-steps", type=int, default=1000,
                   help="relu: also time both trainers starting from an SAE mmsae trained for this many steps "
                        "(untimed; L0 << d_sae, the regime of most of a real run, where mmsae's sparse path runs); "
                        "0 = only from the fresh init")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="mmsae holds these samples out (not timed)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="cuda: fp32 = strict fp32 on both sides; bf16 = mmsae's train_sae.precision bf16 (its CUDA "
                        "default) vs SAELens autocast=True, TF32 allowed on both. The CPU is always fp32")
    p.add_argument("--peer", choices=("saelens", "none"), default="saelens")
    p.add_argument("--saelens-python", default=str(SAELENS_PY))
    p.add_argument("--saelens-sparse", action="store_true", help="topk: also time SAELens use_sparse_activations")
    p.add_argument("--work", default=None, help="folder for the synthetic store (default: a temp folder)")
    p.add_argument("--worker", choices=("mmsae",), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--init-weights", help=argparse.SUPPRESS)
    p.add_argument("--save-weights", help=argparse.SUPPRESS)
    add_common_args(p, "sae_train")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(mmsae_worker(args)))
        return 0

    dev = setup(args.threads, args.device)
    if args.precision != "fp32" and dev.type != "cuda":
        raise SystemExit("error: --precision bf16 needs --device cuda (mmsae trains in fp32 on the CPU)")
    from _data import write_store

    archs = [a for a in args.archs.split(",") if a]
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        store = write_store(Path(work) / "extract", args.samples, args.d_in, args.seed)
        npy = Path(work) / "acts.npy"
        np.save(npy, store.read(0))
        common = ["--d-sae", str(args.d_sae), "--batch", str(args.batch), "--steps", str(args.steps),
                  "--k", str(args.k), "--lr", str(args.lr), "--l1", str(args.l1), "--device", args.device,
                  "--threads", str(args.threads), "--seed", str(args.seed), "--precision", args.precision,
                  "--l0", str(args.l0), "--jumprelu-bandwidth", str(args.jumprelu_bandwidth),
                  "--jumprelu-init-threshold", str(args.jumprelu_init_threshold),
                  "--matryoshka-widths", ",".join(map(str, matryoshka(args)))]
        # (name, architecture, initial weights): relu also from a trained SAE (--relu-init-steps)
        variants: list[tuple[str, str, str | None]] = [(a, a, None) for a in archs]
        init_run: dict[str, Any] | None = None
        if "relu" in archs and args.relu_init_steps > 0:
            trained = str(Path(work) / "relu_trained.safetensors")
            init_run = run_json([sys.executable, __file__, "--worker", "mmsae", "--store", str(store.folder),
                                 "--arch", "relu", "--work", work, "--eval-fraction", str(args.eval_fraction), *common,
                                 "--steps", str(args.relu_init_steps), "--save-weights", trained])
            variants.insert(archs.index("relu") + 1, ("relu_trained", "relu", trained))
        runs: dict[str, dict[str, Any]] = {}
        for name, arch, init in variants:
            init_args = ["--init-weights", init] if init else []
            runs[f"mmsae_{name}"] = run_json([sys.executable, __file__, "--worker", "mmsae", "--store",
                                              str(store.folder), "--arch", arch, "--work", work,
                                              "--eval-fraction", str(args.eval_fraction), *common, *init_args])
            if args.peer == "saelens":
                peer = [args.saelens_python, str(BENCH / "saelens_worker.py"), "--npy", str(npy), "--arch", arch,
                        *common, *init_args]
                runs[f"saelens_{name}"] = run_json(peer)
                if arch == "topk" and args.saelens_sparse:
                    runs["saelens_topk_sparse"] = run_json([*peer, "--sparse"], optional=True)

    def ratio(ours: str, peer: str, key: str) -> float:
        return runs[ours][key] / runs[peer][key]

    names = [name for name, _, _ in variants]
    pairs = {n: (f"mmsae_{n}", f"saelens_{n}") for n in names if f"saelens_{n}" in runs}
    if "tokens_per_s" in runs.get("saelens_topk_sparse", {}):
        pairs["topk_vs_sparse"] = ("mmsae_topk", "saelens_topk_sparse")
    ratios = {name: {"wall": ratio(o, q, "tokens_per_s"), "cpu": ratio(o, q, "tokens_per_cpu_s"),
                     "best_step": ratio(o, q, "tokens_per_s_best_step")} for name, (o, q) in pairs.items()}
    parts = []
    for name, (o, q) in pairs.items():
        r = ratios[name]
        label = {"topk_vs_sparse": "topk vs SAELens sparse",
                 "relu_trained": f"relu from {args.relu_init_steps} steps mmsae"}.get(name, f"{name} mmsae")
        parts.append(f"{label} {runs[o]['tokens_per_s']:,.0f} tok/s vs {runs[q]['tokens_per_s']:,.0f} = "
                     f"{r['wall']:.2f}x (CPU-time {r['cpu']:.2f}x, best step {r['best_step']:.2f}x)")
    parts += [f"{n} mmsae {runs[f'mmsae_{n}']['tokens_per_s']:,.0f} tok/s" for n in names if n not in pairs]
    if "error" in runs.get("saelens_topk_sparse", {}):
        parts.append(f"SAELens sparse topk failed: {runs['saelens_topk_sparse']['error'][:80]}")
    line = (f"sae_train ({args.device}, d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, {args.steps} steps): "
            + "; ".join(parts) + " (goal >= 2x)")
    report("sae_train", line, {"ratio_mmsae_over_saelens": ratios, "runs": runs,
                               "sizes": {"d_in": args.d_in, "d_sae": args.d_sae, "batch": args.batch,
                                         "steps": args.steps, "store_tokens": args.samples * 64, "k": args.k,
                                         "relu_init_steps": args.relu_init_steps if "relu_trained" in names else 0},
                               "relu_init_run": init_run,
                               "machine": machine(dev, args.threads)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
