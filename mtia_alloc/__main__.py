"""`python -m mtia_alloc ...`: forwards to the command line in mtia_alloc.tools.cli."""
import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
