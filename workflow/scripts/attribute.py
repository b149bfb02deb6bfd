"""Stage attribute: see mmsae.interpret.attribute (python workflow/scripts/attribute.py --help)."""

import sys

from mmsae.interpret import attribute

if __name__ == "__main__":
    sys.exit(attribute.main())
