"""Stage study: see mmsae.report.study (python workflow/scripts/study.py --help)."""

import sys

from mmsae import cli
from mmsae.report import study

if __name__ == "__main__":
    sys.exit(cli.stage_main(study))
