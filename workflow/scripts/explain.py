"""Stage explain: see mmsae.interpret.explain.stage (python workflow/scripts/explain.py --help)."""

import sys

from mmsae import cli
from mmsae.interpret.explain import stage

if __name__ == "__main__":
    sys.exit(cli.stage_main(stage))
