"""torch.compile for the MoE layer's small elementwise pieces (the gate's routing maths, the
SwiGLU), on CUDA only.

On an H200 the layer was partly bound by launching ~70 small kernels; compiling these pure
functions fuses each into one or two kernels (forward and backward). CPU runs (CI, tests) stay
eager, so their numerics are exactly the plain code's. ``MEGAMOE_COMPILE=0`` turns compilation
off (debugging, or a torch without a working inductor).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable

import torch

_cache: dict = {}


def enabled(device_type: str) -> bool:
    return device_type == "cuda" and os.environ.get("MEGAMOE_COMPILE", "1") != "0"


def maybe_compile(key: Hashable, make: Callable[[], Callable], device_type: str) -> Callable:
    """The function `make()` builds, compiled once per `key` when :func:`enabled`."""
    if not enabled(device_type):
        return make()
    if key not in _cache:
        _cache[key] = torch.compile(make(), dynamic=True, fullgraph=True)
    return _cache[key]
