"""megamoe checkpoints: `layout` says what one is on disk and lists a run's (torch-free, for
every tool); `io` writes and reads them with megatron-core's dist_checkpointing (any parallel
layout loads any checkpoint, resharding on load).

`megamoe.checkpoint.save(...)` and the other I/O functions are looked up in `io` when first
used, so that importing this package stays cheap (no torch, no megatron-core). `verify` here is
one process's check; `io.verify` spreads the checksums over the ranks of a run.
"""

from .layout import (  # noqa: F401  (the names every tool uses)
    META,
    CheckpointError,
    checkpoint_path,
    configs_from_meta,
    is_checkpoint,
    list_checkpoints,
    make_meta,
    newest_checkpoint,
    quarantine,
    read_meta,
    verify,
)

_IO = ("save", "load_model", "load_optimizer", "load_rank_state", "gather_full_state")


def __getattr__(name: str):
    if name in _IO:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
