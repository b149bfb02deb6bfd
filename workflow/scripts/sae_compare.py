"""Stage sae_compare: see mmsae.report.sae_compare (python workflow/scripts/sae_compare.py --help)."""

import sys

from mmsae import cli
from mmsae.report import sae_compare

if __name__ == "__main__":
    sys.exit(cli.stage_main(sae_compare))
