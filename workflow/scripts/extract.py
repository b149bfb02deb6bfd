"""Stage extract: see mmsae.activations.stage (python workflow/scripts/extract.py --help)."""

import sys

from mmsae import cli
from mmsae.activations import stage

if __name__ == "__main__":
    sys.exit(cli.stage_main(stage))
