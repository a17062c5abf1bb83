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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...parallel.mcore import all_to_all
from . import dispatch as _dispatch


@dataclass
class SendPlan:
    """Which ranks each token goes to, and how many rows and token-expert copies each rank gets."""

    rank_idx: torch.Tensor  # [T, EP]: r where token t goes to rank r, else -1
    counts: torch.Tensor  # [EP, 2] int64: rows (distinct tokens) and copies (token, expert) per rank


def plan_send(topk_idx: torch.Tensor, ep: int, num_local: int) -> SendPlan:
    """The send side of the exchange for ``topk_idx [T, k]`` (global expert ids); no host sync."""
    ranks = torch.arange(ep, device=topk_idx.device)
    hit = (topk_idx // num_local).unsqueeze(1) == ranks.view(1, ep, 1)  # [T, EP, k]: copy j goes to rank r
    on_rank = hit.any(2)  # [T, EP]
    rank_idx = torch.where(on_rank, ranks.view(1, ep), torch.full_like(ranks, -1).view(1, ep))
    counts = torch.stack([on_rank.sum(0), hit.sum((0, 2))], dim=1).to(torch.int64)
    return SendPlan(rank_idx, counts)


def exchange(x: torch.Tensor, topk_idx: torch.Tensor, scores: Optional[torch.Tensor], scale: float,
             experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group, ep_rank: int,
             num_local: int) -> torch.Tensor:
    """The MoE layer's dispatch -> experts -> combine across the expert-parallel ``group``.

    x [T, d]; topk_idx [T, k] global expert ids; scores [T, k] or None (plain sum, no scale);
    ``experts(rows, tokens_per_expert)`` runs this rank's ``num_local`` experts on expert-sorted
    rows. Returns [T, d], equal to the single-rank combine(experts(dispatch(x)), scores, scale).
    """
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
    meta_dtype = torch.float32 if scores is None else torch.promote_types(scores.dtype, torch.float32)
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
