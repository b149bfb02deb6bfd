"""Stage steer: see mmsae.interpret.steer (python workflow/scripts/steer.py --help)."""

import sys

from mmsae.interpret import steer

if __name__ == "__main__":
    sys.exit(steer.main())
