"""megamoe: a Megatron-style parallel trainer for LLaMA-MoE."""

__version__ = "0.1.0"


def _child_of_a_run() -> None:
    """A multiprocessing child (spawned: it imports megamoe afresh) dies with its parent."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        from .lifetime import die_with_parent

        die_with_parent()


_child_of_a_run()
