"""Stage benchmark: see mmsae.evaluation.benchmarks (python workflow/scripts/benchmark.py --help)."""

import sys

from mmsae import cli
from mmsae.evaluation import benchmarks

if __name__ == "__main__":
    sys.exit(cli.stage_main(benchmarks))
