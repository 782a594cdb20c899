"""`python -m diffkern ...`: the `diffkern` command (generate, bench, info); see diffkern.cli."""

import sys

from diffkern.cli import main

if __name__ == "__main__":
    sys.exit(main())
