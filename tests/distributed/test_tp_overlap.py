"""The overlapped sequence-parallel linears (megamoe/parallel/tp_overlap.py) over real gloo
processes: forward and backward equal the plain all-gather -> GEMM and GEMM -> reduce-scatter
(fresh random fp32 inputs, 2 and 3 ranks: with 3, the middle rank's other blocks are not
contiguous)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import launch
from tests.helpers import rel_err

S_LOCAL, B, H, OUT = 5, 3, 16, 12


def _case(tp, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(S_LOCAL, B, H, generator=g) for _ in range(tp)]  # every rank's sequence shard
    w_col = [
        torch.randn(OUT, H, generator=g) for _ in range(tp)
    ]  # column-parallel: out features sharded
    b_col = [torch.randn(OUT, generator=g) for _ in range(tp)]
    x_row = [
        torch.randn(S_LOCAL * tp, B, H, generator=g) for _ in range(tp)
    ]  # row-parallel: in features sharded
    w_row = [torch.randn(OUT, H, generator=g) for _ in range(tp)]
    g_col = [torch.randn(S_LOCAL * tp, B, OUT, generator=g) for _ in range(tp)]
    g_row = [torch.randn(S_LOCAL, B, OUT, generator=g) for _ in range(tp)]
    return xs, w_col, b_col, x_row, w_row, g_col, g_row


def _rank_run():
    from megamoe.parallel.tp_overlap import AllGatherMatmul, MatmulReduceScatter

    torch.distributed.init_process_group("gloo")
    r, tp = torch.distributed.get_rank(), torch.distributed.get_world_size()
    xs, w_col, b_col, x_row, w_row, g_col, g_row = _case(tp, 0)
    group = torch.distributed.group.WORLD
    x, w, b = (t[r].clone().requires_grad_() for t in (xs, w_col, b_col))
    y = AllGatherMatmul.apply(x, w, b, group)
    y.backward(g_col[r])
    col = [t.detach() for t in (y, x.grad, w.grad, b.grad)]
    x, w = (t[r].clone().requires_grad_() for t in (x_row, w_row))
    y = MatmulReduceScatter.apply(x, w, group)
    y.backward(g_row[r])
    row = [t.detach() for t in (y, x.grad, w.grad)]
    torch.distributed.destroy_process_group()
    return col, row


def _reference(tp, r):
    """The same maths without collectives, on the whole sequence."""
    xs, w_col, b_col, x_row, w_row, g_col, g_row = _case(tp, 0)
    x_full = torch.cat(xs)  # the gathered sequence
    w, b = w_col[r].clone().requires_grad_(), b_col[r].clone().requires_grad_()
    y = x_full @ w.t() + b  # this rank's output columns
    gw, gb = torch.autograd.grad(y, (w, b), g_col[r])
    # the input gradient sums every rank's columns; this rank keeps its sequence block
    total = sum(g_col[q] @ w_col[q] for q in range(tp))
    col = [y.detach(), total[r * S_LOCAL : (r + 1) * S_LOCAL], gw, gb]
    # row-parallel: y = reduce_scatter(sum_q x_q @ w_q.T); rank r keeps its sequence block
    partial = sum(x_row[q] @ w_row[q].t() for q in range(tp))
    y_row = partial[r * S_LOCAL : (r + 1) * S_LOCAL]
    g_full = torch.cat(g_row)  # every rank's output gradient, gathered
    row = [y_row, g_full @ w_row[r], g_full.reshape(-1, OUT).t() @ x_row[r].reshape(-1, H)]
    return col, row


@pytest.mark.parametrize("tp", [2, 3])
def test_overlapped_linears_match_the_plain_collectives(tp):
    results = launch.run(_rank_run, tp)
    for r, (col, row) in enumerate(results):
        ref_col, ref_row = _reference(tp, r)
        errs = [rel_err(a, b) for a, b in zip(col + row, ref_col + ref_row)]
        print(
            f"tp={tp} rank {r}: column y, gx, gw, gb / row y, gx, gw: "
            + ", ".join(f"{e:.1e}" for e in errs)
        )
        assert all(e < 1e-6 for e in errs), errs
