"""Checkpoint directories of a run (naming, rotation, stale temporaries) and per-rank RNG state.

    <output_dir>/checkpoint-<step>/        megamoe.checkpoint.save (written to a temporary
                                           name and renamed: a directory under this name with
                                           megamoe.json is complete)
    <output_dir>/checkpoint-<step>.tmp-*   left by a crash mid-save; removed at the next start

RNG state saved per rank (rank_state_<rank>.pt): python `random`, numpy's global generator,
torch's CPU generator, CUDA's (when present) and megatron-core's tensor-parallel RNG tracker.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from .preflight import CKPT_RE, list_checkpoints

# leftovers of an interrupted save: its temporary, or a replaced copy moved aside (publish_dir)
STALE_RE = re.compile(r"^(checkpoint-\d+\.tmp-.+|\.checkpoint-\d+\.old-\d+)$")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def remove_stale(output_dir: str) -> list[str]:
    """Delete temporaries of interrupted saves (rank 0, before any save). Returns what went."""
    gone = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            if STALE_RE.match(name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                gone.append(name)
    return gone


def rotate(output_dir: str, limit: int | None) -> list[str]:
    """Keep the newest `limit` complete checkpoints; returns the removed paths."""
    if not limit:
        return []
    ckpts = list_checkpoints(output_dir)
    gone = []
    for _, path in ckpts[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


def rng_state() -> dict:
    from ..parallel.mcore import tensor_parallel

    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state(),
          "tracker": {k: v.clone() for k, v in
                      tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    from ..parallel.mcore import tensor_parallel

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in st["tracker"].items()})


__all__ = ["CKPT_RE", "list_checkpoints", "checkpoint_path", "remove_stale", "rotate",
           "rng_state", "set_rng_state"]
