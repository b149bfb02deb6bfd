"""Stage premise: see mmsae.evaluation.premise (python workflow/scripts/premise.py --help)."""

import sys

from mmsae import cli
from mmsae.evaluation import premise

if __name__ == "__main__":
    sys.exit(cli.stage_main(premise))
