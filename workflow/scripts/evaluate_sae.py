"""Stage evaluate_sae: see mmsae.sae.evaluate_sae (python workflow/scripts/evaluate_sae.py --help)."""

import sys

from mmsae import cli
from mmsae.sae import evaluate_sae

if __name__ == "__main__":
    sys.exit(cli.stage_main(evaluate_sae))
