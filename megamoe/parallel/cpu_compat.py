"""CPU compatibility shim for megatron-core 0.16.1 (pinned).

Why: megatron-core assumes CUDA in places that have nothing to do with the maths: it asks
``torch.cuda.current_device()`` for a device argument, writes ``device="cuda"`` literals, keeps its
tensor-parallel RNG tracker in CUDA generator states and creates CUDA streams/events. On a machine
without a GPU (our laptops and CI) those calls raise "Torch not compiled with CUDA enabled".

What: instead of patching torch itself (which would fool *every* library in the process), each
affected megatron-core module gets its own ``torch`` name rebound to :data:`CPU_TORCH`, a thin proxy
of the real torch module in which

* tensor factories (``empty``, ``zeros``, ``tensor``, ...) and ``Tensor.to``-style device
  arguments map ``"cuda"``/``torch.device("cuda")``/a CUDA index to the CPU;
* ``torch.cuda`` is :class:`_CpuCuda`: ``current_device()`` returns the CPU device, the RNG
  functions drive the CPU generator, streams/events/synchronize are no-ops.

The tensor-parallel RNG tracker's two private helpers are replaced by CPU versions, so
``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work (the tracker swaps
CPU generator states exactly as it swaps CUDA ones on a GPU).

Nothing is patched when CUDA is available: GPU runs use megatron-core unchanged.
:func:`check_patch_targets` lists what the shim relies on; ``tests/unit/test_cpu_compat.py`` runs it,
so an upgrade of megatron-core that moves one of these symbols fails loudly instead of silently
running on a half-patched library.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

# megatron-core modules whose global name ``torch`` is rebound to the CPU proxy.
PATCHED_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine",
    "megatron.core.transformer.transformer_layer",
)
# Functions replaced by CPU versions: (module, attribute).
REPLACED_FUNCTIONS = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
)

_CPU = torch.device("cpu")


def _cpu_device(device):
    """Map any CUDA device spec to the CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _with_cpu_device(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    return wrapper


class _NoOpStream:
    """Stand-in for torch.cuda.Stream / Event: ordering is trivial on one CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self):
        return True


class _CpuCuda(types.SimpleNamespace):
    """torch.cuda as megatron-core sees it on a CPU-only machine."""

    def __getattr__(self, name):  # anything not overridden: the real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def current_stream(device=None):
        return _NoOpStream()

    @staticmethod
    def default_stream(device=None):
        return _NoOpStream()

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    @staticmethod
    def memory_allocated(device=None):
        return 0

    @staticmethod
    def max_memory_allocated(device=None):
        return 0

    @staticmethod
    def empty_cache():
        pass

    Stream = _NoOpStream
    Event = _NoOpStream


_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "randn_like",
    "randperm",
    "empty_strided",
    "linspace",
)


class _CpuTorch(types.ModuleType):
    """The torch module as patched megatron-core modules see it (see module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _with_cpu_device(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _CpuTorch()


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


_REPLACEMENTS = {
    "_get_cuda_rng_state": _cpu_get_rng_state,
    "_set_cuda_rng_state": _cpu_set_rng_state,
}
_applied = False


def check_patch_targets() -> list[str]:
    """What the shim needs from megatron-core; returns a list of problems (empty = all present)."""
    problems = []
    for name in PATCHED_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure the same way
            problems.append(f"cannot import {name}: {exc!r}")
            continue
        if getattr(mod, "torch", None) not in (torch, CPU_TORCH):
            problems.append(f"{name} no longer has a global 'torch'")
    for mod_name, attr in REPLACED_FUNCTIONS:
        mod = importlib.import_module(mod_name)
        if not callable(getattr(mod, attr, None)):
            problems.append(f"{mod_name}.{attr} is gone")
    return problems


def apply(force: bool = False) -> bool:
    """Patch megatron-core for CPU if CUDA is absent (or ``force``). Idempotent; returns whether
    the shim is active."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    problems = check_patch_targets()
    if problems:
        raise RuntimeError(
            "megamoe's CPU shim does not match the installed megatron-core (pinned 0.16.1): "
            + "; ".join(problems)
        )
    for name in PATCHED_MODULES:
        importlib.import_module(name).torch = CPU_TORCH
    for mod_name, attr in REPLACED_FUNCTIONS:
        setattr(importlib.import_module(mod_name), attr, _REPLACEMENTS[attr])
    _applied = True
    return True


def is_active() -> bool:
    return _applied
