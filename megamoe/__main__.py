"""python -m megamoe VERB ...: the `megamoe` command (megamoe/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":  # the guard is required: dist_checkpointing's save spawns a process
    sys.exit(main())
