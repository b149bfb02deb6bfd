"""Stage finetune: see mmsae.finetune (python workflow/scripts/finetune.py --help)."""

import sys

from mmsae import cli, finetune

if __name__ == "__main__":
    sys.exit(cli.stage_main(finetune))
