"""Stage toyworld: see mmsae.data.toyworld (python workflow/scripts/toyworld.py --help)."""

import sys

from mmsae import cli
from mmsae.data import toyworld

if __name__ == "__main__":
    sys.exit(cli.stage_main(toyworld))
