"""Stage train_sae: see mmsae.sae.train (python workflow/scripts/train_sae.py --help)."""

import sys

from mmsae import cli
from mmsae.sae import train

if __name__ == "__main__":
    sys.exit(cli.stage_main(train))
