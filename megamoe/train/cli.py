"""`python -m megamoe.train FLAGS` / `torchrun ... -m megamoe.train FLAGS` / `megamoe train`.

Flags and config files are parsed by megamoe.config; megamoe.train.preflight checks them (and
the model, data and processes) before any work: bad flags exit with code 2 and one line per
problem. Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after saving), 1 the run failed
(e.g. a non-finite loss), 2 bad flags.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

PROG = "megamoe.train"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..config import ConfigError, parse_run_config
    from . import preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        run = parse_run_config(argv)
        plan = preflight.plan(run)
    except ConfigError as e:
        if rank0:
            for line in str(e).splitlines():
                print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    if rank0:
        for w in plan.warnings:
            print(f"{PROG}: warning: {w}", file=sys.stderr, flush=True)
    from .trainer import run_training

    return run_training(plan)
