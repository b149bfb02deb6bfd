"""Stage features: see mmsae.features (python workflow/scripts/features.py --help)."""

import sys

from mmsae import cli, features

if __name__ == "__main__":
    sys.exit(cli.stage_main(features))
