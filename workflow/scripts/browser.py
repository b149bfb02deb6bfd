"""Stage browser: see mmsae.interpret.browser.stage (python workflow/scripts/browser.py --help)."""

import sys

from mmsae import cli
from mmsae.interpret.browser import stage

if __name__ == "__main__":
    sys.exit(cli.stage_main(stage))
