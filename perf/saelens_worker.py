"""SAELens's trainer on cached activations (a .npy [n_tokens, d_in]); prints one JSON line. Run by
perf/sae_train.py with perf/.venv-saelens/bin/python (SAELens pins other versions than mmsae).

The activations sit in memory as one tensor and batches are drawn by a seeded permutation, so SAELens
pays no I/O at all (mmsae reads its zarr store): the comparison is conservative for mmsae.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StepClock, setup  # noqa: E402


def batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless stream of batches: a fresh permutation per epoch, remainder dropped (as mmsae does)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=gen)
        for i in range(0, len(perm) - batch + 1, batch):
            yield acts[perm[i : i + batch]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--npy", required=True)
    p.add_argument("--arch", choices=("relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"), required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=0.3)
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: l0_coefficient")
    p.add_argument("--jumprelu-bandwidth", type=float, default=0.05)
    p.add_argument("--jumprelu-init-threshold", type=float, default=0.01)
    p.add_argument("--matryoshka-widths", default="", help="matryoshka_batchtopk: comma-separated prefix widths")
    p.add_argument("--aux-coefficient", type=float, default=1 / 32)
    p.add_argument("--sparse", action="store_true", help="topk: use_sparse_activations (sparse decoder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weights", help="start from these weights (safetensors) instead of SAELens's init")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast + TF32 (cuda)")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    dev = setup(args.threads, args.device)

    import sae_lens
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    acts = torch.from_numpy(np.load(args.npy)).to(dev)
    d_in = acts.shape[1]
    torch.manual_seed(args.seed)
    if args.arch == "relu":
        # the paper's SAE: ReLU, decoder-norm-weighted L1, decoder rows of norm 0.1, W_enc = W_dec^T, no b_dec on input
        cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, l1_coefficient=args.l1, device=str(dev),
                                        apply_b_dec_to_input=False, normalize_activations="none",
                                        decoder_init_norm=0.1)
        sae = StandardTrainingSAE(cfg)
    elif args.arch == "jumprelu":
        # as mmsae's jumprelu: no b_dec on the input (Gemma Scope), decoder rows of norm 0.1, step L0 penalty
        cfg = JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, l0_coefficient=args.l0, device=str(dev),
                                        apply_b_dec_to_input=False, normalize_activations="none",
                                        decoder_init_norm=0.1, jumprelu_bandwidth=args.jumprelu_bandwidth,
                                        jumprelu_init_threshold=args.jumprelu_init_threshold)
        sae = JumpReLUTrainingSAE(cfg)
    else:
        # topk, batchtopk, matryoshka_batchtopk: SAELens' TopK family (its default dense decoder unless --sparse)
        kw = dict(d_in=d_in, d_sae=args.d_sae, k=args.k, device=str(dev), apply_b_dec_to_input=True,
                  normalize_activations="none", aux_loss_coefficient=args.aux_coefficient,
                  use_sparse_activations=args.sparse)
        if args.arch == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(**kw))
        elif args.arch == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**kw))
        else:
            widths = [int(w) for w in args.matryoshka_widths.split(",") if w]
            sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**kw, matryoshka_widths=widths))
    if args.init_weights:  # the same starting weights as mmsae's run (W_enc, b_enc, W_dec, b_dec: same names)
        from safetensors.torch import load_file

        with torch.no_grad():
            for name, w in load_file(args.init_weights).items():
                getattr(sae, name).copy_(w.to(getattr(sae, name)))
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    tcfg = SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
                            autocast=args.precision == "bf16", lr=args.lr, lr_end=args.lr, device=str(dev),
                            dead_feature_window=1000, feature_sampling_window=2000)
    clock = StepClock(dev)
    trainer = SAETrainer(tcfg, sae, clock.wrap(batches(acts, args.batch, args.seed)))
    trainer.fit()
    print(json.dumps({"impl": "saelens", "version": sae_lens.__version__, "arch": args.arch, "sparse": args.sparse,
                      "d_in": d_in, "d_sae": args.d_sae, "batch": args.batch, "steps": trainer.n_training_steps,
                      **clock.summary(args.batch)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
