"""The activation store's shuffled batch read rate (the SAE trainer's batches) against the disk's
sequential read rate, at d 4096, in one run.

- A store of --tokens tokens x --d-in (default 65,536 x 4,096, bf16 as the LLaVA-NeXT preset stores it,
  chunk 4,096 tokens, 4 chunks per shard) is written with `ActivationWriter` from Gaussian rows.
- sequential: every file of the store read front to back in 16 MiB `os.read` calls.
- shuffled: `BatchSchedule.iter_batches` over all training rows for one epoch (--batch-size 4096,
  --buffer-chunks 4: the trainer's groups, read with `store.read` in its prefetch thread, decoded to fp32
  and permuted per batch), numpy batches (no device): what train_sae waits for.
Before each measured pass the store's files are dropped from the page cache with
posix_fadvise(DONTNEED) (no root needed for clean pages); a second, cached sequential pass tells whether
the drop worked (`cold_over_cached`: ~1 means it did not, or the disk is as fast as memory).

Ratio = shuffled bytes/s (the store's bytes on disk per second of the epoch) / sequential bytes/s; the
JSON also has the shuffled rate in tokens/s beside what one H100 SAE step consumes at d_sae 65,536
(mmsae.plan.Throughput: 12 d d_sae FLOPs per token at bf16 x 0.5).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, machine, peak_rss_mb, report, setup  # noqa: E402
from _data import token_frame  # noqa: E402

BLOCK = 16 * 2**20


def store_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_cache(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path]) -> tuple[int, float]:
    """(bytes, seconds) of reading every file front to back."""
    total, t0 = 0, time.perf_counter()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            while chunk := os.read(fd, BLOCK):
                total += len(chunk)
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0


def write(folder: Path, tokens: int, d: int, dtype: str, chunk_tokens: int, shard_chunks: int, seed: int) -> None:
    import torch

    from mmsae.activations import ActivationWriter

    writer = ActivationWriter(folder, [0], d, dtype, chunk_tokens=chunk_tokens, shard_chunks=shard_chunks)
    per_sample, step = 2048, 8192
    rng = np.random.default_rng(seed)
    for first in range(0, tokens, step):
        n = min(step, tokens - first)
        rows = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
        frame = token_frame(n // per_sample or 1, per_sample, per_sample - 16, seed, first // per_sample)[:n]
        writer.append({0: rows}, frame.reset_index(drop=True))
    writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=65536, help="store rows (x d-in x 2 bytes in bf16 on disk)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--chunk-tokens", type=int, default=4096, help="extract.chunk_tokens (the preset's)")
    p.add_argument("--shard-chunks", type=int, default=4, help="extract.shard_chunks (the preset's)")
    p.add_argument("--batch-size", type=int, default=4096, help="train_sae.batch_size (the paper's)")
    p.add_argument("--buffer-chunks", type=int, default=4, help="train_sae.buffer_chunks (default)")
    p.add_argument("--d-sae", type=int, default=65536, help="for the H100 tokens/s the store must feed")
    p.add_argument("--work", default=None, help="folder for the store (default: a temp folder; same disk as results/ "
                                                 "to measure that disk)")
    add_common_args(p, "store_read")
    args = p.parse_args(argv)
    dev = setup(args.threads, "cpu")

    from mmsae.activations import ActivationStore
    from mmsae.plan import Throughput
    from mmsae.sae.training.batches import BatchSchedule

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        folder = Path(tmp) / "extract"
        t0 = time.perf_counter()
        write(folder, args.tokens, args.d_in, args.dtype, args.chunk_tokens, args.shard_chunks, args.seed)
        write_s = time.perf_counter() - t0
        files = store_files(folder / "acts.zarr")
        disk_bytes = sum(f.stat().st_size for f in files)

        drop_cache(files)
        seq_bytes, seq_s = sequential_read(files)
        _, cached_s = sequential_read(files)  # now in the page cache

        store = ActivationStore(folder)
        sched = BatchSchedule(np.arange(store.n_tokens), store.n_tokens, store.chunk_tokens, args.buffer_chunks,
                              args.batch_size, args.seed)
        drop_cache(files)
        n, checksum, t0 = 0, 0.0, time.perf_counter()
        for _, batch in sched.iter_batches(store, 0, 0, sched.per_epoch):
            n += len(batch)
            checksum += float(batch[0, 0])  # touch the batch
        shuf_s = time.perf_counter() - t0

    seq_rate = seq_bytes / seq_s
    shuf_rate = disk_bytes * n / store.n_tokens / shuf_s  # on-disk bytes behind the rows served, per second
    tok_s = n / shuf_s
    tp = Throughput()
    need = tp.bf16_tflops * 1e12 * tp.sae_utilisation / (12 * args.d_in * args.d_sae)
    line = (f"store_read (d {args.d_in}, {args.dtype}, {args.tokens:,} tokens, {disk_bytes / 2**20:,.0f} MiB on disk): "
            f"shuffled batches {shuf_rate / 2**20:,.0f} MiB/s ({tok_s:,.0f} tok/s) vs sequential "
            f"{seq_rate / 2**20:,.0f} MiB/s (cached {seq_bytes / cached_s / 2**20:,.0f} MiB/s): ratio "
            f"{shuf_rate / seq_rate:.2f}; an H100 SAE step at d_sae {args.d_sae:,} consumes ~{need:,.0f} tok/s")
    report("store_read", line, {
        "ratio_shuffled_over_sequential": shuf_rate / seq_rate, "sequential_bytes_per_s": seq_rate,
        "cached_bytes_per_s": seq_bytes / cached_s, "cold_over_cached": cached_s / seq_s,
        "shuffled_bytes_per_s": shuf_rate, "shuffled_tokens_per_s": tok_s, "shuffled_s": shuf_s,
        "h100_sae_tokens_per_s": need, "store_bytes": disk_bytes, "raw_bytes": args.tokens * args.d_in *
        (2 if args.dtype == "bfloat16" else 4), "write_s": write_s, "peak_rss_mb": peak_rss_mb(),
        "sizes": {k: getattr(args, k) for k in ("d_in", "tokens", "dtype", "chunk_tokens", "shard_chunks",
                                                 "batch_size", "buffer_chunks")},
        "machine": machine(dev, args.threads)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
