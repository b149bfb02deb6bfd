"""Stage toy_model: see mmsae.models.toy (python workflow/scripts/toy_model.py --help)."""

import sys

from mmsae import cli
from mmsae.models import toy

if __name__ == "__main__":
    sys.exit(cli.stage_main(toy))
