"""Token dispatch/combine (megamoe.model.moe.dispatch) with the real megamoe._C kernels, on CPU.

Kernels are compared with the pure-PyTorch reference evaluated in float64 on the same input values
(so the error measured is the kernel's own rounding), forward and backward (autograd of the
reference gives the expected gradients of x, y and scores), plus gradcheck in float64.
`check_dispatch` / `check_combine` take a device and are reused by tests/gpu/test_dispatch_gpu.py.
Run with -s to see the measured relative errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megamoe.model.moe import dispatch as D
from tests.helpers import rel_err

# Relative error bounds (norm of the difference over the norm of the float64 reference).
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_topk(T: int, k: int, E: int, device="cpu", experts=None, seed=0) -> torch.Tensor:
    """[T, k] int64 distinct experts per token, drawn from `experts` (default: all E)."""
    pool = torch.arange(E) if experts is None else torch.as_tensor(experts)
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(T, len(pool), generator=g).argsort(dim=1)[:, :k]
    return pool[pick].to(device)


def routed(T, k, E, device="cpu", experts=None, seed=0, drop=0.0) -> D.Routing:
    """make_routing of random_topk, with a fraction `drop` of the copies dropped (expert id -1)."""
    idx = random_topk(T, k, E, device, experts, seed)
    if not drop:
        return D.make_routing(idx, E)
    g = torch.Generator().manual_seed(seed + 1)
    dropped = (torch.rand(T, k, generator=g) < drop).to(device)
    idx = idx.masked_fill(dropped, -1)
    return D.make_routing(idx, E, num_rows=int((~dropped).sum()))


def check_dispatch(T, d, k, E, dtype, device="cpu", experts=None, seed=0, drop=0.0) -> dict:
    """dispatch forward (exact: it is a copy) and grad_x against the float64 reference."""
    torch.manual_seed(seed)
    routing = routed(T, k, E, device, experts, seed, drop)
    x = torch.randn(T, d, device=device).to(dtype).requires_grad_()
    out = D.dispatch(x, routing)
    assert out.dtype == dtype and out.shape == (routing.num_rows, d)
    x64 = x.detach().double().requires_grad_()
    ref = D.dispatch_reference(x64, routing)
    assert torch.equal(out.double(), ref), "dispatch must copy rows exactly"
    g = torch.randn(routing.num_rows, d, device=device).to(dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x64, g.double())
    assert gx.dtype == dtype
    errs = {"fwd": rel_err(out, ref), "grad_x": rel_err(gx, gx_ref)}
    print(
        f"dispatch {device} {dtype} T={T} d={d} k={k} E={E} drop={drop}: "
        + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
    )
    assert errs["grad_x"] < TOL[dtype], errs
    return errs


def check_combine(
    T,
    d,
    k,
    E,
    dtype,
    device="cpu",
    score_dtype=torch.float32,
    with_scores=True,
    scale=1.0,
    experts=None,
    seed=0,
    drop=0.0,
) -> dict:
    """combine forward and grads of y and scores against the float64 reference."""
    torch.manual_seed(seed)
    routing = routed(T, k, E, device, experts, seed, drop)
    y = torch.randn(routing.num_rows, d, device=device).to(dtype).requires_grad_()
    scores = (
        torch.rand(T, k, device=device).to(score_dtype).requires_grad_() if with_scores else None
    )
    out = D.combine(y, routing, scores, scale)
    assert out.dtype == dtype and out.shape == (T, d)
    y64 = y.detach().double().requires_grad_()
    s64 = scores.detach().double().requires_grad_() if with_scores else None
    ref = D.combine_reference(y64, routing, s64, scale)
    g = torch.randn(T, d, device=device).to(dtype)
    inputs, inputs64 = ((y, scores), (y64, s64)) if with_scores else ((y,), (y64,))
    grads = torch.autograd.grad(out, inputs, g)
    grads64 = torch.autograd.grad(ref, inputs64, g.double())
    errs = {"fwd": rel_err(out, ref), "grad_y": rel_err(grads[0], grads64[0])}
    assert grads[0].dtype == dtype
    if with_scores:
        assert grads[1].dtype == score_dtype
        errs["grad_scores"] = rel_err(grads[1], grads64[1])
        if drop:  # a dropped copy's score has no effect: its gradient is exactly zero
            assert not grads[1].reshape(-1)[routing.row_id_map < 0].any()
    print(
        f"combine {device} {dtype} scores={score_dtype if with_scores else None} scale={scale} "
        f"T={T} d={d} k={k} E={E} drop={drop}: "
        + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
    )
    # bf16 scores round the weights themselves: bound by the coarser of the two dtypes
    tol = max(TOL[dtype], TOL[score_dtype]) if with_scores else TOL[dtype]
    assert all(e < tol for e in errs.values()), errs
    return errs


SHAPES = [  # (T, d, k, E)
    (64, 64, 2, 8),
    (37, 13, 3, 4),  # d not a multiple of 8 (no 16-byte rows)
    (1, 24, 2, 4),  # a single token
    (50, 128, 4, 16),
]


def test_extension_is_loaded():
    assert D.HAVE_EXTENSION
    for op in ("make_routing", "permute", "unpermute", "unpermute_backward"):
        assert hasattr(torch.ops.megamoe, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-k{}-E{}".format(*s))
def test_dispatch_matches_reference(shape, dtype):
    check_dispatch(*shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-k{}-E{}".format(*s))
def test_combine_matches_reference(shape, dtype):
    check_combine(*shape, dtype, scale=1.0)
    check_combine(*shape, dtype, scale=0.37)


@pytest.mark.parametrize("drop", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-k{}-E{}".format(*s))
def test_dropped_copies(shape, dtype, drop):
    """Copies with expert id -1 (the expert-parallel layer's "served by another rank")."""
    check_dispatch(*shape, dtype, drop=drop)
    check_combine(*shape, dtype, scale=0.37, drop=drop)
    check_combine(*shape, dtype, with_scores=False, drop=drop)


def test_dropped_copies_routing():
    idx = torch.tensor([[2, -1], [-1, 0], [2, 1], [-1, -1]])
    r = D.make_routing(idx, 3, num_rows=4)
    ref = D.make_routing_reference(idx, 3, num_rows=4)
    # stable: expert 0 gets copy (1,1), expert 1 copy (2,1), expert 2 copies (0,0) then (2,0)
    assert r.row_id_map.tolist() == [2, -1, -1, 0, 3, 1, -1, -1] == ref.row_id_map.tolist()
    assert r.tokens_per_expert.tolist() == [1, 1, 2] == ref.tokens_per_expert.tolist()
    with pytest.raises(ValueError, match="num_rows=3 but topk_idx keeps 4"):
        D.make_routing(idx, 3, num_rows=3)
    with pytest.raises(ValueError, match="a dropped copy needs make_routing"):
        D.make_routing(idx, 3)  # without num_rows, -1 is not an expert
    with pytest.raises(ValueError, match="num_rows=9 must be in"):
        D.make_routing(idx, 3, num_rows=9)
    with pytest.raises(RuntimeError, match="num_rows must be -1"):
        torch.ops.megamoe.permute(torch.randn(4, 8), r.row_id_map, 2, 9)
    with pytest.raises(RuntimeError, match="keeps 4 copies but the buffer has 5 rows"):
        torch.ops.megamoe.permute(
            torch.randn(4, 8), r.row_id_map, 2, 5
        )  # a row would stay unwritten
    with pytest.raises(RuntimeError, match="keeps 4 copies but the buffer has 5 rows"):
        torch.ops.megamoe.unpermute_backward(
            torch.randn(4, 8), torch.randn(5, 8), r.row_id_map, torch.rand(4, 2), 2, 1.0
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(dtype):
    check_dispatch(40, 24, 2, 4, dtype)
    check_combine(
        40,
        24,
        2,
        4,
        dtype,
        score_dtype=torch.float32 if dtype != torch.float64 else torch.float64,
        scale=2.0,
    )


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_up_to_num_experts(k):
    check_dispatch(16, 40, k, 4, torch.float32)
    check_combine(16, 40, k, 4, torch.float32, scale=1.5)


def test_score_dtypes():
    check_combine(
        32, 48, 2, 4, torch.bfloat16, score_dtype=torch.bfloat16, scale=0.5
    )  # grads in bf16
    check_combine(32, 48, 2, 4, torch.float32, score_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_scores(dtype):
    check_combine(33, 40, 3, 6, dtype, with_scores=False)
    # LLaMA-MoE's multiply_gate_scores=False: a plain sum, the scale is not applied
    routing = D.make_routing(random_topk(8, 2, 4), 4)
    y = torch.randn(16, 8)
    assert torch.equal(D.combine(y, routing, None, 3.0), D.combine(y, routing, None, 1.0))


def test_experts_without_tokens():
    experts = [1, 5]  # of 8: six experts get no tokens
    routing = D.make_routing(random_topk(24, 2, 8, experts=experts), 8)
    assert routing.tokens_per_expert.tolist() == [0, 24, 0, 0, 0, 24, 0, 0]
    for dtype in (torch.float32, torch.bfloat16):
        check_dispatch(24, 32, 2, 8, dtype, experts=experts)
        check_combine(24, 32, 2, 8, dtype, scale=0.8, experts=experts)
    # a single expert for everyone
    check_combine(10, 16, 1, 4, torch.float32, experts=[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_round_trip(dtype, k):
    T, d, E = 29, 40, 5
    routing = D.make_routing(random_topk(T, k, E), E)
    x = torch.randn(T, d).to(dtype)
    back = D.combine(D.dispatch(x, routing), routing, torch.ones(T, k), 1.0 / k)
    err = rel_err(back, x)
    print(f"round trip {dtype} k={k}: rel err {err:.1e}")
    assert err < TOL[dtype]
    if k == 1 or dtype == torch.float32:
        assert torch.allclose(back, x, rtol=1e-6, atol=0)


def test_gradcheck_float64():
    T, d, k, E = 5, 6, 2, 3
    routing = D.make_routing(random_topk(T, k, E), E)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(T * k, d, dtype=torch.float64, requires_grad=True)
    s = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: D.dispatch(x, routing), (x,))
    assert torch.autograd.gradcheck(lambda y, s: D.combine(y, routing, s, 0.7), (y, s))
    assert torch.autograd.gradcheck(lambda y: D.combine(y, routing, None), (y,))


def check_routing(routing: D.Routing, idx: torch.Tensor, E: int) -> None:
    """row_id_map is the stable sort of the copies by expert; tokens_per_expert their histogram."""
    T, k = idx.shape
    assert (routing.num_tokens, routing.topk, routing.num_experts) == (T, k, E)
    assert (
        routing.row_id_map.dtype == torch.int32 and routing.tokens_per_expert.dtype == torch.int64
    )
    assert routing.row_id_map.device == idx.device == routing.tokens_per_expert.device
    flat = idx.flatten().long().cpu()
    assert torch.equal(routing.tokens_per_expert.cpu(), torch.bincount(flat, minlength=E))
    rows = routing.row_id_map.long().cpu()
    assert torch.equal(rows.sort().values, torch.arange(T * k))  # a permutation
    # the copy at each row: experts ascending, and within an expert, copies in order (stable)
    copy_at_row = torch.empty_like(rows)
    copy_at_row[rows] = torch.arange(T * k)
    expert_at_row = flat[copy_at_row]
    assert torch.equal(expert_at_row, flat.sort(stable=True).values)
    same = expert_at_row[1:] == expert_at_row[:-1]
    assert bool((copy_at_row[1:][same] > copy_at_row[:-1][same]).all())


@pytest.mark.parametrize(
    "T,k,E,experts",
    [
        (300, 3, 7, [0, 2, 3, 6]),
        (1, 1, 1, None),
        (33, 2, 256, None),
        (1000, 8, 64, None),
        (70, 2, 300, None),
    ],
)
def test_make_routing_metadata(T, k, E, experts):
    idx = random_topk(T, k, E, experts=experts)
    r = D.make_routing(idx, E)  # the op (E <= 256) or the torch-ops path (E = 300)
    check_routing(r, idx, E)
    ref = D.make_routing_reference(idx, E)
    check_routing(ref, idx, E)
    assert torch.equal(r.row_id_map, ref.row_id_map) and torch.equal(
        r.tokens_per_expert, ref.tokens_per_expert
    )
    assert torch.equal(D.make_routing(idx.int(), E).row_id_map, r.row_id_map)  # int32 expert ids


def test_no_tokens():
    r = D.make_routing(torch.empty(0, 2, dtype=torch.long), 4)
    assert r.tokens_per_expert.tolist() == [0, 0, 0, 0]
    x = torch.randn(0, 8, requires_grad=True)
    out = D.combine(D.dispatch(x, r), r, torch.rand(0, 2), 1.0)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert x.grad.shape == (0, 8)


def test_non_contiguous_inputs():
    T, d, k, E = 12, 16, 2, 4
    r = D.make_routing(random_topk(T, k, E), E)
    x = torch.randn(d, T).t()  # non-contiguous view
    assert torch.equal(D.dispatch(x, r), D.dispatch_reference(x, r))
    y = torch.randn(d, T * k).t()
    s = torch.rand(k, T).t()
    assert rel_err(D.combine(y, r, s, 0.5), D.combine_reference(y, r, s, 0.5)) < 1e-6


def test_misuse_raises():
    r = D.make_routing(random_topk(6, 2, 4), 4)
    with pytest.raises(ValueError, match="expert index 4"):
        D.make_routing(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="expert index -1"):
        D.make_routing(torch.tensor([[-1, 2]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        D.make_routing(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="int64"):
        D.make_routing(torch.tensor([[0.0, 1.0]]), 4)
    with pytest.raises(ValueError, match="x must have shape"):
        D.dispatch(torch.randn(5, 8), r)
    with pytest.raises(ValueError, match="y must have shape"):
        D.combine(torch.randn(6, 8), r, None)
    with pytest.raises(ValueError, match="scores must have shape"):
        D.combine(torch.randn(12, 8), r, torch.rand(6, 3))
    with pytest.raises(ValueError, match="floating point"):
        D.dispatch(torch.ones(6, 8, dtype=torch.int64), r)
    # the ops check their arguments too
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.megamoe.permute(torch.randn(6, 8), r.row_id_map.long(), 2)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.megamoe.permute(torch.randn(6, 8), r.row_id_map + 1, 2)
    with pytest.raises(RuntimeError, match="expert index 7"):
        torch.ops.megamoe.make_routing(torch.tensor([[0, 7]]), 4)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        m = torch.empty(12, dtype=torch.int32)
        assert torch.ops.megamoe.permute(torch.empty(6, 8), m, 2).shape == (12, 8)
        assert torch.ops.megamoe.unpermute(
            torch.empty(12, 8), m, torch.empty(6, 2), 2, 1.0
        ).shape == (6, 8)
        rows, counts = torch.ops.megamoe.make_routing(torch.empty(6, 2, dtype=torch.long), 4)
        assert rows.shape == (12,) and rows.dtype == torch.int32 and counts.shape == (4,)


def test_missing_extension_message_and_reference_fallback():
    # One fresh interpreter (importing torch takes seconds): sys.modules[name] = None makes
    # `import megamoe._C` raise ImportError, as if it were not built.
    code = """
import os, sys, warnings
sys.modules['megamoe._C'] = None
import torch
try:
    import megamoe.model.moe.dispatch
    raise SystemExit('imported without the extension')
except ImportError as e:
    assert 'make setup' in str(e) and 'megamoe._C' in str(e), str(e)
os.environ['MEGAMOE_ALLOW_REFERENCE_DISPATCH'] = '1'
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    from megamoe.model.moe import dispatch as D
assert not D.HAVE_EXTENSION and any('reference' in str(x.message) for x in w)
r = D.make_routing(torch.tensor([[0, 1], [1, 0]]), 2)
x = torch.randn(2, 3)
assert torch.allclose(D.combine(D.dispatch(x, r), r, torch.ones(2, 2), 0.5), x)
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "MEGAMOE_ALLOW_REFERENCE_DISPATCH"}
    env["PYTHONPATH"] = ROOT
    p = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout[-1000:] + p.stderr[-2000:]
