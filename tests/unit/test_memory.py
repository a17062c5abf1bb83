"""megamoe/memory.py: parameter counts against a real built model, and the per-GPU bytes of
LLaMA-MoE-3.5B worked out by hand (the README's layout guide quotes them)."""

import pytest

from megamoe.config import ModelConfig, MoEConfig
from megamoe.ops.memory import GIB, estimate, parameter_counts


def test_counts_match_a_built_model(world1):
    from megamoe.model.llama import build_model
    from tests.helpers import tiny_model_config

    m = tiny_model_config(num_hidden_layers=2)
    for moe in (
        None,
        MoEConfig(num_experts=4, num_selects=2),
        MoEConfig(
            num_experts=4, num_selects=1, gate_type="SwitchBalancedGate", gate_network="linear"
        ),
    ):
        model = build_model(m, moe)
        dense, experts = parameter_counts(m, moe)
        built_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert experts == built_experts
        assert dense + experts == sum(p.numel() for p in model.parameters())


def test_llama_moe_3_5b_by_hand():
    m = ModelConfig()  # LLaMA-7B shapes
    moe = MoEConfig(num_experts=16, num_selects=4)
    dense, experts = parameter_counts(m, moe)
    assert experts == 32 * 16 * 688 * 3 * 4096  # 4.33B
    assert dense == pytest.approx(2.42e9, rel=0.01)
    # 8 GPUs, EP=1, DP=8, bf16 with the distributed optimizer: 6 bytes/param + 12/8
    e = estimate(m, moe, dp=8)
    total = dense + experts
    assert e.weights + e.gradients == 6 * total
    assert e.optimizer == pytest.approx(12 * total / 8)
    # EP=2: experts halve; their optimizer shards over TP x DP / EP = 4 ranks
    e2 = estimate(m, moe, ep=2, dp=8)
    assert e2.weights == 2 * (dense + experts / 2)
    assert e2.optimizer == pytest.approx(12 * (dense / 8 + experts / 2 / 4))
    assert e2.total < e.total
    # no distributed optimizer: every rank holds it all; LoRA: weights only
    assert estimate(m, moe, dp=8, distributed_optimizer=False).optimizer == 12 * total
    assert estimate(m, moe, dp=8, lora=True).total == 2 * total
    assert "GiB per GPU" in e.line() and f"{e.total / GIB:.1f}" in e.line()
