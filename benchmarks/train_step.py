"""Full training steps of a LLaMA-MoE-3.5B-shaped model (and the dense LLaMA of the same shapes).

    python benchmarks/train_step.py               # one GPU: top-4, top-2, dense, dense of active width
    python benchmarks/train_step.py --layers 4 --grad-accum 1   # issue 16's 4-layer harness
    torchrun --nproc_per_node 4 benchmarks/train_step.py --ep 4 --models moe4   # any layout

What runs is the trainer's own step (megamoe.train.step.forward_backward on megatron-core's
schedule, DDP with fp32 gradient buffers, the distributed optimizer, bf16 parameters) on random
tokens: hidden 4096, 32 heads, 16 experts x 688 (top-4 / top-2), sequence 4096, with fewer layers
than the real 32 so that weights, gradients and Adam state fit one GPU. Attention is torch SDPA
(the trainer's "auto": cuDNN's kernel on Hopper), and RMSNorm, rotary, SwiGLU, cross-entropy and
the gate run fused (megamoe/model/fusion.py) unless --no-fusions. Throughput is tokens per second
per GPU over the timed steps; MFU counts the FLOPs of the activated parameters (megamoe.train.flops,
the same number the trainer logs) against 989 TFLOP/s (H100/H200 bf16 dense peak).

Prints a table; with --json FILE also writes the rows (benchmarks/scaling.py reads them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamoe.config import ATTENTION_BACKENDS, ModelConfig  # noqa: E402  (after the path is set)

# name: (model type, selected experts). A dense model with k set is the dense LLaMA of the MoE's
# active width (FFN = k experts' slices), the step the MoE model should cost no more than.
MODELS = {
    "moe4": ("llama_moe", 4),
    "moe2": ("llama_moe", 2),
    "dense": ("llama", None),
    "dense-a4": ("llama", 4),
    "dense-a2": ("llama", 2),
}


def add_shape_args(ap: argparse.ArgumentParser, layers: int) -> None:
    """The model's shape flags (LLaMA-MoE-3.5B's layers by default); hf_step.py takes them too."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)


def model_config(args, ffn: int | None = None) -> ModelConfig:
    """The model of those flags, with FFN width `ffn` (default --ffn)."""
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=ffn or args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    add_shape_args(ap, layers=12)
    ap.add_argument(
        "--micro-batch",
        type=int,
        default=2,
        help="sequences per micro-batch per data-parallel rank",
    )
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)"
    )
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--recompute", action="store_true", help="full activation recomputation")
    ap.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="core attention's SDPA kernel (the trainer's --attention_backend)",
    )
    ap.add_argument(
        "--no-fusions",
        action="store_true",
        help="the plain PyTorch path (MEGAMOE_COMPILE=0: no compiled RMSNorm, rotary, SwiGLU, "
        "cross-entropy, gate)",
    )
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="megatron-core's bucketed DP gradient reduce-scatter during the last backward",
    )
    ap.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="the distributed optimizer's parameter all-gather during the next forward",
    )
    ap.add_argument("--bucket-size", type=int, default=None, help="parameters per DDP bucket")
    ap.add_argument(
        "--ep-overlap",
        type=int,
        default=1,
        help="EP: token chunks whose all-to-alls overlap the expert GEMMs (1: off)",
    )
    ap.add_argument(
        "--tp-overlap",
        action="store_true",
        help="TP+SP: overlap the sequence-parallel all-gather / reduce-scatter with the GEMMs",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME:key=value,...",
        help="several layouts in this one launch (keys: tp, pp, ep, micro_batch, grad_accum, "
        "overlap_grad_reduce, overlap_param_gather, bucket_size, ep_overlap, tp_overlap, "
        "attention_backend, no_fusions); "
        "the other flags are the defaults",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the timed steps, one more under torch.profiler: its 25 costliest GPU kernels",
    )
    ap.add_argument("--json", help="write the result rows to this file (rank 0)")
    return ap.parse_args(argv)


