"""What the expert-parallel exchange sends, and what its extra local work costs on one GPU.

    python benchmarks/ep_exchange.py            # table 1 anywhere; table 2 on a CUDA device

Table 1 (any machine): rows sent per token and per direction by the all-to-all, one per
(token, expert) as before against one per (token, destination rank) now
(megamoe/model/moe/expert_parallel.py), for LLaMA-MoE's 16 experts, top-2 and top-4, EP = 2, 4, 8,
with routing drawn uniformly (what the balance loss aims at), and the bytes per token and direction
at d=4096 in bf16 including the 32-byte metadata row that travels along.

Table 2 (CUDA): forward+backward of one MoE FFN (LLaMA-MoE-3.5B: d=4096, 16 experts of 688
neurons, bf16) through the plain single-GPU path and through exchange() in a world of one rank
(NCCL), so the difference is the exchange's own local work: the send plan, two routings, the
extra permute/combine pair, the count all-to-all and its host sync, and the all-to-all's copies
(local at one rank). "before" is the previous exchange, one row per (token, expert): dispatch,
all-to-all, regroup by expert, experts, regroup back, all-to-all, combine (per_copy_exchange
below, kept here for this comparison). "2 chunks" is the overlapped exchange (exchange(chunks=2)):
its local work alone, the price it pays for overlapping the all-to-alls with the expert GEMMs.
It excludes the network time, which needs several GPUs (benchmarks/scaling.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows_table(tokens: int, hidden: int) -> None:
    from megamoe.model.moe.expert_parallel import plan_send

    E, esize = 16, 2
    print(
        f"# rows per token and direction, {tokens} tokens routed uniformly, {E} experts; "
        f"KB per token at d={hidden} bf16 (+ {8}k-byte metadata now)"
    )
    header = f"{'k':>3}{'EP':>4}{'before':>8}{'now':>7}{'formula':>9}{'KB before':>11}{'KB now':>8}{'saved':>7}"
    print(header)
    print("-" * len(header))
    for k in (2, 4):
        for ep in (2, 4, 8):
            g = torch.Generator().manual_seed(ep * 10 + k)
            idx = torch.rand(tokens, E, generator=g).argsort(dim=1)[:, :k]
            now = plan_send(idx, ep, E // ep).counts[:, 0].sum().item() / tokens
            formula = ep * (1 - math.comb(E - E // ep, k) / math.comb(E, k))
            kb_before = k * hidden * esize / 1024
            kb_now = now * (hidden * esize + 8 * k) / 1024
            print(
                f"{k:>3}{ep:>4}{k:>8}{now:>7.2f}{formula:>9.2f}{kb_before:>11.1f}{kb_now:>8.1f}"
                f"{1 - kb_now / kb_before:>7.0%}"
            )


def per_copy_exchange(x, idx, scores, scale, experts, group, num_experts):
    """The previous EP path (git history of layer.py), one row per (token, expert)."""
    from megamoe.model.moe import dispatch as D
    from megamoe.parallel.mcore import all_to_all

    ep = torch.distributed.get_world_size(group)
    n_local = num_experts // ep
    routing = D.make_routing(idx, num_experts)
    rows = D.dispatch(x, routing)
    counts = routing.tokens_per_expert.view(ep, n_local)
    recv_counts = torch.empty_like(counts)
    torch.distributed.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.sum(1).tolist()
    recv = recv_counts.tolist()
    recv_splits = [sum(c) for c in recv]
    received = all_to_all(group, rows, recv_splits, send_splits)
    sizes = [recv[r][j] for r in range(ep) for j in range(n_local)]
    order = [r * n_local + j for j in range(n_local) for r in range(ep)]
    chunks = received.split(sizes)
    per_expert = torch.tensor(
        [sum(recv[r][j] for r in range(ep)) for j in range(n_local)], device=x.device
    )
    out = experts(torch.cat([chunks[i] for i in order]), per_expert)
    back = out.split([sizes[i] for i in order])
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    out_by_source = torch.cat([back[inverse[i]] for i in range(len(order))])
    return D.combine(
        all_to_all(group, out_by_source, send_splits, recv_splits), routing, scores, scale
    )


def local_cost_table(tokens_list, topk_list, hidden: int) -> None:
    from benchmarks.moe_layer import timed
    from megamoe.model.moe import dispatch as D
    from megamoe.model.moe.expert_parallel import exchange
    from megamoe.model.moe.experts import GroupedSwiGLUExperts

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group(
        "nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    group = torch.distributed.group.WORLD
    E, size, dev, dt = 16, 688, "cuda", torch.bfloat16
    experts = GroupedSwiGLUExperts(hidden, [size] * E, dtype=dt, device=dev)
    print(
        f"\n# one MoE FFN fwd+bwd, d={hidden}, {E} experts x {size}, bf16, {torch.cuda.get_device_name()}; "
        "exchange() in a world of one rank"
    )
    header = (
        f"{'T':>6}{'k':>3}{'plain ms':>10}{'before ms':>11}{'extra':>7}{'now ms':>8}{'extra':>7}"
        f"{'2 chunks':>9}{'extra':>7}"
    )
    print(header)
    print("-" * len(header))
    for T in tokens_list:
        for k in topk_list:
            torch.manual_seed(0)
            idx = torch.rand(T, E, device=dev).argsort(dim=1)[:, :k]
            x = torch.randn(T, hidden, device=dev, dtype=dt, requires_grad=True)
            scores = torch.rand(T, k, device=dev, requires_grad=True)
            g = torch.randn(T, hidden, device=dev, dtype=dt)

            def plain():
                r = D.make_routing(idx, E)
                y = D.combine(experts(D.dispatch(x, r), r.tokens_per_expert), r, scores, 1.0)
                y.backward(g)

            def exchanged():
                exchange(x, idx, scores, 1.0, experts, group, 0, E).backward(g)

            def before():
                per_copy_exchange(x, idx, scores, 1.0, experts, group, E).backward(g)

            def chunked():  # the overlapped exchange's local work (nothing to overlap in one rank)
                exchange(x, idx, scores, 1.0, experts, group, 0, E, chunks=2).backward(g)

            a, b, c, d = timed(plain), timed(before), timed(exchanged), timed(chunked)
            print(
                f"{T:>6}{k:>3}{a:>10.3f}{b:>11.3f}{(b - a) / a:>7.0%}{c:>8.3f}{(c - a) / a:>7.0%}"
                f"{d:>9.3f}{(d - a) / a:>7.0%}"
            )
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hidden", type=int, default=4096)
    args = ap.parse_args()
    rows_table(100_000, args.hidden)
    if torch.cuda.is_available():
        local_cost_table(args.tokens, args.topk, args.hidden)
    else:
        print("\n# no CUDA device: the local-cost table needs one")


if __name__ == "__main__":
    main()
