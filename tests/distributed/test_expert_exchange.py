"""The expert-parallel exchange (megamoe/model/moe/expert_parallel.py) over real gloo processes.

EP ranks each hold E/EP experts; the exchange must give every rank the same output and the same
gradients of x and the gate scores as the single-rank dispatch -> experts -> combine, while sending
one row per (token, destination rank) rather than one per (token, expert).
"""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.model.moe import dispatch as D
from megamoe.model.moe.expert_parallel import plan_send
from tests.distributed import launch
from tests.helpers import rel_err
from tests.unit.test_dispatch import random_topk

E, D_MODEL, K = 8, 24, 3


def expert_weights(dtype):
    g = torch.Generator().manual_seed(11)
    return torch.randn(E, D_MODEL, D_MODEL, generator=g).to(dtype) / math.sqrt(D_MODEL)


def make_experts(weights):
    """experts(rows, tokens_per_expert): a linear map per expert (weights: this rank's experts)."""

    def run(rows, tokens_per_expert):
        chunks = rows.split(tokens_per_expert.tolist())
        return torch.cat([c @ w for c, w in zip(chunks, weights)] + [rows[:0]])

    return run


def rank_inputs(rank, T, dtype, weighted):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D_MODEL, generator=g).to(dtype).requires_grad_()
    scores = torch.rand(T, K, generator=g).requires_grad_() if weighted else None
    idx = random_topk(T, K, E, seed=rank)
    grad_out = torch.randn(T, D_MODEL, generator=g).to(dtype)
    return x, scores, idx, grad_out


def single_rank(x, scores, idx, grad_out, weights, scale):
    routing = D.make_routing(idx, E)
    y = D.combine(
        make_experts(weights)(D.dispatch(x, routing), routing.tokens_per_expert),
        routing,
        scores,
        scale,
    )
    inputs = (x,) if scores is None else (x, scores)
    return (y, *torch.autograd.grad(y, inputs, grad_out))


CASES = [  # (T, dtype, weighted): fp32 and bf16, LLaMA-MoE's multiply_gate_scores on and off, no tokens
    (40, torch.float32, True),
    (40, torch.float32, False),
    (40, torch.bfloat16, True),
    (0, torch.float32, True),
]
SCALE = 0.7


def _run_exchange(cases):
    """One rank: every case through exchange(); returns (y, grads..., rows sent) per case."""
    from megamoe.model.moe.expert_parallel import exchange

    torch.distributed.init_process_group("gloo")
    rank, ep = torch.distributed.get_rank(), torch.distributed.get_world_size()
    n_local = E // ep
    out = []
    for T, dtype, weighted in cases:
        weights = expert_weights(dtype)
        x, scores, idx, grad_out = rank_inputs(rank, T, dtype, weighted)
        local = make_experts(weights[rank * n_local : (rank + 1) * n_local])
        y = exchange(x, idx, scores, SCALE, local, torch.distributed.group.WORLD, rank, n_local)
        inputs = (x,) if scores is None else (x, scores)
        grads = torch.autograd.grad(y, inputs, grad_out)
        out.append(
            ([t.detach() for t in (y, *grads)], int(plan_send(idx, ep, n_local).counts[:, 0].sum()))
        )
    torch.distributed.destroy_process_group()
    return out


@pytest.mark.parametrize("ep", [2, 4])
def test_exchange_matches_single_rank(ep):
    results = launch.run(_run_exchange, ep, CASES)
    for rank, per_case in enumerate(results):
        for (T, dtype, weighted), (got, sent) in zip(CASES, per_case):
            x, scores, idx, grad_out = rank_inputs(rank, T, dtype, weighted)
            want = single_rank(x, scores, idx, grad_out, expert_weights(dtype), SCALE)
            errs = [rel_err(a, b.detach()) for a, b in zip(got, want)]
            print(
                f"ep={ep} rank {rank} T={T} {dtype} weighted={weighted}: rel err y, grad_x(, grad_scores) "
                + ", ".join(f"{e:.1e}" for e in errs)
                + f"; rows sent {sent} vs {T * K} token-expert copies"
            )
            tol = (
                1e-6 if dtype == torch.float32 else 1.5e-2
            )  # bf16: each rank's partial sum is rounded once more
            assert all(e <= tol for e in errs), errs
            assert sent < T * K or T == 0  # tokens with two experts on one rank travel once