def variants(args) -> list:
    """[(label, args)]: the flags alone, or each --variants entry applied to them."""
    if not args.variants:
        return [("", args)]
    out = []
    for v in args.variants:
        label, _, kv = v.partition(":")
        a = argparse.Namespace(**vars(args))
        for item in filter(None, kv.split(",")):
            key, _, val = item.partition("=")
            old = getattr(a, key)  # unknown keys fail here
            setattr(
                a,
                key,
                type(old)(int(val))
                if isinstance(old, (bool, int))
                else (int(val) if key == "bucket_size" else val),
            )
        out.append((label, a))
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step(ddp, opt, micro_batches) -> dict:
    from megamoe.train.step import forward_backward

    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = forward_backward(ddp, micro_batches, len(micro_batches))
    opt.step()
    return out


def bench(args, name: str) -> dict:
    saved = os.environ.get("MEGAMOE_COMPILE")
    if args.no_fusions:  # read when the model is built and when each fused piece runs
        os.environ["MEGAMOE_COMPILE"] = "0"
    try:
        return _bench(args, name)
    finally:
        if saved is None:
            os.environ.pop("MEGAMOE_COMPILE", None)
        else:
            os.environ["MEGAMOE_COMPILE"] = saved


def _bench(args, name: str) -> dict:
    from megamoe import parallel
    from megamoe.config import MoEConfig, OptimConfig
    from megamoe.model.llama import build_model
    from megamoe.model.moe import routing_stats as moe_stats
    from megamoe.train.flops import flops_per_token, peak_flops
    from megamoe.train.optim import TrainOptimizer
    from megamoe.train.step import wrap_model

    kind, k = MODELS[name]
    # a dense model with k set has the MoE's active width: k experts' slices
    m = model_config(
        args, None if kind == "llama_moe" or k is None else k * (args.ffn // args.experts)
    )
    moe = MoEConfig(num_experts=args.experts, num_selects=k) if kind == "llama_moe" else None
    layout = parallel.ParallelLayout(
        args.tp, args.pp, args.ep if moe else 1, sequence_parallel=args.tp > 1
    )
    parallel.initialize(layout, seed=1234, num_experts=moe.num_experts if moe else None)
    parallel.set_overlap(ep_chunks=args.ep_overlap, tp_comm=args.tp_overlap)
    cuda = torch.cuda.is_available()
    model = build_model(
        m,
        moe,
        layout,
        dtype=torch.bfloat16 if cuda else torch.float32,
        recompute=args.recompute,
        attention_backend=args.attention_backend,
    )
    dist_opt = cuda and not args.no_distributed_optimizer
    ddp = wrap_model(
        model,
        use_distributed_optimizer=dist_opt,
        overlap_grad_reduce=args.overlap_grad_reduce,
        bucket_size=args.bucket_size,
        overlap_param_gather=args.overlap_param_gather and dist_opt,
    )
    opt = TrainOptimizer(
        ddp, model, OptimConfig(learning_rate=1e-5), bf16=cuda, use_distributed_optimizer=dist_opt
    )
    dp, world = parallel.dp_size(), torch.distributed.get_world_size()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(parallel.dp_rank())

    def batch():  # fresh random tokens every step (a fixed batch gets memorised)
        return [
            torch.randint(0, m.vocab_size, (args.micro_batch, args.seq), device=dev, generator=g)
            for _ in range(args.grad_accum)
        ]

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        mbs = batch()
        _sync()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        out = _step(ddp, opt, mbs)
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(out["lm_loss"])
    if args.profile and cuda and torch.distributed.get_rank() == 0:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _step(ddp, opt, mbs)
            _sync()
        print(f"## {name}: one step's GPU kernels")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=25, max_name_column_width=70
            )
        )
    step_s = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * args.seq * args.grad_accum * dp  # global tokens per step
    tps_gpu = tokens / step_s / world
    peak, _ = peak_flops(None)
    mfu = flops_per_token(m, moe, args.seq) * tps_gpu / peak
    # what the data-parallel collectives move per step: the fp32 gradient buffers (reduce-scatter
    # with the distributed optimizer, else all-reduce) and the bf16 parameter buffers (all-gather)
    buffers = list(ddp.buffers) + list(ddp.expert_parallel_buffers)
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    param_bytes = sum(
        b.param_data.numel() * b.param_data.element_size()
        for b in buffers
        if b.param_data is not None
    )
    row = dict(
        model=name,
        attention_backend=args.attention_backend,
        fusions=not args.no_fusions,
        layers=args.layers,
        tp=args.tp,
        pp=args.pp,
        ep=layout.expert_model_parallel_size,
        grad_bytes=grad_bytes,
        param_bytes=param_bytes,
        micro_batch=args.micro_batch,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        ep_overlap=args.ep_overlap,
        tp_overlap=args.tp_overlap,
        dp=dp,
        gpus=world,
        tokens_per_step=tokens,
        step_ms=1e3 * step_s,
        tokens_per_s_per_gpu=tps_gpu,
        mfu=mfu,
        mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        loss=losses[-1] if losses else float("nan"),
    )
    moe_stats.clear()  # (holds the last routing tensors)
    del opt, ddp, model, mbs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def active_width_ratios(rows: list) -> list:
    """'moe4 / dense-a4' lines: the MoE step's tokens/s against the dense model of its active
    width, measured in the same variant (the target is >= 95%)."""
    by = {(r["variant"], r["model"]): r for r in rows}
    out = []
    for (variant, name), r in by.items():
        dense = by.get((variant, name.replace("moe", "dense-a")))
        if name.startswith("moe") and dense:
            ratio = r["tokens_per_s_per_gpu"] / dense["tokens_per_s_per_gpu"]
            out.append(
                f"# {variant or 'default'}: {name} at {100 * ratio:.1f}% of the tokens/s of "
                f"{dense['model']} (the dense LLaMA of its active width)"
            )
    return out


