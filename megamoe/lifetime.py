"""Processes of a run die with it.

A trainer or preprocessing run killed with SIGKILL cannot clean up, so its children (megatron-core's
checkpoint writers, forked copies, tokenizer workers) must end by themselves: every child of a
megamoe process asks the kernel for SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG). Forked
children set it right after the fork (children_die_with_me); spawned ones as they import megamoe
(megamoe/__init__.py, for any multiprocessing child). Elsewhere than Linux this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_registered = False


def die_with_parent() -> None:
    """SIGKILL this process when its parent (the thread that started it) ends."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request: nobody would kill us
        os._exit(1)


def children_die_with_me() -> None:
    """Every process forked from now on dies with this one."""
    global _registered
    if not _registered:
        os.register_at_fork(after_in_child=die_with_parent)
        _registered = True
