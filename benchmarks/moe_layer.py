"""MoE FFN layer forward+backward at LLaMA-MoE shapes vs dense SwiGLU MLPs (run on a GPU).

    python benchmarks/moe_layer.py [--tokens 4096 8192 16384] [--topk 2 4]

Compares megamoe's LlamaMoEMLP (gate -> dispatch -> grouped experts -> combine) with (a) a dense
SwiGLU MLP of the same active width (k * d_ff / E) and (b) the full-width dense MLP (d_ff), bf16.
TFLOP/s counts the expert matmuls only (6 * tokens * k * 3 * d * size, fwd+bwd). "moe ms" is the
layer as trained on CUDA (small elementwise parts through torch.compile, model/moe/fusion.py),
"eager ms" the same layer with MEGAMOE_COMPILE=0. "graphed" columns replay forward and backward
from CUDA graphs (the GPU's own time, without host launch overhead), for the MoE layer and the
dense active-width MLP. Gradients are fresh each step in every column.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


class _Graphable(torch.nn.Module):
    def __init__(self, fn, params):
        super().__init__()
        self.fn = fn
        self.params = torch.nn.ParameterList(params)  # so make_graphed_callables sees them

    def forward(self, inp):
        return self.fn(inp)


def graphed_ms(fn, params, x, g):
    """fwd+bwd replayed from CUDA graphs (torch.cuda.make_graphed_callables): the GPU's time
    without the host's launch overhead. NaN if capture fails."""
    try:
        mod = _Graphable(fn, params)
        xg = x.detach().clone().requires_grad_()
        # allow_unused_input: capture stopped on "a differentiated tensor not used in the graph"
        # (session 3); say which, from one eager pass
        grads = torch.autograd.grad(mod(xg), (xg, *params), g, allow_unused=True)
        unused = [i for i, t in enumerate(grads) if t is None]
        if unused:
            print(
                f"# graphed: no gradient for inputs {unused} (0 = x, i = params[i-1] of {len(params)})"
            )
        graphed = torch.cuda.make_graphed_callables(
            mod, (xg,), num_warmup_iters=3, allow_unused_input=True
        )

        def step():
            xg.grad = None
            for p in params:
                p.grad = None
            graphed(xg).backward(g)

        return timed(step)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"# CUDA-graph capture failed: {str(e).splitlines()[0][:200]}")
        return float("nan")


def dense_mlp(d, width, dev):
    w = [
        torch.randn(width, d, device=dev, dtype=torch.bfloat16, requires_grad=True) * 0.02
        for _ in range(2)
    ]
    w.append(torch.randn(d, width, device=dev, dtype=torch.bfloat16, requires_grad=True) * 0.02)
    w = [t.detach().requires_grad_() for t in w]

    def run(x):
        return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])

    run.weights = w
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table (8192 tokens, top-4)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe_layer.py needs a CUDA GPU")
    from megamoe import parallel
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model.llama import transformer_config
    from megamoe.model.moe.layer import LlamaMoEMLP

    parallel.initialize(parallel.ParallelLayout(), seed=0)
    d, ffn, e = args.hidden, args.ffn, args.experts
    mc = ModelConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=1)
    cfg = transformer_config(mc, parallel.ParallelLayout(), torch.bfloat16)
    print(
        f"# {torch.cuda.get_device_name()} torch {torch.__version__}; hidden {d}, "
        f"{e} experts x {ffn // e}, bf16, fwd+bwd"
    )
    print(
        f"{'tokens':>7} {'k':>2} {'moe ms':>8} {'eager ms':>9} {'TFLOP/s':>8} {'dense(active) ms':>17} "
        f"{'ratio':>6} {'dense(full) ms':>15} {'graphed moe':>11} {'graphed active':>14} {'g. ratio':>9}"
    )
    if args.profile:
        for t in args.tokens:
            for k in args.topk:
                print(f"## profile: {t} tokens, top-{k}")
                profile(cfg, d, ffn, e, t, k)
        return
    for k in args.topk:
        moe = MoEConfig(num_experts=e, num_selects=k)
        layer = LlamaMoEMLP(cfg, moe, layer_index=0, intermediate_size=ffn).cuda().train()
        active = dense_mlp(d, k * ffn // e, "cuda")
        full = dense_mlp(d, ffn, "cuda")
        for t in args.tokens:
            x = torch.randn(t, 1, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn_like(x)

            def moe_step():
                x.grad = None  # fresh gradients each step (no accumulation), as in the dense steps
                for p in layer.parameters():
                    p.grad = None
                y, _ = layer(x)
                y.backward(g)

            def dense_step(f):
                def step():
                    x.grad = None
                    for w in f.weights:
                        w.grad = None
                    f(x.view(t, d)).backward(g.view(t, d))

                return step

            os.environ["MEGAMOE_COMPILE"] = "0"
            ms_eager = timed(moe_step)
            os.environ["MEGAMOE_COMPILE"] = "1"
            ms = timed(moe_step)
            ms_a = timed(dense_step(active))
            ms_f = timed(dense_step(full))
            used = [
                p for p in layer.parameters() if p.grad is not None
            ]  # graphs take only differentiated ones
            g_moe = graphed_ms(lambda inp: layer(inp)[0], used, x, g)
            g_a = graphed_ms(lambda inp: active(inp.view(t, d)).view_as(inp), active.weights, x, g)
            flops = 6 * t * k * 3 * d * (ffn // e)
            print(
                f"{t:>7} {k:>2} {ms:>8.2f} {ms_eager:>9.2f} {flops / ms / 1e9:>8.1f} {ms_a:>17.2f} "
                f"{ms / ms_a:>6.2f} {ms_f:>15.2f} {g_moe:>11.2f} {g_a:>14.2f} {g_moe / g_a:>9.2f}",
                flush=True,
            )


def profile(cfg, d, ffn, e, t=8192, k=4):
    """Where the time goes: host-synchronising calls (sync debug mode), CPU time per step (wall
    with the GPU idle-waiting removed), and the top ops by CUDA and by CPU time."""
    import time
    import warnings

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from megamoe.config import MoEConfig
    from megamoe.model.moe.layer import LlamaMoEMLP

    layer = (
        LlamaMoEMLP(
            cfg, MoEConfig(num_experts=e, num_selects=k), layer_index=0, intermediate_size=ffn
        )
        .cuda()
        .train()
    )
    x = torch.randn(t, 1, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        y, _ = layer(x)
        y.backward(g)

    timed(step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"host synchronisations in one step: {len(syncs)}", *syncs[:5], sep="\n  ")
    issue = []
    for _ in range(10):  # one step's launches fit the GPU's queue: this is the host's own time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        issue.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    cpu_ms = sorted(issue)[5] * 1e3
    print(f"CPU time to issue one step: {cpu_ms:.2f} ms; GPU step: {timed(step):.2f} ms")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
