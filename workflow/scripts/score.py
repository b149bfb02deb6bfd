"""Stage score: see mmsae.scoring.stage (python workflow/scripts/score.py --help)."""

import sys

from mmsae import cli
from mmsae.scoring import stage

if __name__ == "__main__":
    sys.exit(cli.stage_main(stage))