@pytest.mark.parametrize("ep,n_local", [(2, 4), (4, 2), (8, 1)])
def test_plan_send_matches_a_loop(ep, n_local):
    idx = random_topk(50, 3, ep * n_local, seed=ep)
    plan = plan_send(idx, ep, n_local)
    for t in range(idx.shape[0]):
        ranks = {int(e) // n_local for e in idx[t]}
        assert plan.rank_idx[t].tolist() == [r if r in ranks else -1 for r in range(ep)]
    for r in range(ep):
        assert plan.counts[r, 0] == sum(r in {int(e) // n_local for e in row} for row in idx)
        assert plan.counts[r, 1] == sum(int(e) // n_local == r for e in idx.reshape(-1))


def test_rows_sent_match_the_uniform_routing_formula():
    """Per token, EP*(1 - C(E-E/EP, k)/C(E, k)) rows instead of k (LLaMA-MoE-3.5B: 16 experts, top-4)."""
    for ep, want in ((2, 1.923), (4, 2.912)):
        idx = random_topk(20000, 4, 16, seed=ep)
        rows = plan_send(idx, ep, 16 // ep).counts[:, 0].sum().item() / idx.shape[0]
        formula = ep * (1 - math.comb(16 - 16 // ep, 4) / math.comb(16, 4))
        assert abs(formula - want) < 1e-3 and abs(rows - formula) < 0.02, (ep, rows, formula)


def _run_chunked(ep_cases):
    """One rank: exchange() with chunks = 1, 2, 3 and trainable expert weights; returns, per case,
    (y, grad x, grad scores, grad of this rank's expert weights)."""
    from megamoe.model.moe.expert_parallel import exchange

    torch.distributed.init_process_group("gloo")
    rank, ep = torch.distributed.get_rank(), torch.distributed.get_world_size()
    n_local = E // ep
    out = []
    for chunks, (T, dtype, weighted) in ep_cases:
        weights = (
            expert_weights(dtype)[rank * n_local : (rank + 1) * n_local].clone().requires_grad_()
        )
        x, scores, idx, grad_out = rank_inputs(rank, T, dtype, weighted)
        y = exchange(
            x,
            idx,
            scores,
            SCALE,
            make_experts(weights),
            torch.distributed.group.WORLD,
            rank,
            n_local,
            chunks=chunks,
        )
        y.backward(grad_out)
        grads = [x.grad] + ([scores.grad] if weighted else [])
        out.append([t.detach().clone() for t in (y, *grads, weights.grad)])
    torch.distributed.destroy_process_group()
    return out


CHUNKED = [
    (c, case)
    for c in (1, 2, 3)
    for case in [
        (40, torch.float32, True),
        (40, torch.float32, False),
        (5, torch.float32, True),
        (0, torch.float32, True),
    ]
]


@pytest.mark.parametrize("ep", [2, 4])
def test_chunked_exchange_matches_single_rank(ep):
    """The overlapped exchange (token chunks, asynchronous all-to-alls, its own backward) gives the
    single-rank outputs and gradients, the expert weights' included (fp32; also chunks with no
    tokens: T=5 in 3 chunks at EP=4, T=0)."""
    results = launch.run(_run_chunked, ep, CHUNKED)
    weight_grads = {}
    for rank, per_case in enumerate(results):
        for (chunks, (T, dtype, weighted)), got in zip(CHUNKED, per_case):
            x, scores, idx, grad_out = rank_inputs(rank, T, dtype, weighted)
            want = single_rank(x, scores, idx, grad_out, expert_weights(dtype), SCALE)
            errs = [rel_err(a, b.detach()) for a, b in zip(got[:-1], want)]
            print(
                f"ep={ep} chunks={chunks} rank {rank} T={T} weighted={weighted}: rel err y, grad_x(, grad_scores) "
                + ", ".join(f"{e:.1e}" for e in errs)
            )
            assert all(e <= 1e-6 for e in errs), errs
            weight_grads.setdefault((chunks, T, weighted), []).append(got[-1])
    # expert weights: the gradient over every rank's tokens, each rank holding its slice
    for (chunks, T, weighted), per_rank in weight_grads.items():
        w = expert_weights(torch.float32).requires_grad_()
        total = torch.zeros_like(w)
        for rank in range(ep):
            x, scores, idx, grad_out = rank_inputs(rank, T, torch.float32, weighted)
            routing = D.make_routing(idx, E)
            y = D.combine(
                make_experts(w)(D.dispatch(x, routing), routing.tokens_per_expert),
                routing,
                scores,
                SCALE,
            )
            total += torch.autograd.grad(y, w, grad_out, allow_unused=True)[0] if T else 0
        got = torch.cat(per_rank)
        err = rel_err(got, total) if T else got.abs().max().item()
        print(
            f"ep={ep} chunks={chunks} T={T} weighted={weighted}: expert weight grad rel err {err:.1e}"
        )
        assert err <= 1e-6, err
