"""Stage compare: see mmsae.report.compare (python workflow/scripts/compare_runs.py --help)."""

import sys

from mmsae import cli
from mmsae.report import compare

if __name__ == "__main__":
    sys.exit(cli.stage_main(compare))
