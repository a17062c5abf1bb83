"""`python -m megamoe.train FLAGS` / `torchrun ... -m megamoe.train FLAGS` / `megamoe train`.

Flags and config files are parsed by megamoe.config; megamoe.train.plan checks them (and the
model, data and processes) before any work: bad flags exit with code 2 and one line per
problem. Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after saving), 1 the run failed
(e.g. a non-finite loss, or a bug: its traceback is in train.log), 2 bad flags or inputs, 130
Ctrl-C.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

PROG = "megamoe.train"


def quiet_library_noise() -> None:
    """Hide messages of megatron-core 0.16.1 and torch.distributed.checkpoint that say nothing
    about this run: our MoE MLP is not one of megatron-core's MLP classes ("Unknown MLP type"),
    its TransformerConfig default cuda_graph_scope deprecation, and torch's ShardedTensor /
    load_state_dict deprecations inside dist_checkpointing."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint.*"
    )
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing.*"
    )

    class _Drop(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("Unknown MLP type")

    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_Drop())


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    from ..config import parse_run_config
    from ..findings import ConfigError
    from .plan import make_plan

    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_noise()
    from ..lifetime import children_die_with_me, die_with_parent

    children_die_with_me()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: end with its agent, not hang
        die_with_parent()
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        plan, findings = make_plan(parse_run_config(argv), repair=True)
    except ConfigError as e:
        plan, findings = None, e.findings
    if rank0:
        for f in findings:
            kind = "error" if f.is_error else "warning"
            print(f"{prog}: {kind}: {f.text()}", file=sys.stderr, flush=True)
    if plan is None or any(f.is_error for f in findings):
        return 2
    from .trainer import run_training

    return run_training(plan)
