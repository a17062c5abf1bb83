"""The LLaMA-MoE MLP: gate -> dispatch -> experts -> combine x score scale factor.

Plugged into megatron-core's TransformerLayer as its ``mlp`` submodule (see llama.py), so tensor,
pipeline and data parallelism, sequence parallelism and checkpointing work around it unchanged.

Parallelism inside the layer:
- Each rank routes the tokens it holds. With tensor parallelism the layer requires sequence
  parallelism, so those are a 1/TP shard of the sequence; importance and load are summed over the
  TP group before the balance loss, so the loss equals the single-process one.
- Experts are sharded over megatron-core's expert-model-parallel group (E / EP local experts,
  not tensor-parallel); each token travels by all-to-all once to each rank serving any of its
  experts, and comes back as one row per rank (expert_parallel.py).
- The balance loss reaches the gradients through :class:`AuxLossInjector` (added to the LM
  loss's gradient at this layer's output), so it needs no plumbing through pipeline stages.
"""

from __future__ import annotations

import torch

from ... import parallel
from ...config import MoEConfig
from ...parallel.mcore import (
    MegatronModule,
    TransformerConfig,
    reduce_from_tensor_model_parallel_region,
)
from . import dispatch as _dispatch
from . import routing_stats
from .expert_parallel import exchange
from .experts import GroupedSwiGLUExperts
from .gates import build_gate


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
    def __init__(
        self,
        config: TransformerConfig,
        moe: MoEConfig,
        layer_index: int,
        intermediate_size: int,
        **unused,
    ):
        super().__init__(config=config)
        self.moe = moe
        self.layer_index = layer_index  # global, 0-based
        self.num_experts = moe.num_experts
        self.scale = moe.scale_factor(layer_index)
        self.ep_size, self.ep_rank = parallel.ep_size(), parallel.ep_rank()
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"{self.num_experts} experts do not divide over expert parallel size {self.ep_size}"
            )
        self.num_local = self.num_experts // self.ep_size
        self.local_start = self.ep_rank * self.num_local
        sizes = moe.expert_sizes(layer_index, intermediate_size)
        self.tp_size = parallel.tp_size()
        if self.tp_size > 1 and not config.sequence_parallel:
            raise ValueError(
                "MoE layers with tensor parallelism need sequence parallelism "
                "(--sequence_parallel): each TP rank routes its own tokens"
            )
        self.gate = build_gate(config.hidden_size, moe).to(config.params_dtype)
        if not moe.multiply_gate_scores and not (
            moe.gate_use_balance and moe.gate_balance_loss_weight
        ):
            # neither the scores nor a balance loss reach the loss: the gate gets no gradient, and
            # trainable parameters without one stall megatron-core's overlapped reduction
            self.gate.requires_grad_(False)
        if config.sequence_parallel:
            for p in self.gate.parameters():  # replicated over TP, grads summed over TP shards
                p.sequence_parallel = True
        # on the GPU when there is one: initialising billions of expert weights on the CPU
        # first takes minutes at LLaMA-MoE sizes
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.experts = GroupedSwiGLUExperts(
            config.hidden_size,
            sizes[self.local_start : self.local_start + self.num_local],
            dtype=config.params_dtype,
            device=device,
            first_expert=self.local_start,
        )

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        reduce_fn = None
        if self.tp_size > 1:
            group = parallel.tp_group()
            reduce_fn = lambda t: reduce_from_tensor_model_parallel_region(t, group=group)  # noqa: E731
        g = self.gate(x, reduce_fn=reduce_fn)
        routing_stats.record(self.layer_index, g)
        scores = g.topk_scores if self.moe.multiply_gate_scores else None
        if self.ep_size > 1:
            y = exchange(
                x,
                g.topk_idx,
                scores,
                self.scale,
                self.experts,
                parallel.ep_group(),
                self.ep_rank,
                self.num_local,
                chunks=parallel.ep_overlap_chunks(),
            )
        else:
            routing = _dispatch.make_routing(g.topk_idx, self.num_experts)
            out_rows = self.experts(_dispatch.dispatch(x, routing), routing.tokens_per_expert)
            y = _dispatch.combine(out_rows, routing, scores, self.scale)
        if self.training and g.balance_loss.requires_grad:
            y = AuxLossInjector.apply(y, g.balance_loss)
        return y.view(shape), None
