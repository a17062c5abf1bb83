"""Tensor parallelism with sequence parallelism, its collectives overlapped with the GEMMs.

With sequence parallelism a column-parallel linear all-gathers its input along the sequence before
its GEMM, and a row-parallel linear reduce-scatters its output after it; megatron-core overlaps
these only through Transformer Engine, which we do not have, so at hidden 4096 they stood
exposed in every attention block (forward and backward). Here each rank splits the GEMM by the
row blocks that the collective moves (one block of s/TP * b rows per TP rank):

- all-gather -> GEMM (column-parallel forward, row-parallel backward): start the all-gather
  asynchronously, multiply the rank's own block (which needs nothing from the others) while it
  travels, then the other blocks.
- GEMM -> reduce-scatter (row-parallel forward, column-parallel backward): multiply the blocks
  the other ranks own first and send them with an asynchronous all-to-all, then multiply the own
  block while they travel, and add what arrives.

The column-parallel backward also re-gathers its input for the weight gradient (as megatron-core
does, to keep only the shard as activation), overlapped with the input-gradient GEMMs. The GEMMs
are the same as megatron-core's, split by rows, and the reduction adds the same partial sums
(with TP=2, a + b, which is commutative: the result is megatron-core's to the rounding of the
split GEMMs). Used when parallel.set_overlap(tp_comm=True); the linears below fall back to
megatron-core's path otherwise (or without sequence parallelism, or with a frozen weight).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mcore import ColumnParallelLinear, RowParallelLinear


def _blocks(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _others(tp: int, r: int, n: int):
    """Row ranges [(a, b)] of the other ranks' blocks, merged where contiguous (at most two)."""
    return [(a, b) for a, b in ((0, r * n), ((r + 1) * n, tp * n)) if b > a]


def _other_rows(t: torch.Tensor, tp: int, r: int, n: int) -> torch.Tensor:
    """The other ranks' row blocks of t, in rank order (a view when they are contiguous)."""
    parts = [t[a:b] for a, b in _others(tp, r, n)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _exchange_partials(parts: torch.Tensor, tp: int, r: int, n: int, group):
    """Asynchronously send rows [q*n, (q+1)*n) of ``parts`` (the other blocks only, in rank order,
    own block left out) to rank q; returns (received [(tp-1)*n, cols], work)."""
    splits = [0 if q == r else n for q in range(tp)]
    recv = parts.new_empty((tp - 1) * n, parts.shape[1])
    work = dist.all_to_all_single(recv, parts, splits, splits, group=group, async_op=True)
    return recv, work


def _sum_into(local: torch.Tensor, recv: torch.Tensor, tp: int, n: int) -> torch.Tensor:
    """local + the partial sums the other ranks computed for this block, in rank order."""
    for q in range(tp - 1):
        local = local + recv[q * n : (q + 1) * n]
    return local


class AllGatherMatmul(torch.autograd.Function):
    """y = all_gather_seq(x) @ w.T (+ b): x [s/TP, b, h] -> y [s, b, out/TP]."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        tp, r = _blocks(group)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        n = x2.shape[0]
        full = x2.new_empty(tp * n, x2.shape[1])
        work = dist.all_gather_into_tensor(full, x2, group=group, async_op=True)
        out = x2.new_empty(tp * n, weight.shape[0])
        torch.mm(x2, weight.t(), out=out[r * n : (r + 1) * n])  # while the other blocks travel
        work.wait()
        for a, b in _others(tp, r, n):
            torch.mm(full[a:b], weight.t(), out=out[a:b])
        if bias is not None:
            out += bias
        ctx.save_for_backward(x2, weight)
        ctx.group, ctx.has_bias, ctx.x_shape = group, bias is not None, x.shape
        return out.view(tp * x.shape[0], *x.shape[1:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x2, weight = ctx.saved_tensors
        group = ctx.group
        tp, r = _blocks(group)
        n = x2.shape[0]
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        full = x2.new_empty(tp * n, x2.shape[1])  # the input again, for the weight gradient
        work_x = dist.all_gather_into_tensor(full, x2, group=group, async_op=True)
        others = _other_rows(g, tp, r, n) @ weight
        recv, work = _exchange_partials(others, tp, r, n, group)
        grad_x = _sum_into(g[r * n : (r + 1) * n] @ weight, _wait(recv, work), tp, n)
        work_x.wait()
        grad_w = g.t() @ full
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x.view(ctx.x_shape), grad_w, grad_b, None


class MatmulReduceScatter(torch.autograd.Function):
    """y = reduce_scatter_seq(x @ w.T): x [s, b, in/TP] -> y [s/TP, b, out]."""

    @staticmethod
    def forward(ctx, x, weight, group):
        tp, r = _blocks(group)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        n = x2.shape[0] // tp
        others = _other_rows(x2, tp, r, n) @ weight.t()
        recv, work = _exchange_partials(others, tp, r, n, group)
        y = _sum_into(x2[r * n : (r + 1) * n] @ weight.t(), _wait(recv, work), tp, n)
        ctx.save_for_backward(x2, weight)
        ctx.group, ctx.x_shape = group, x.shape
        return y.view(x.shape[0] // tp, *x.shape[1:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        tp, r = _blocks(ctx.group)
        g = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        n = g.shape[0]
        full = g.new_empty(tp * n, g.shape[1])
        work = dist.all_gather_into_tensor(full, g, group=ctx.group, async_op=True)
        grad_x = x2.new_empty(tp * n, weight.shape[1])
        torch.mm(g, weight, out=grad_x[r * n : (r + 1) * n])  # while the other blocks travel
        work.wait()
        for a, b in _others(tp, r, n):
            torch.mm(full[a:b], weight, out=grad_x[a:b])
        grad_w = full.t() @ x2
        return grad_x.view(ctx.x_shape), grad_w, None


def _wait(t, work):
    work.wait()
    return t


def _overlap_on(layer, weight) -> bool:
    from . import tp_comm_overlap

    return (
        tp_comm_overlap()
        and layer.sequence_parallel
        and weight.requires_grad
        and dist.get_world_size(layer.tp_group) > 1
    )


class OverlappedColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear; with the TP overlap on, its all-gather + GEMM is
    AllGatherMatmul."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if (
            _overlap_on(self, weight)
            and not kwargs.get("gradient_accumulation_fusion")
            and kwargs.get("sequence_parallel")
        ):
            return AllGatherMatmul.apply(input, weight, kwargs.get("bias"), self.tp_group)
        return super()._forward_impl(input, weight, *args, **kwargs)


class OverlappedRowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear; with the TP overlap on, its GEMM + reduce-scatter is
    MatmulReduceScatter."""

    def forward(self, input_):
        if not (
            _overlap_on(self, self.weight)
            and self.input_is_parallel
            and not self.explicit_expert_comm
            and not self.gradient_accumulation_fusion
        ):
            return super().forward(input_)
        output_ = MatmulReduceScatter.apply(input_, self.weight, self.tp_group)
        if not self.skip_bias_add:
            return (output_ + self.bias) if self.bias is not None else output_, None
        return output_, self.bias
