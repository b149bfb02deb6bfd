"""The features stage's streaming top-K per (feature, modality): the [n_keys x K] tables of
`mmsae.features.TopK` against the lexsort it replaced (every batch re-sorted all kept entries plus the
batch: 2 x d_sae x K + batch_rows entries per batch), on random codes at d_sae 65,536, K 30.

Codes: `--batches` batches of `--batch-rows` codes, a feature uniform in [0, d_sae), half text / half
image, activations exponential (as a ReLU/TopK code's tail). Both must give the same entries; prints the
time per batch of each.

  .venv/bin/python perf/topk.py                      # 16 batches of 2^20 codes (16.8M codes)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, machine, report, setup  # noqa: E402


def lexsort_top_k(key, act, row, k):
    """The replaced implementation (mmsae/features.py before #15): sort everything kept plus the batch."""
    order = np.lexsort((row, -act, key))
    key, act, row = key[order], act[order], row[order]
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    keep = np.arange(len(key)) - group_start < k
    return key[keep], act[keep], row[keep]


def main(argv: list[str] | None = None) -> int:
    from mmsae.features import TopK

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, default=65536)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--batch-rows", type=int, default=1 << 20)
    p.add_argument("--batches", type=int, default=16)
    add_common_args(p, "topk")
    args = p.parse_args(argv)
    dev = setup(args.threads, args.device)
    rng = np.random.default_rng(args.seed)
    n_keys = 2 * args.d_sae
    new = TopK(args.k, n_keys)
    old = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    t_new, t_old = [], []
    for b in range(args.batches):
        key = rng.integers(0, n_keys, args.batch_rows)
        act = rng.exponential(1.0, args.batch_rows).astype(np.float32)
        row = np.arange(b * args.batch_rows, (b + 1) * args.batch_rows, dtype=np.int64)
        t0 = time.perf_counter()
        new.update(key, act, row)
        t1 = time.perf_counter()
        old = lexsort_top_k(np.concatenate([old[0], key]), np.concatenate([old[1], act]),
                            np.concatenate([old[2], row]), args.k)
        t2 = time.perf_counter()
        t_new.append(t1 - t0)
        t_old.append(t2 - t1)
    got = new.entries()
    same = all(np.array_equal(a, b) for a, b in zip(got[:3], old, strict=True))
    n_codes = args.batches * args.batch_rows
    # the last quarter of the batches: the tables are full, only codes that beat a key's K-th entry are merged
    q = max(1, args.batches // 4)
    old_s, new_s = float(np.mean(t_old)), float(np.mean(t_new))
    old_late, new_late = float(np.mean(t_old[-q:])), float(np.mean(t_new[-q:]))
    line = (f"topk (d_sae {args.d_sae}, K {args.k}, {n_codes:,} codes in batches of {args.batch_rows:,}, "
            f"{n_codes / n_keys:,.0f} codes per key): lexsort {old_s:.3f} s/batch (last quarter {old_late:.3f}), "
            f"tables {new_s:.3f} s/batch (last quarter {new_late:.3f}, x{old_late / max(new_late, 1e-9):.1f}); "
            f"same entries: {same}")
    report("topk", line, {"old_s_per_batch": old_s, "new_s_per_batch": new_s, "old_s_late": old_late,
                          "new_s_late": new_late,
                          "same": same, "n_codes": n_codes, "d_sae": args.d_sae, "k": args.k,
                          "batch_rows": args.batch_rows, "machine": machine(dev, args.threads)}, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
