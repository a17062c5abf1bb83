"""python -m megamoe.train FLAGS (also under torchrun): the trainer; see megamoe/train/main.py."""
import sys

from .main import main

if __name__ == "__main__":  # the guard is required: dist_checkpointing's save spawns a process
    sys.exit(main())
