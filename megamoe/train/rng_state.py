"""Per-rank RNG state saved with each checkpoint (rank_state_<rank>.pt): python `random`,
numpy's global generator, torch's CPU generator, CUDA's (when present) and megatron-core's
tensor-parallel RNG tracker."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    from ..parallel.mcore import tensor_parallel

    st = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {
            k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
    }
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
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: v.clone() for k, v in st["tracker"].items()}
    )
