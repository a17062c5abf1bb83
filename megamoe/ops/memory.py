"""Memory per GPU of weights, gradients and optimizer state for a model and parallel layout.

What the trainer allocates before any activation (megamoe/train/optim.py, train/step.py):

- bf16 training: bf16 weights (2 bytes), fp32 gradient buffers (4: megatron-core's DDP with
  grad_reduce_in_fp32), fp32 main weights + Adam's two moments (12) in the optimizer;
- fp32 training: fp32 weights (4), gradients (4), Adam's moments (8);
- the distributed optimizer shards the optimizer's part over the data-parallel ranks that hold a
  replica: DP for the dense (non-expert) parameters, the expert-data-parallel size
  TP x DP / EP for the experts (experts are not tensor-parallel: EP splits them);
- LoRA: only the adapters have gradients and optimizer state (counted as none here).

Dense parameters are split over TP x PP, experts over EP x PP (pipeline stages taken as equal).
Activations come on top and depend on micro-batch, sequence and recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, MoEConfig
from ..train.flops import attention_and_norm_params, gate_params

GIB = 2**30


def parameter_counts(m: ModelConfig, moe: MoEConfig | None) -> tuple[int, int]:
    """(dense, expert) parameter counts of the whole model. Dense: embeddings, output layer,
    attention, norms, gates (and the FFN of a dense LLaMA); expert: every expert's weights."""
    d = m.hidden_size
    dense = 2 * m.vocab_size * d + d  # untied embedding + output layer, final norm
    experts = 0
    for i in range(m.num_hidden_layers):
        dense += attention_and_norm_params(m)
        if moe is None:
            dense += 3 * d * m.intermediate_size
            continue
        experts += 3 * d * sum(moe.expert_sizes(i, m.intermediate_size))
        dense += gate_params(m, moe, in_use_only=False)
    return dense, experts


@dataclass
class MemoryEstimate:
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer

    def line(self) -> str:
        return (
            f"weights {self.weights / GIB:.1f} GiB + gradients {self.gradients / GIB:.1f} GiB "
            f"+ optimizer {self.optimizer / GIB:.1f} GiB = {self.total / GIB:.1f} GiB per GPU "
            "before activations"
        )


def estimate(
    m: ModelConfig,
    moe: MoEConfig | None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dp: int = 1,
    distributed_optimizer: bool = True,
    bf16: bool = True,
    lora: bool = False,
) -> MemoryEstimate:
    dense, experts = parameter_counts(m, moe)
    ep = ep if moe is not None else 1
    dense_gpu = dense / (tp * pp)
    expert_gpu = experts / (ep * pp)
    w_bytes, g_bytes, o_bytes = (2, 4, 12) if bf16 else (4, 4, 8)
    weights = (dense_gpu + expert_gpu) * w_bytes
    if lora:
        return MemoryEstimate(weights, 0.0, 0.0)
    expert_dp = max(1, tp * dp // ep)
    shard_dense, shard_expert = (dp, expert_dp) if distributed_optimizer else (1, 1)
    optimizer = o_bytes * (dense_gpu / shard_dense + expert_gpu / shard_expert)
    return MemoryEstimate(weights, (dense_gpu + expert_gpu) * g_bytes, optimizer)
