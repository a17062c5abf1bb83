"""The LLaMA-MoE MLP: gate -> dispatch -> experts -> combine x score scale factor.

Plugged into megatron-core's TransformerLayer as its ``mlp`` submodule (see llama.py), so tensor,
pipeline and data parallelism, sequence parallelism and checkpointing work around it unchanged.

Parallelism inside the layer:
- Each rank routes the tokens it holds. With tensor parallelism the layer requires sequence
  parallelism, so those are a 1/TP shard of the sequence; importance and load are summed over the
  TP group before the balance loss, so the loss equals the single-process one.
- Experts are sharded over megatron-core's expert-model-parallel group (E / EP local experts,
  not tensor-parallel); dispatched rows travel to their expert's rank by all-to-all and back.
- The balance loss reaches the gradients through :class:`AuxLossInjector` (added to the LM
  loss's gradient at this layer's output), so it needs no plumbing through pipeline stages.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ... import parallel
from ...config import MoEConfig
from ...parallel.mcore import MegatronModule, TransformerConfig, all_to_all, reduce_from_tensor_model_parallel_region
from . import dispatch as _dispatch
from .experts import GroupedSwiGLUExperts
from .gates import build_gate
from . import stats


class AuxLossInjector(torch.autograd.Function):
    """Identity on the activations; in backward, adds d(scale * aux_loss) to the aux loss's graph.

    `scale` is set per step by the trainer (1 / number of micro-batches) so the balance loss is
    averaged like the LM loss.
    """

    scale = 1.0

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * AuxLossInjector.scale


class LlamaMoEMLP(MegatronModule):
    def __init__(self, config: TransformerConfig, moe: MoEConfig, layer_index: int,
                 intermediate_size: int, **unused):
        super().__init__(config=config)
        self.moe = moe
        self.layer_index = layer_index  # global, 0-based
        self.num_experts = moe.num_experts
        self.scale = moe.scale_factor(layer_index)
        self.ep_size, self.ep_rank = parallel.ep_size(), parallel.ep_rank()
        if self.num_experts % self.ep_size:
            raise ValueError(f"{self.num_experts} experts do not divide over expert parallel "
                             f"size {self.ep_size}")
        self.num_local = self.num_experts // self.ep_size
        self.local_start = self.ep_rank * self.num_local
        sizes = moe.expert_sizes(layer_index, intermediate_size)
        self.tp_size = parallel.tp_size()
        if self.tp_size > 1 and not config.sequence_parallel:
            raise ValueError("MoE layers with tensor parallelism need sequence parallelism "
                             "(--sequence_parallel): each TP rank routes its own tokens")
        self.gate = build_gate(config.hidden_size, moe).to(config.params_dtype)
        if config.sequence_parallel:
            for p in self.gate.parameters():  # replicated over TP, grads summed over TP shards
                p.sequence_parallel = True
        # on the GPU when there is one: initialising billions of expert weights on the CPU
        # first takes minutes at LLaMA-MoE sizes
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.experts = GroupedSwiGLUExperts(
            config.hidden_size, sizes[self.local_start:self.local_start + self.num_local],
            dtype=config.params_dtype, device=device, first_expert=self.local_start)

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        reduce_fn = None
        if self.tp_size > 1:
            group = parallel.tp_group()
            reduce_fn = lambda t: reduce_from_tensor_model_parallel_region(t, group=group)  # noqa: E731
        g = self.gate(x, reduce_fn=reduce_fn)
        stats.record(self.layer_index, g)
        routing = _dispatch.make_routing(g.topk_idx, self.num_experts)
        rows = _dispatch.dispatch(x, routing)
        if self.ep_size > 1:
            out_rows = self._experts_across_ranks(rows, routing.tokens_per_expert)
        else:
            out_rows = self.experts(rows, routing.tokens_per_expert)
        scores = g.topk_scores if self.moe.multiply_gate_scores else None
        y = _dispatch.combine(out_rows, routing, scores, self.scale)
        if self.training and g.balance_loss.requires_grad:
            y = AuxLossInjector.apply(y, g.balance_loss)
        return y.view(shape), None

    def _experts_across_ranks(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor):
        """All-to-all the expert-sorted rows to the ranks owning their experts, and back."""
        group, ep, n_local = parallel.ep_group(), self.ep_size, self.num_local
        # counts[r, j]: rows this rank sends to expert j of rank r; gathered: what each rank sends us
        counts = tokens_per_expert.view(ep, n_local)
        recv_counts = torch.empty_like(counts)
        torch.distributed.all_to_all_single(recv_counts, counts, group=group)
        send_splits = counts.sum(1).tolist()
        recv_counts_host = recv_counts.tolist()  # one host sync per layer
        recv_splits = [sum(c) for c in recv_counts_host]
        received = all_to_all(group, rows, recv_splits, send_splits)
        # received is [source rank][local expert]; experts want [local expert][source rank]
        order, chunk_sizes = _regroup(recv_counts_host, ep, n_local)
        chunks = received.split(chunk_sizes)
        by_expert = torch.cat([chunks[i] for i in order])
        per_expert = torch.tensor([sum(recv_counts_host[r][j] for r in range(ep)) for j in range(n_local)],
                                  device=rows.device)
        out = self.experts(by_expert, per_expert)
        # undo the regrouping, then send rows home
        sizes_by_expert = [chunk_sizes[i] for i in order]
        back = out.split(sizes_by_expert)
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        out_by_source = torch.cat([back[inverse[i]] for i in range(len(order))])
        return all_to_all(group, out_by_source, send_splits, recv_splits)


def _regroup(recv_counts, ep, n_local):
    """Chunk order turning [source][expert] into [expert][source]; chunk i = source*n_local+expert."""
    chunk_sizes = [recv_counts[r][j] for r in range(ep) for j in range(n_local)]
    order = [r * n_local + j for j in range(n_local) for r in range(ep)]
    return order, chunk_sizes
