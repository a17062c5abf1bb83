"""The fused path's pieces as they run on CPU (eager: CI has no GPU; tests/gpu compares the compiled
kernels with the plain path on CUDA): the rotary with cached cos/sin against megatron-core's own
maths, and which megatron-core fusions each device and dtype turn on."""

import pytest
import torch

from megamoe.model import fusion
from megamoe.parallel import mcore
from tests.helpers import rel_err


def _angles(s, dim, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    f = torch.outer(torch.arange(s).float(), inv)
    return torch.cat([f, f], -1)[:, None, None, :]  # megatron-core's [s, 1, 1, dim]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [32, 16], ids=["full", "partial"])
def test_rotary_matches_megatron_core(dtype, rot_dim):
    torch.manual_seed(0)
    t = torch.randn(24, 2, 4, 32, dtype=dtype, requires_grad=True)
    dy = torch.randn(24, 2, 4, 32, dtype=dtype)
    for base in (10000.0, 500.0):  # a second angles tensor must not hit the first one's cos/sin
        freqs = _angles(24, rot_dim, base)
        want = mcore.unfused_rotary(t, freqs, rotary_interleaved=False)
        (want_grad,) = torch.autograd.grad(want, t, dy)
        got = fusion._rotary(t, freqs)
        (got_grad,) = torch.autograd.grad(got, t, dy)
        assert rel_err(got, t) > 0.1  # it rotates
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_fused_flags_by_device_and_dtype(monkeypatch):
    assert fusion.fused_config_flags("cpu", torch.bfloat16) == {}
    bf16 = fusion.fused_config_flags("cuda", torch.bfloat16)
    assert bf16["apply_rope_fusion"] and bf16["bias_activation_fusion"]
    assert bf16["cross_entropy_loss_fusion"] and bf16["cross_entropy_fusion_impl"] == "native"
    # megatron-core's fused cross-entropy returns bf16 gradients: never for an fp32 model
    assert "cross_entropy_loss_fusion" not in fusion.fused_config_flags("cuda", torch.float32)
    monkeypatch.setenv("MEGAMOE_COMPILE", "0")
    assert fusion.fused_config_flags("cuda", torch.bfloat16) == {}


def test_auto_attention_keeps_torchs_order_off_hopper():
    from megamoe.model.llama import auto_attention_order

    assert auto_attention_order(torch.device("cpu")) is None
