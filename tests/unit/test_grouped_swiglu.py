"""The grouped-GEMM experts (hand-written backward, grouped_swiglu.py) against the per-expert loop
of plain F.linear, forward and backward, fp32 and bf16, with zero-token experts. Runs on the CPU
through torch._grouped_mm's CPU path; tests/gpu/test_moe_layer_gpu.py repeats it with CUTLASS."""

import pytest
import torch

from tests.helpers import rel_err

NAMES = ["y", "x.grad", "gate.grad", "up.grad", "down.grad"]


def grouped_vs_loop(ex, counts, dtype, device="cpu"):
    """[(name, grouped, loop)] of the output and every gradient, fp32, for random x and dL/dy."""
    x = torch.randn(
        int(counts.sum()), ex.weight_down.shape[0], dtype=dtype, device=device, requires_grad=True
    )
    g = torch.randn_like(x)
    outs = []
    for path in (ex._forward_grouped, ex._forward_loop):
        x.grad = None
        for p in ex.parameters():
            p.grad = None
        y = path(x, counts)
        y.backward(g)
        outs.append([y.float(), x.grad.float()] + [p.grad.float() for p in ex.parameters()])
    return list(zip(NAMES, *outs))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_grouped_matches_loop(dtype, tol):
    from megamoe.model.moe.experts import GroupedSwiGLUExperts

    torch.manual_seed(0)
    ex = GroupedSwiGLUExperts(64, [32] * 6, dtype=dtype)
    counts = torch.tensor([0, 40, 7, 0, 100, 33])  # empty groups at the start and inside
    for name, a, b in grouped_vs_loop(ex, counts, dtype):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
        assert b.abs().max() > 0, name  # not a comparison of zeros
    # the empty experts' weight gradients are exactly zero
    s = 32
    assert (
        ex.weight_gate.grad[:s].abs().max() == 0
        and ex.weight_down.grad[:, 3 * s : 4 * s].abs().max() == 0
    )


def test_swiglu_backward_formula():
    from megamoe.model.moe.grouped_swiglu import _swiglu_bwd

    a = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    gh = torch.randn(50, 8, dtype=torch.float64)
    h = torch.nn.functional.silu(a) * b
    h.backward(gh)
    ga, gb, h2 = _swiglu_bwd(gh, a.detach(), b.detach())
    assert (
        rel_err(ga, a.grad) < 1e-6 and rel_err(gb, b.grad) < 1e-6 and rel_err(h2, h.detach()) < 1e-6
    )
