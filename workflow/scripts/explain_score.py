"""Stage explain_score: see mmsae.interpret.explain.score_stage (python workflow/scripts/explain_score.py --help)."""

import sys

from mmsae import cli
from mmsae.interpret.explain import score_stage

if __name__ == "__main__":
    sys.exit(cli.stage_main(score_stage))
