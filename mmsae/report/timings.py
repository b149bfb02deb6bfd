"""Where a run's time went: per stage, from Snakemake's benchmark files (results/{run}/benchmarks/*.tsv).

    python -m mmsae.report.timings results/demo

prints one row per stage (jobs, wall seconds summed over its jobs, the longest job, peak RSS) sorted by
total time. The sum over stages is the work the run asked of the machine; with N cores the wall time of
the whole run is at least the sum / N and at least the longest chain of dependent jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def stage_times(results: str | Path) -> pd.DataFrame:
    """One row per stage: jobs, total_s, max_s, max_rss_mb, cpu_s; sorted by total_s, largest first."""
    rows = []
    for path in sorted(Path(results, "benchmarks").glob("*.tsv")):
        bench = pd.read_csv(path, sep="\t")
        if bench.empty:
            continue
        last = bench.iloc[-1]  # one line per repeat; Snakemake writes one by default
        rows.append({"stage": path.name.split("-")[0], "s": float(last["s"]), "max_rss": float(last["max_rss"]),
                     "cpu_time": float(last["cpu_time"])})
    if not rows:
        return pd.DataFrame(columns=["stage", "jobs", "total_s", "max_s", "max_rss_mb", "cpu_s"])
    jobs = pd.DataFrame(rows)
    out = jobs.groupby("stage").agg(jobs=("s", "size"), total_s=("s", "sum"), max_s=("s", "max"),
                                    max_rss_mb=("max_rss", "max"), cpu_s=("cpu_time", "sum"))
    return out.sort_values("total_s", ascending=False).reset_index().round(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmsae.report.timings results/<run>", file=sys.stderr)
        return 2
    table = stage_times(argv[0])
    if table.empty:
        print(f"{argv[0]}: no benchmark files under {argv[0]}/benchmarks", file=sys.stderr)
        return 1
    print(table.to_string(index=False))
    print(f"all stages: {len(table)} stages, {int(table['jobs'].sum())} jobs, {table['total_s'].sum():.0f} s of job time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
