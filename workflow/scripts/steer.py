"""Stage steer (opt-in): clamp SAE features while the model generates, keeping the SAE's error term.

Prints the answer before and after for each prompt and writes steering.parquet; see mmsae.interpret.steering
(`python workflow/scripts/steer.py --help` for the arguments).
"""

from __future__ import annotations

import sys

from mmsae.interpret.steering import main

if __name__ == "__main__":
    sys.exit(main())
