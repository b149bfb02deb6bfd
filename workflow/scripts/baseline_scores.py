"""Stage baseline_scores: see mmsae.evaluation.baselines (python workflow/scripts/baseline_scores.py --help)."""

import sys

from mmsae import cli
from mmsae.evaluation import baselines

if __name__ == "__main__":
    sys.exit(cli.stage_main(baselines))