def main(argv=None) -> list:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("# no CUDA: a CPU smoke run (fp32, gloo); the numbers mean nothing")
    from megamoe import parallel

    parallel.init_distributed()
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(
            f"# {name} x{torch.distributed.get_world_size()}, torch {torch.__version__}; "
            f"hidden {args.hidden}, {args.heads} heads, {args.layers} layers, seq {args.seq}, "
            f"{args.experts} experts x {args.ffn // args.experts}, micro-batch {args.micro_batch} x "
            f"{args.grad_accum}, bf16, median of {args.steps} steps after {args.warmup}"
        )
        print(
            f"{'variant':>12} {'model':>8} {'TP':>2} {'PP':>2} {'EP':>2} {'DP':>2} {'mb':>2} {'step ms':>8} "
            f"{'tok/s/GPU':>10} {'MFU':>6} {'GiB':>6} {'loss':>7} {'grad GB':>7}",
            flush=True,
        )
    rows = []
    for label, a in variants(args):
        for name in a.models:
            r = bench(a, name)
            r["variant"] = label
            rows.append(r)
            if rank0:
                print(
                    f"{label:>12} {r['model']:>8} {r['tp']:>2} {r['pp']:>2} {r['ep']:>2} {r['dp']:>2} "
                    f"{r['micro_batch']:>2} {r['step_ms']:>8.1f} {r['tokens_per_s_per_gpu']:>10,.0f} "
                    f"{100 * r['mfu']:>5.1f}% {r['mem_gib']:>6.1f} {r['loss']:>7.3f} "
                    f"{r['grad_bytes'] / 1e9:>7.2f}",
                    flush=True,
                )
    if rank0:
        for line in active_width_ratios(rows):
            print(line)
    if rank0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    parallel.destroy()
    torch.distributed.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
