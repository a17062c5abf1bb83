"""Model FLOPs utilisation, counted on the parameters a token activates.

FLOPs per trained token = 6 x N_active + 12 x L x s x (heads x head_dim)   (PaLM, appendix B)

N_active counts every weight a token is multiplied by: attention (q, k, v, o), the dense FFN or,
for LLaMA-MoE, k of the E experts (k x the mean expert size) plus the gate, the norms and the
output layer (the input embedding is a lookup and is not counted). The attention term is the
score and value products over the full block of s tokens (not halved for causality, as PaLM and
Megatron count). MFU = FLOPs per token x tokens/s per device / peak FLOP/s of one device.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, MoEConfig

# dense bf16 tensor-core peak, TFLOP/s (spec sheets)
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A6000": 155.0,
    "V100": 125.0,
}
CPU_NOMINAL_TFLOPS = 1.0


def attention_and_norm_params(m: ModelConfig) -> int:
    """One decoder layer's q, k, v, o projections and its two RMSNorms."""
    d, hd = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.kv_heads * hd
    return d * q + 2 * d * kv + q * d + 2 * d


def gate_params(m: ModelConfig, moe: MoEConfig, in_use_only: bool) -> int:
    """One MoE layer's gate network, plus TopKBalancedNoisyGate's noise-scale layer (with
    `in_use_only`, only when its noise is on: a token is multiplied by it only then)."""
    d, e = m.hidden_size, moe.num_experts
    n = d * e + (e * e if moe.gate_network == "mlp" else 0)
    if moe.gate_type == "TopKBalancedNoisyGate" and (moe.gate_add_noise or not in_use_only):
        n += d * e
    return n


def activated_params(m: ModelConfig, moe: MoEConfig | None) -> int:
    d = m.hidden_size
    total = 0
    for i in range(m.num_hidden_layers):
        if moe is None:
            ffn = 3 * d * m.intermediate_size
        else:
            sizes = moe.expert_sizes(i, m.intermediate_size)
            ffn = 3 * d * (sum(sizes) / len(sizes)) * moe.num_selects
            ffn += gate_params(m, moe, in_use_only=True)
        total += attention_and_norm_params(m) + ffn
    return int(total + d + m.vocab_size * d)  # final norm + output layer


def flops_per_token(m: ModelConfig, moe: MoEConfig | None, seq_len: int) -> float:
    attn = 12.0 * m.num_hidden_layers * seq_len * m.num_attention_heads * m.head_dim
    return 6.0 * activated_params(m, moe) + attn


def peak_flops(given_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if given_tflops:
        return given_tflops * 1e12, f"--peak_tflops {given_tflops:g}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v * 1e12, f"{name}: {v:g} TFLOP/s bf16 peak"
        return 989e12, f"{name}: unknown peak, assuming 989 TFLOP/s (set --peak_tflops)"
    return CPU_NOMINAL_TFLOPS * 1e12, (
        f"CPU: nominal {CPU_NOMINAL_TFLOPS:g} TFLOP/s (set --peak_tflops for a real MFU)"
    )
