"""Run a function in N real processes joined by torch.distributed (gloo), as torchrun would."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp

from tests.conftest import free_port


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        result = fn(*args)
    except BaseException:  # report the child's traceback in the parent
        result = RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run(fn, world_size: int, *args, timeout: float = 300):
    """Returns the list of each rank's return value; raises if a rank failed."""
    out_dir = tempfile.mkdtemp(prefix="megamoe-dist-")
    ctx = mp.start_processes(
        _worker,
        args=(world_size, free_port(), fn, args, out_dir),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    if not ctx.join(timeout=timeout):
        while not ctx.join(timeout=timeout):
            pass
    results = []
    for r in range(world_size):
        with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
            res = pickle.load(f)
        if isinstance(res, BaseException):
            raise res
        results.append(res)
    return results
