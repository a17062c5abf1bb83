"""The local experts of one MoE layer as one grouped SwiGLU.

Expert j: E_j(x) = W_down_j (silu(W_gate_j x) * (W_up_j x)). The local experts' weights are stored
concatenated along the neuron dimension, in expert order:

    weight_gate, weight_up: [S, d]   rows  s_0..s_0+size_0-1 belong to expert 0, ...
    weight_down:            [d, S]   columns likewise

so that slicing a dense FFN into experts is a row/column gather, equal and unequal sizes share one
layout, and with equal sizes the weights are views [E, size, d] that one grouped GEMM consumes.
Inputs arrive expert-contiguous (see dispatch.py) with `tokens_per_expert` rows each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grouped_swiglu import grouped_swiglu


def grouped_mm_available(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


_NAMES = (("weight_gate", 0), ("weight_up", 0), ("weight_down", 1))  # (name, neuron axis)


def mark_expert_param(p: nn.Parameter) -> nn.Parameter:
    """What megatron-core must know of an expert parameter (weights and LoRA adapters alike).

    - ``allreduce = False``: sharded over the expert-parallel group and replicated over the
      expert-data-parallel group, where megatron-core's DDP reduces it.
    - ``tensor_model_parallel = True`` (as megatron-core's own expert layers): the gradient norm
      then counts it on every TP rank. Unmarked, megatron-core counts it on TP rank 0 only and
      reduces the expert optimizer's norm over a group without the other TP ranks: TP ranks > 0
      would compute another clip coefficient and the replicated weights drift apart (seen with
      TP=2: 1e-6 after two steps). Our experts are not tensor-parallel; each rank counts the
      experts it holds, and the expert group sums over EP ranks and pipeline stages."""
    p.allreduce = False
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
    return p


class GroupedSwiGLUExperts(nn.Module):
    def __init__(
        self, hidden: int, sizes: list[int], dtype=torch.float32, device=None, first_expert: int = 0
    ):
        super().__init__()
        self.sizes = list(sizes)
        self.first_expert = first_expert  # global index of local expert 0
        self.equal = len(set(self.sizes)) == 1
        total = sum(self.sizes)
        kw = dict(dtype=dtype, device=device)
        self.weight_gate = nn.Parameter(torch.empty(total, hidden, **kw))
        self.weight_up = nn.Parameter(torch.empty(total, hidden, **kw))
        self.weight_down = nn.Parameter(torch.empty(hidden, total, **kw))
        for w in (self.weight_gate, self.weight_up, self.weight_down):
            nn.init.normal_(w, std=0.02)
            mark_expert_param(w)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """One checkpoint tensor per global expert (`weight_gate.<j>`, as in HF LLaMA-MoE), so
        checkpoints reshard across expert-parallel sizes and unequal expert sizes need no
        padding. Each is written by the first rank of the expert-data-parallel group."""
        from ... import parallel
        from ...parallel.mcore import ShardedTensor

        replica_id = (0, 0, parallel.expert_dp_rank())
        layer_tag = ""
        if sharded_offsets:
            # megatron-core stacks layers along a prepended axis, which needs equal shapes in
            # every layer; expert sizes may differ per layer, so the global layer index goes in
            # the checkpoint key instead (megatron-core then strips the local "layers.<i>.").
            ((_, layer, _),) = sharded_offsets
            layer_tag = f"layer{layer}."
        out = {}
        for name, axis, sizes in self.split_table():
            for j, part in enumerate(getattr(self, name).split(sizes, dim=axis)):
                suffix = f"{name}.{self.first_expert + j}"
                out[prefix + suffix] = ShardedTensor.from_rank_offsets(
                    prefix + layer_tag + suffix, part, replica_id=replica_id
                )
        return out

    def split_table(self) -> list:
        """[(parameter name, axis, per-expert sizes)] of every tensor checkpointed per expert
        (subclasses with more per-expert tensors, like LoRA adapters, extend it)."""
        return [(name, axis, self.sizes) for name, axis in _NAMES]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Accept per-expert tensors (from sharded checkpoints) as well as the flat ones.
        for name, axis, _ in self.split_table():
            keys = [f"{prefix}{name}.{self.first_expert + j}" for j in range(self.num_experts)]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.cat([state_dict.pop(k) for k in keys], axis)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def num_experts(self) -> int:
        return len(self.sizes)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: [M, d] expert-contiguous rows; tokens_per_expert: [E_local] int64."""
        if self.equal and grouped_mm_available(x):
            return self._forward_grouped(x, tokens_per_expert)
        return self._forward_loop(x, tokens_per_expert)

    def _forward_grouped(self, x, tokens_per_expert):
        return grouped_swiglu(
            x, self.weight_gate, self.weight_up, self.weight_down, tokens_per_expert
        )

    def _forward_loop(self, x, tokens_per_expert):
        counts = tokens_per_expert.tolist()  # CPU path: the host needs the counts anyway
        outs, row, col = [], 0, 0
        for n, s in zip(counts, self.sizes):
            xe = x[row : row + n]
            h = F.silu(F.linear(xe, self.weight_gate[col : col + s])) * F.linear(
                xe, self.weight_up[col : col + s]
            )
            outs.append(F.linear(h, self.weight_down[:, col : col + s]))
            row, col = row + n, col + s
        if not outs:
            return x.new_zeros(0, self.weight_down.shape[0])
        return torch.cat(outs, 0)
