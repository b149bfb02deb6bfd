"""Stage sample: see mmsae.data.sample (python workflow/scripts/sample.py --help)."""

import sys

from mmsae import cli
from mmsae.data import sample

if __name__ == "__main__":
    sys.exit(cli.stage_main(sample))
