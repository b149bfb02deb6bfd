"""Stage encode: see mmsae.sae.encode (python workflow/scripts/encode.py --help)."""

import sys

from mmsae import cli
from mmsae.sae import encode

if __name__ == "__main__":
    sys.exit(cli.stage_main(encode))
