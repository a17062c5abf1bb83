"""Parallel layout (TP/PP/EP/DP) on top of megatron-core's parallel_state.

Only this package imports megatron-core (see mcore.py); the rest of megamoe asks here for ranks,
groups and the model-parallel RNG.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {mp}; change --tensor_model_parallel_size or "
                "--pipeline_model_parallel_size, or the number of processes")
        return world_size // mp

    def validate(self, world_size: int, num_experts: int | None = None) -> None:
        dp = self.data_parallel_size(world_size)
        ep = self.expert_model_parallel_size
        # Experts are not tensor-parallel (expert TP = 1): EP folds over the TP x DP ranks.
        if (self.tensor_model_parallel_size * dp) % ep:
            raise ValueError(
                f"--expert_model_parallel_size {ep} must divide tensor x data parallel size "
                f"{self.tensor_model_parallel_size * dp} (world {world_size})")
        if num_experts is not None and num_experts % ep:
            raise ValueError(
                f"--expert_model_parallel_size {ep} must divide the number of experts {num_experts}")


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
    """Start torch.distributed from torchrun's environment (or as a single process)."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # plain `python -m megamoe.train`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def initialize(layout: ParallelLayout, seed: int, num_experts: int | None = None) -> None:
    """Create megatron-core's process groups for `layout` and seed every RNG."""
    from .mcore import model_parallel_cuda_manual_seed, ps

    global _current
    init_distributed()
    layout.validate(dist.get_world_size(), num_experts)
    key = (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
           layout.expert_model_parallel_size)
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


def tp_rank() -> int: return _ps().get_tensor_model_parallel_rank()
def tp_size() -> int: return _ps().get_tensor_model_parallel_world_size()
def tp_group(): return _ps().get_tensor_model_parallel_group()
def pp_rank() -> int: return _ps().get_pipeline_model_parallel_rank()
def pp_size() -> int: return _ps().get_pipeline_model_parallel_world_size()
def pp_group(): return _ps().get_pipeline_model_parallel_group()
def is_first_stage() -> bool: return _ps().is_pipeline_first_stage()
def is_last_stage() -> bool: return _ps().is_pipeline_last_stage()
def ep_rank() -> int: return _ps().get_expert_model_parallel_rank()
def ep_size() -> int: return _ps().get_expert_model_parallel_world_size()
def ep_group(): return _ps().get_expert_model_parallel_group()
def expert_dp_rank() -> int: return _ps().get_expert_data_parallel_rank()
def dp_rank() -> int: return _ps().get_data_parallel_rank()
def dp_size() -> int: return _ps().get_data_parallel_world_size()
def dp_group(): return _ps().get_data_parallel_group()


def rng_fork():
    """Context manager: the model-parallel RNG stream (differs across TP ranks)."""
    from .mcore import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().fork()
