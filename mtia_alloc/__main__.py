"""`python -m mtia_alloc ...`: relies on mtia_alloc.tools.cli, whose main it runs."""
import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
