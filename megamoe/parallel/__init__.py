"""Parallel layout (TP/PP/EP/DP) on top of megatron-core's parallel_state.

Only this package imports megatron-core (see mcore.py); the rest of megamoe asks here for ranks,
groups and the model-parallel RNG.
"""

from __future__ import annotations

import os

from .layout import ParallelLayout

_current = None  # (tp, pp, ep) of the groups megatron-core holds now
# Communication overlaps, off by default (benchmarks/RESULTS.md says what they measured):
# ep_chunks > 1 splits an MoE layer's tokens into chunks whose expert-parallel all-to-alls overlap
# the other chunks' expert GEMMs (model/moe/expert_parallel.py); tp_comm overlaps the
# sequence-parallel all-gather / reduce-scatter with the attention GEMMs (parallel/tp_overlap.py).
_overlap = {"ep_chunks": 1, "tp_comm": False}


def set_overlap(ep_chunks: int = 1, tp_comm: bool = False) -> None:
    if ep_chunks < 1:
        raise ValueError(f"ep_chunks must be >= 1, got {ep_chunks}")
    _overlap.update(ep_chunks=int(ep_chunks), tp_comm=bool(tp_comm))


def ep_overlap_chunks() -> int:
    return _overlap["ep_chunks"]


def tp_comm_overlap() -> bool:
    return _overlap["tp_comm"]


def init_distributed(backend: str | None = None) -> None:
    """Start torch.distributed from torchrun's environment, or as a world of one."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        # plain `python -m megamoe.train`, the converter: an in-process store, so no TCP port
        # is taken (a port picked as free can be taken by another process before we bind it)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # what libraries read
        return
    dist.init_process_group(backend)


def world_of_one(seed: int) -> None:
    """A world of one process with megatron-core's groups of size one (the converter and the
    export work this way); reuses an existing world of one and only reseeds it."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(
            "this runs as one process: start it with python, not torchrun "
            "(loading the result at any TP/PP/EP layout reshards it)"
        )
    initialize(ParallelLayout(), seed)


def initialize(layout: ParallelLayout, seed: int, num_experts: int | None = None) -> None:
    """Create megatron-core's process groups for `layout` (a model with `num_experts` experts
    per layer, None: dense) and seed every RNG."""
    import torch
    import torch.distributed as dist

    from ..findings import raise_errors
    from .mcore import model_parallel_cuda_manual_seed, ps

    global _current
    init_distributed()
    raise_errors(layout.check_world(dist.get_world_size(), num_experts), exc=ValueError)
    key = (
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.expert_model_parallel_size,
    )
    if ps.model_parallel_is_initialized() and _current == key:
        # Same groups: just reseed. (megatron-core's destroy does not free process groups, so
        # re-creating them in a long-lived process leaks gloo threads.)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        return
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _current = key
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    global _current
    from .mcore import ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _current = None


def is_initialized() -> bool:
    from .mcore import ps

    return ps.model_parallel_is_initialized()


def _ps():
    from .mcore import ps

    return ps


def tp_rank() -> int:
    return _ps().get_tensor_model_parallel_rank()


def tp_size() -> int:
    return _ps().get_tensor_model_parallel_world_size()


def tp_group():
    return _ps().get_tensor_model_parallel_group()


def pp_rank() -> int:
    return _ps().get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return _ps().get_pipeline_model_parallel_world_size()


def pp_group():
    return _ps().get_pipeline_model_parallel_group()


def is_first_stage() -> bool:
    return _ps().is_pipeline_first_stage()


def is_last_stage() -> bool:
    return _ps().is_pipeline_last_stage()


def ep_rank() -> int:
    return _ps().get_expert_model_parallel_rank()


def ep_size() -> int:
    return _ps().get_expert_model_parallel_world_size()


def ep_group():
    return _ps().get_expert_model_parallel_group()


def expert_dp_rank() -> int:
    return _ps().get_expert_data_parallel_rank()


def dp_rank() -> int:
    return _ps().get_data_parallel_rank()


def dp_size() -> int:
    return _ps().get_data_parallel_world_size()


def dp_group():
    return _ps().get_data_parallel_group()


def rng_fork():
    """Context manager: the model-parallel RNG stream (differs across TP ranks)."""
    from .mcore import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().fork()
