"""Stage report: see mmsae.report (python workflow/scripts/report.py --help)."""

import sys

from mmsae import cli, report

if __name__ == "__main__":
    sys.exit(cli.stage_main(report))
