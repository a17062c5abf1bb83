"""python -m megamoe.train FLAGS (also under torchrun): the trainer; see megamoe/train/main.py."""

import sys

from ..lifetime import watch_over_me
from .main import main

if __name__ == "__main__":  # the guard is required: dist_checkpointing's save spawns a process
    watch_over_me()  # the run's process: its children end with it, even on SIGKILL
    sys.exit(main())
