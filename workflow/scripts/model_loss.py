"""Stage model_loss: see mmsae.models.loss (python workflow/scripts/model_loss.py --help)."""

import sys

from mmsae import cli
from mmsae.models import loss

if __name__ == "__main__":
    sys.exit(cli.stage_main(loss))
