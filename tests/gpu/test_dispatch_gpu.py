"""Token dispatch/combine with the CUDA kernels of megamoe._C: the CPU checks again on the GPU,
agreement with the CPU kernels, large and awkward shapes, and no host synchronisation."""

from __future__ import annotations

import pytest
import torch

from megamoe.model.moe import dispatch as D
from tests.helpers import rel_err
from tests.unit.test_dispatch import (
    SHAPES,
    TOL,
    check_combine,
    check_dispatch,
    check_routing,
    random_topk,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _no_debug_flag(monkeypatch):
    monkeypatch.delenv("MEGAMOE_DEBUG_DISPATCH", raising=False)


def test_cuda_kernels_are_built():
    from megamoe import _C

    assert _C.with_cuda, "megamoe._C was built without its CUDA kernels"


@pytest.mark.parametrize(
    "T,k,E,experts",
    [
        (1, 1, 1, None),
        (1, 2, 4, None),
        (37, 3, 4, None),
        (300, 3, 7, [0, 2, 6]),
        (8192, 4, 16, None),
        (16384, 8, 64, None),
        (4099, 2, 256, None),
        (100000, 6, 64, [5, 9, 63]),
        (70, 2, 300, None),
    ],
)
def test_routing_kernel(T, k, E, experts):
    idx = random_topk(T, k, E, CUDA, experts=experts)
    r = D.make_routing(idx, E)  # the kernel (E <= 256, T*k <= 64K), else torch ops
    check_routing(r, idx, E)
    ref = D.make_routing_reference(idx, E)
    assert torch.equal(r.row_id_map, ref.row_id_map) and torch.equal(
        r.tokens_per_expert, ref.tokens_per_expert
    )
    if E <= 256:  # the kernel itself, also past the size where make_routing stops using it
        rows, counts = torch.ops.megamoe.make_routing(idx, E)
        assert torch.equal(rows, ref.row_id_map) and torch.equal(counts, ref.tokens_per_expert)
    cpu = D.make_routing(idx.cpu(), E)
    assert torch.equal(r.row_id_map.cpu(), cpu.row_id_map)
    assert torch.equal(D.make_routing(idx.int(), E).row_id_map, r.row_id_map)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-k{}-E{}".format(*s))
def test_dispatch_matches_reference(shape, dtype):
    check_dispatch(*shape, dtype, device=CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-k{}-E{}".format(*s))
def test_combine_matches_reference(shape, dtype):
    check_combine(*shape, dtype, device=CUDA, scale=1.0)
    check_combine(*shape, dtype, device=CUDA, scale=0.37)
    check_combine(*shape, dtype, device=CUDA, with_scores=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(dtype):
    check_dispatch(40, 24, 2, 4, dtype, device=CUDA)
    check_combine(
        40,
        24,
        2,
        4,
        dtype,
        device=CUDA,
        score_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        scale=2.0,
    )


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_up_to_num_experts(k):
    check_dispatch(16, 40, k, 4, torch.float32, device=CUDA)
    check_combine(16, 40, k, 4, torch.float32, device=CUDA, scale=1.5)


@pytest.mark.parametrize("drop", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", SHAPES + [(4096, 4096, 4, 16)], ids=lambda s: "T{}-d{}-k{}-E{}".format(*s)
)
def test_dropped_copies(shape, dtype, drop):
    check_dispatch(*shape, dtype, device=CUDA, drop=drop)
    check_combine(*shape, dtype, device=CUDA, scale=0.37, drop=drop)
    check_combine(*shape, dtype, device=CUDA, with_scores=False, drop=drop)


@pytest.mark.parametrize("T,k,E", [(37, 3, 4), (8192, 4, 16), (4099, 2, 256)])
def test_routing_kernel_with_dropped_copies(T, k, E):
    idx = random_topk(T, k, E, CUDA)
    idx = idx.masked_fill(torch.rand(T, k, device=CUDA) < 0.4, -1)
    n = int((idx >= 0).sum())
    rows, counts = torch.ops.megamoe.make_routing(idx, E)
    ref = D.make_routing_reference(idx, E, num_rows=n)
    assert torch.equal(rows, ref.row_id_map) and torch.equal(counts, ref.tokens_per_expert)
    assert torch.equal(rows.cpu(), D.make_routing(idx.cpu(), E, num_rows=n).row_id_map)


def test_many_experts_per_token():
    # k = E = 64: the backward's shared memory holds num_warps * k partial sums
    check_combine(64, 512, 64, 64, torch.bfloat16, device=CUDA, scale=0.5)


def test_score_dtypes():
    check_combine(32, 48, 2, 4, torch.bfloat16, device=CUDA, score_dtype=torch.bfloat16, scale=0.5)
    check_combine(32, 48, 2, 4, torch.float16, device=CUDA, score_dtype=torch.float32)


def test_experts_without_tokens():
    experts = [1, 5]
    routing = D.make_routing(random_topk(24, 2, 8, CUDA, experts=experts), 8)
    assert routing.tokens_per_expert.tolist() == [0, 24, 0, 0, 0, 24, 0, 0]
    for dtype in (torch.float32, torch.bfloat16):
        check_dispatch(24, 32, 2, 8, dtype, device=CUDA, experts=experts)
        check_combine(24, 32, 2, 8, dtype, device=CUDA, scale=0.8, experts=experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(dtype):
    T, d, k, E = 300, 256, 3, 8
    routing = D.make_routing(random_topk(T, k, E, CUDA), E)
    x = torch.randn(T, d, device=CUDA).to(dtype)
    back = D.combine(D.dispatch(x, routing), routing, torch.ones(T, k, device=CUDA), 1.0 / k)
    assert rel_err(back, x) < TOL[dtype]


def test_gradcheck_float64():
    T, d, k, E = 5, 6, 2, 3
    routing = D.make_routing(random_topk(T, k, E, CUDA), E)
    x = torch.randn(T, d, dtype=torch.float64, device=CUDA, requires_grad=True)
    y = torch.randn(T * k, d, dtype=torch.float64, device=CUDA, requires_grad=True)
    s = torch.rand(T, k, dtype=torch.float64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: D.dispatch(x, routing), (x,))
    assert torch.autograd.gradcheck(lambda y, s: D.combine(y, routing, s, 0.7), (y, s))
    assert torch.autograd.gradcheck(lambda y: D.combine(y, routing, None), (y,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [4096, 1000, 13])  # 16-byte rows, 8-byte rows (bf16), odd rows
def test_cuda_agrees_with_cpu_kernels(dtype, d):
    T, k, E = 257, 4, 16
    idx = random_topk(T, k, E)
    r_cpu, r_gpu = D.make_routing(idx, E), D.make_routing(idx.to(CUDA), E)
    assert torch.equal(r_gpu.row_id_map.cpu(), r_cpu.row_id_map)
    assert torch.equal(r_gpu.tokens_per_expert.cpu(), r_cpu.tokens_per_expert)
    ops = torch.ops.megamoe
    x = torch.randn(T, d).to(dtype)
    y = torch.randn(T * k, d).to(dtype)
    g = torch.randn(T, d).to(dtype)
    s = torch.rand(T, k)
    m_cpu, m_gpu = r_cpu.row_id_map, r_gpu.row_id_map
    assert torch.equal(ops.permute(x.to(CUDA), m_gpu, k).cpu(), ops.permute(x, m_cpu, k))
    for scores in (s, None):
        a = ops.unpermute(
            y.to(CUDA), m_gpu, None if scores is None else scores.to(CUDA), k, 0.6
        ).cpu()
        b = ops.unpermute(y, m_cpu, scores, k, 0.6)
        assert rel_err(a, b) < TOL[dtype] / 10, (scores is None, rel_err(a, b))
    gy_a, gs_a = ops.unpermute_backward(g.to(CUDA), y.to(CUDA), m_gpu, s.to(CUDA), k, 0.6)
    gy_b, gs_b = ops.unpermute_backward(g, y, m_cpu, s, k, 0.6)
    assert torch.equal(gy_a.cpu(), gy_b)  # one multiply and one rounding: identical
    assert rel_err(gs_a.cpu(), gs_b) < 1e-5  # fp32 dot products summed in another order


def test_large_bf16():
    # 8192 tokens x 4096 hidden, k=4 of 16 experts: the size of a real micro-batch
    errs_d = check_dispatch(8192, 4096, 4, 16, torch.bfloat16, device=CUDA)
    errs_c = check_combine(8192, 4096, 4, 16, torch.bfloat16, device=CUDA, scale=0.25)
    assert errs_d["fwd"] == 0 and errs_c["grad_scores"] < 1e-5


def test_large_odd_hidden():
    check_dispatch(1024, 4095, 4, 16, torch.bfloat16, device=CUDA)
    check_combine(1024, 4095, 4, 16, torch.bfloat16, device=CUDA, scale=0.25)


def test_misaligned_rows_use_the_scalar_path():
    T, d, k, E = 64, 512, 2, 8
    r = D.make_routing(random_topk(T, k, E, CUDA), E)
    x = torch.randn(T * d + 1, device=CUDA, dtype=torch.bfloat16)[1:].view(T, d)  # 2-byte offset
    assert x.data_ptr() % 16 != 0
    assert torch.equal(D.dispatch(x, r), D.dispatch_reference(x, r))
    y = torch.randn(T * k * d + 1, device=CUDA)[1:].view(T * k, d)
    s = torch.rand(T, k, device=CUDA)
    assert rel_err(D.combine(y, r, s, 0.5), D.combine_reference(y, r, s, 0.5)) < 1e-6


def test_no_host_synchronisation():
    T, d, k, E = 1024, 1024, 4, 16
    idx = random_topk(T, k, E, CUDA)
    x = torch.randn(T, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    scores = torch.rand(T, k, device=CUDA, requires_grad=True)
    g = torch.randn(T, d, device=CUDA, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing = D.make_routing(idx, E)
        rows = D.dispatch(x, routing)
        out = D.combine(rows * 2, routing, scores, 0.5)
        out.backward(g)
        D.combine(rows.detach(), routing, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # combine(2 * dispatch(x)) with weights 0.5 * s: grad_x = g * sum_j s_j
    assert rel_err(x.grad.float(), g.float() * scores.detach().sum(1, keepdim=True)) < 1e-2


def test_runs_on_the_current_stream():
    T, d, k, E = 512, 1024, 2, 8
    r = D.make_routing(random_topk(T, k, E, CUDA), E)
    y = torch.randn(T * k, d, device=CUDA)
    s = torch.rand(T, k, device=CUDA)
    expected = D.combine(y, r, s, 1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = D.combine(y, r, s, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


def test_debug_flag_checks_expert_range(monkeypatch):
    monkeypatch.setenv("MEGAMOE_DEBUG_DISPATCH", "1")
    with pytest.raises(ValueError, match="expert index 9"):
        D.make_routing(torch.tensor([[0, 9]], device=CUDA), 4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    check_combine(64, 256, 2, 4, torch.bfloat16, device="cuda:1", scale=0.5)
    check_dispatch(64, 256, 2, 4, torch.bfloat16, device="cuda:1")
