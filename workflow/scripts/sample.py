"""Stage sample: see mmsae.data.readers (python workflow/scripts/sample.py --help)."""

import sys

from mmsae import cli
from mmsae.data import readers

if __name__ == "__main__":
    sys.exit(cli.stage_main(readers))
