"""python -m megamoe.train FLAGS (also under torchrun); see megamoe/train/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":  # the guard is required: dist_checkpointing's save spawns a process
    sys.exit(main())
