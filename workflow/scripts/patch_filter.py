"""Stage patch_filter: see mmsae.interpret.patches.stage (python workflow/scripts/patch_filter.py --help)."""

import sys

from mmsae import cli
from mmsae.interpret.patches import stage

if __name__ == "__main__":
    sys.exit(cli.stage_main(stage))
