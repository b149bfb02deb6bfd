"""Shared by the speed-benchmark scripts: thread/device set-up, timing, the matmul peak, the result line + JSON.

Depends on the standard library and torch only: the SAELens worker imports it from its own venv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"


def add_common_args(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (see perf/README.md for the H100 sizes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the CPUs of the dev machine are shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(OUT / f"{name}.json"), help="where the JSON result goes")


def setup(threads: int, device: str) -> torch.device:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return dev


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def now(device: torch.device | str | None = None) -> float:
    """perf_counter after the device has finished its queued work."""
    if device is not None:
        sync(device)
    return time.perf_counter()


def timed_reps(fn, device: torch.device | str, reps: int, min_seconds: float = 0.0) -> dict[str, float]:
    """Run fn() `reps` times (more until `min_seconds` of wall time); wall and CPU seconds per call.

    The dev machine is shared, so each call is timed on its own: `best_s` (the fastest call, the least
    disturbed) and `median_s` are wall times; `cpu_s` is this process's CPU time (all threads) per call,
    which other processes' load inflates less than wall time (on a GPU it is only the host's share).
    """
    times, c0, t_start = [], time.process_time(), time.perf_counter()
    while len(times) < reps or time.perf_counter() - t_start < min_seconds:
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    cpu = (time.process_time() - c0) / len(times)
    times.sort()
    return {"best_s": times[0], "median_s": times[len(times) // 2], "mean_s": sum(times) / len(times),
            "cpu_s": cpu, "n": len(times)}


class StepClock:
    """Marks (wall, CPU) each time a training loop takes its next batch: the interval between two marks
    is one whole step of that loop (compute, bookkeeping, fetching the next batch), whoever's loop it is.
    The first step (initialisation, allocator warm-up) is left out: marks 1 .. n are used."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.marks: list[tuple[float, float]] = []

    def wrap(self, batches: Iterable) -> Iterator:
        for item in batches:
            self.marks.append((now(self.device), time.process_time()))
            yield item

    def summary(self, batch: int) -> dict[str, Any]:
        m = self.marks[1:]
        if len(m) < 2:
            raise RuntimeError("StepClock: too few steps to time (need >= 3)")
        steps = [b[0] - a[0] for a, b in zip(m, m[1:], strict=False)]
        wall, cpu = m[-1][0] - m[0][0], m[-1][1] - m[0][1]
        steps.sort()
        return {"timed_steps": len(steps), "loop_s": wall, "loop_cpu_s": cpu, "tokens_per_s": batch * len(steps) / wall,
                "tokens_per_cpu_s": batch * len(steps) / cpu, "best_step_s": steps[0],
                "median_step_s": steps[len(steps) // 2], "tokens_per_s_best_step": batch / steps[0]}


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: list[int], reps: int = 5) -> dict[str, Any]:
    """The machine's dense matmul ceiling: FLOP/s of torch.mm on square [n, n] operands (2 n^3 FLOPs).

    Per size: one warm-up, then `reps` timed calls (timed_reps); the peak is the best size by the best
    call (`flops_per_s`), also given by median wall time and by CPU time.
    """
    per_size: dict[str, dict[str, float]] = {}
    for n in sizes:
        gen = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)
        t = timed_reps(lambda a=a, b=b: torch.mm(a, b), device, reps)
        flops = 2.0 * n**3
        per_size[str(n)] = {"best": flops / t["best_s"], "median": flops / t["median_s"], "cpu": flops / t["cpu_s"]}
        del a, b
    best = max(per_size, key=lambda n: per_size[n]["best"])
    return {"flops_per_s": per_size[best]["best"], "flops_per_s_median": per_size[best]["median"],
            "flops_per_cpu_s": per_size[best]["cpu"], "best_size": int(best), "per_size": per_size,
            "dtype": str(dtype).removeprefix("torch.")}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far: VmHWM, the high-water mark of this address space.
    Not ru_maxrss: Linux carries it across execve, so a worker started by a parent that once held more
    (perf/scale.py building a 2 GB SAE) reported the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so a
    later peak_rss_mb() is the peak since now, not of an earlier step (loading a 2 GB SAE transiently holds
    twice its size). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "threads": threads, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = os.getloadavg()[0]
    return info


def report(name: str, line: str, result: dict[str, Any], json_path: str | os.PathLike) -> None:
    """Print the one-line result (stdout) and write the JSON result."""
    result = {"bench": name, "summary": line, "argv": sys.argv[1:], **result}
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(line, flush=True)
