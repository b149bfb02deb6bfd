"""Stage curve: see mmsae.evaluation.curve (python workflow/scripts/curve.py --help)."""

import sys

from mmsae import cli
from mmsae.evaluation import curve

if __name__ == "__main__":
    sys.exit(cli.stage_main(curve))
