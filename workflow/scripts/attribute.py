"""Stage attribute (opt-in): activation x gradient attribution of logit(A) - logit(B) to (token, SAE feature).

Writes attribution.parquet, tokens.parquet and plots/*.png; see mmsae.interpret.attribution
(`python workflow/scripts/attribute.py --help` for the arguments).
"""

from __future__ import annotations

import sys

from mmsae.interpret.attribution import main

if __name__ == "__main__":
    sys.exit(main())
