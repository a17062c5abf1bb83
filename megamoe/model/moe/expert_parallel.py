"""Expert-parallel token exchange: each token travels once to each rank that serves any of its experts.

T tokens on this rank, each routed to k of E experts; E/EP experts live on each of the EP ranks.
Sending one row per (token, expert), as a plain all-to-all of the dispatched buffer does, moves
T*k rows each way. A token whose k experts share a rank needs only one row to that rank, and the
rank can sum the token's local expert outputs before sending one row back. With uniform routing
this sends EP * (1 - C(E - E/EP, k) / C(E, k)) rows per token instead of k: 1.92 instead of 4 at
EP=2 (16 experts, top-4), 2.91 at EP=4 (benchmarks/ep_exchange.py).

Steps (``exchange``), all on the device except one host sync (the experts add none on the
grouped-GEMM path, bf16 on Hopper; their per-expert loop fallback reads its split sizes):

1. sender: ``rank_idx[t, r] = r`` if one of token t's experts lives on rank r, else -1. That is a
   routing over the EP ranks with dropped copies (dispatch.py), so the existing kernels put the
   rows into rank order.
2. one all_to_all of per-rank counts ([rows, token-expert copies]), then the only host sync of the
   layer (``.tolist()``) gives the split sizes of both all-to-alls and the receiver's buffer size.
3. rows, and beside them the token's k expert ids and gate scores (fp32 [rows, 2k], 32 bytes per
   row for k=4 against 8 KB of hidden state at d=4096 in bf16), all-to-all to their ranks.
4. receiver: ids of other ranks' experts become -1 (dropped), a routing over the local experts puts
   the kept copies into expert order, the experts run, and a weighted combine sums each token's
   local expert outputs (score * scale) into one row.
5. those rows all-to-all back (the splits reversed), and a plain combine over ranks sums each
   token's partial results.

Every step is differentiable (megatron-core's all_to_all sends gradients back the other way); the
gate scores get their gradient through the metadata's all-to-all. Sums: each rank's partial sum is
accumulated in fp32 and rounded to the activations' dtype before the sum over ranks, so fp32 results
equal the single-rank layer up to summation order and bf16 ones carry one more rounding.

Overlap (``chunks > 1``, parallel.set_overlap(ep_chunks=...)): the tokens are split into chunks
that go through steps 1-5 independently, with asynchronous all-to-alls, so that the expert GEMMs
of one chunk run while other chunks' rows travel (forward: chunk c+1's rows arrive and chunk
c-1's results leave during chunk c's experts; backward likewise, in the same order). One count
exchange and one host sync cover all chunks. Autograd would run the backward one chunk at a
time, each all-to-all waiting for the previous chunk's expert backward, so the chunked exchange is
one autograd Function whose backward issues the gradient all-to-alls itself and runs each chunk's
expert backward (a graph recorded in its forward) in between. The expert weights get their
gradients from those inner backward passes, one per chunk (megatron-core's DDP hooks count each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...parallel.mcore import all_to_all
from . import dispatch as _dispatch


@dataclass
class SendPlan:
    """Which ranks each token goes to, and how many rows and token-expert copies each rank gets."""

    rank_idx: torch.Tensor  # [T, EP]: r where token t goes to rank r, else -1
    counts: (
        torch.Tensor
    )  # [EP, 2] int64: rows (distinct tokens) and copies (token, expert) per rank


def plan_send(topk_idx: torch.Tensor, ep: int, num_local: int) -> SendPlan:
    """The send side of the exchange for ``topk_idx [T, k]`` (global expert ids); no host sync."""
    ranks = torch.arange(ep, device=topk_idx.device)
    hit = (topk_idx // num_local).unsqueeze(1) == ranks.view(
        1, ep, 1
    )  # [T, EP, k]: copy j goes to rank r
    on_rank = hit.any(2)  # [T, EP]
    rank_idx = torch.where(on_rank, ranks.view(1, ep), torch.full_like(ranks, -1).view(1, ep))
    counts = torch.stack([on_rank.sum(0), hit.sum((0, 2))], dim=1).to(torch.int64)
    return SendPlan(rank_idx, counts)


def exchange(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    scores: torch.Tensor | None,
    scale: float,
    experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    group,
    ep_rank: int,
    num_local: int,
    chunks: int = 1,
) -> torch.Tensor:
    """The MoE layer's dispatch -> experts -> combine across the expert-parallel ``group``.

    x [T, d]; topk_idx [T, k] global expert ids; scores [T, k] or None (plain sum, no scale);
    ``experts(rows, tokens_per_expert)`` runs this rank's ``num_local`` experts on expert-sorted
    rows. Returns [T, d], equal to the single-rank combine(experts(dispatch(x)), scores, scale).
    ``chunks > 1``: the overlapped exchange (module docstring), same results up to summation order.
    """
    if chunks > 1:
        _dispatch.check_topk_idx(topk_idx, torch.distributed.get_world_size(group) * num_local)
        dummy = (
            scores if scores is not None else x.new_zeros(0)
        )  # autograd needs a tensor in its place
        return _ChunkedExchange.apply(
            x,
            dummy,
            topk_idx,
            scores is not None,
            scale,
            experts,
            group,
            ep_rank,
            num_local,
            chunks,
        )
    ep = torch.distributed.get_world_size(group)
    k = topk_idx.shape[1]
    _dispatch.check_topk_idx(topk_idx, ep * num_local)  # ids outside [0, E) would be sent nowhere
    plan = plan_send(topk_idx, ep, num_local)
    recv_counts = torch.empty_like(plan.counts)
    torch.distributed.all_to_all_single(recv_counts, plan.counts, group=group)
    host = torch.cat([plan.counts, recv_counts]).tolist()  # the layer's one host sync
    send_splits = [rows for rows, _ in host[:ep]]
    recv_splits = [rows for rows, _ in host[ep:]]
    local_copies = sum(copies for _, copies in host[ep:])

    # 1-3: rows (once per token and rank) and their ids and scores to the ranks
    to_ranks = _dispatch.make_routing(plan.rank_idx, ep, num_rows=sum(send_splits))
    meta_dtype = (
        torch.float32 if scores is None else torch.promote_types(scores.dtype, torch.float32)
    )
    meta = topk_idx.to(meta_dtype)  # expert ids < 2**24: exact in fp32
    if scores is not None:
        meta = torch.cat([scores.to(meta_dtype), meta], dim=1)
    recv_x = all_to_all(group, _dispatch.dispatch(x, to_ranks), recv_splits, send_splits)
    recv_meta = all_to_all(group, _dispatch.dispatch(meta, to_ranks), recv_splits, send_splits)

    # 4: this rank's experts, each token's local outputs summed into one row
    local_idx = recv_meta[:, -k:].long() - ep_rank * num_local
    local_idx = local_idx.masked_fill((local_idx < 0) | (local_idx >= num_local), -1)
    local = _dispatch.make_routing(local_idx, num_local, num_rows=local_copies)
    out = experts(_dispatch.dispatch(recv_x, local), local.tokens_per_expert)
    recv_scores = recv_meta[:, :k] if scores is not None else None
    partial = _dispatch.combine(out, local, recv_scores, scale)

    # 5: back to the tokens' ranks, summed over ranks
    back = all_to_all(group, partial, send_splits, recv_splits)
    return _dispatch.combine(back, to_ranks, None)


def _a2a(out_rows: int, inp: torch.Tensor, out_splits, in_splits, group):
    """Asynchronous all_to_all_single of rows; returns (output, work)."""
    out = inp.new_empty(out_rows, *inp.shape[1:])
    work = torch.distributed.all_to_all_single(
        out, inp.contiguous(), out_splits, in_splits, group=group, async_op=True
    )
    return out, work


class _ChunkedExchange(torch.autograd.Function):
    """exchange() in token chunks with asynchronous all-to-alls (module docstring: Overlap)."""

    @staticmethod
    def forward(
        ctx, x, scores, topk_idx, weighted, scale, experts, group, ep_rank, num_local, chunks
    ):
        ep = torch.distributed.get_world_size(group)
        T, k = topk_idx.shape
        bounds = [T * c // chunks for c in range(chunks + 1)]
        idx_c = [topk_idx[a:b] for a, b in zip(bounds, bounds[1:])]
        plans = [plan_send(i, ep, num_local) for i in idx_c]
        counts = torch.stack(
            [p.counts for p in plans], dim=1
        )  # [EP, chunks, 2]: per destination rank
        recv = torch.empty_like(counts)
        torch.distributed.all_to_all_single(recv, counts, group=group)
        host = torch.stack([counts, recv]).tolist()  # the layer's one host sync
        send_splits = [[host[0][r][c][0] for r in range(ep)] for c in range(chunks)]
        recv_splits = [[host[1][r][c][0] for r in range(ep)] for c in range(chunks)]
        local_copies = [sum(host[1][r][c][1] for r in range(ep)) for c in range(chunks)]

        meta_dtype = torch.promote_types(scores.dtype, torch.float32) if weighted else torch.float32
        meta = topk_idx.to(meta_dtype)  # expert ids < 2**24: exact in fp32
        if weighted:
            meta = torch.cat([scores.detach().to(meta_dtype), meta], dim=1)
        to_ranks, sent = [], []
        for c, (a, b) in enumerate(zip(bounds, bounds[1:])):  # 1-3, every chunk's rows on their way
            rt = _dispatch.make_routing(plans[c].rank_idx, ep, num_rows=sum(send_splits[c]))
            to_ranks.append(rt)
            rx = _a2a(
                sum(recv_splits[c]),
                _dispatch.dispatch(x[a:b], rt),
                recv_splits[c],
                send_splits[c],
                group,
            )
            rm = _a2a(
                sum(recv_splits[c]),
                _dispatch.dispatch(meta[a:b], rt),
                recv_splits[c],
                send_splits[c],
                group,
            )
            sent.append((rx, rm))
        graphs, back = [], []
        for c in range(chunks):  # 4-5: experts of chunk c while the other chunks travel
            (rx, wx), (rm, wm) = sent[c]
            wx.wait()
            wm.wait()
            local_idx = rm[:, -k:].long() - ep_rank * num_local
            local_idx = local_idx.masked_fill((local_idx < 0) | (local_idx >= num_local), -1)
            local = _dispatch.make_routing(local_idx, num_local, num_rows=local_copies[c])
            with torch.enable_grad():
                rows = rx.detach().requires_grad_(x.requires_grad)
                rs = (
                    rm[:, :k].detach().requires_grad_(weighted and scores.requires_grad)
                    if weighted
                    else None
                )
                out = experts(_dispatch.dispatch(rows, local), local.tokens_per_expert)
                partial = _dispatch.combine(out, local, rs, scale)
            graphs.append((rows, rs, partial))
            back.append(
                _a2a(sum(send_splits[c]), partial.detach(), send_splits[c], recv_splits[c], group)
            )
        ys = []
        for c in range(chunks):
            rows_back, w = back[c]
            w.wait()
            ys.append(_dispatch.combine(rows_back, to_ranks[c], None))
        ctx.state = (group, bounds, to_ranks, send_splits, recv_splits, graphs, weighted, k)
        return torch.cat(ys) if ys else x.new_zeros(0, x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        group, bounds, to_ranks, send_splits, recv_splits, graphs, weighted, k = ctx.state
        del ctx.state
        chunks = len(graphs)
        grad_y = grad_y.contiguous()
        incoming = []
        for c, (a, b) in enumerate(
            zip(bounds, bounds[1:])
        ):  # every chunk's output gradient on its way
            incoming.append(
                _a2a(
                    sum(recv_splits[c]),
                    _dispatch.dispatch(grad_y[a:b], to_ranks[c]),
                    recv_splits[c],
                    send_splits[c],
                    group,
                )
            )
        returning = []
        for c in range(chunks):  # each chunk's expert backward while the others travel
            grad_partial, w = incoming[c]
            w.wait()
            rows, rs, partial = graphs[c]
            graphs[c] = None
            if partial.requires_grad:
                with torch.enable_grad():
                    torch.autograd.backward(
                        partial, grad_partial
                    )  # weights: into their .grad / DDP hooks
            grad_rows = rows.grad if rows.grad is not None else torch.zeros_like(rows)
            gx = _a2a(sum(send_splits[c]), grad_rows, send_splits[c], recv_splits[c], group)
            gs = None
            if rs is not None and rs.requires_grad:
                grad_rs = rs.grad if rs.grad is not None else torch.zeros_like(rs)
                gs = _a2a(sum(send_splits[c]), grad_rs, send_splits[c], recv_splits[c], group)
            returning.append((gx, gs))
        grad_x, grad_scores = [], []
        for c in range(chunks):
            (gx, wx), gs = returning[c]
            wx.wait()
            grad_x.append(_dispatch.combine(gx, to_ranks[c], None))
            if gs is not None:
                gs[1].wait()
                grad_scores.append(_dispatch.combine(gs[0], to_ranks[c], None))
        gx_all = torch.cat(grad_x) if ctx.needs_input_grad[0] else None
        gs_all = torch.cat(grad_scores) if grad_scores and ctx.needs_input_grad[1] else None
        return gx_all, gs_all, None, None, None, None, None, None, None, None
