"""Weak scaling over expert parallelism and tensor parallelism at LLaMA-MoE shapes.

    python benchmarks/scaling.py [--gpus 4] [--layers 8]

Runs benchmarks/train_step.py under torchrun for EP = 1, 2, 4 (one expert-parallel group over
all GPUs, the same micro-batches per GPU: weak scaling) and TP = 1, 2 with sequence parallelism
(the same micro-batch split over the TP group), LLaMA-MoE-3.5B layer shapes, top-4, bf16, and
prints tokens/s per GPU and the efficiency: per-GPU throughput relative to the one-GPU run.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def run(gpus: int, tp: int, ep: int, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               os.path.join(HERE, "train_step.py"), "--models", args.model, "--layers", str(args.layers),
               "--tp", str(tp), "--ep", str(ep), "--micro-batch", str(args.micro_batch),
               "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--json", f.name]
        env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                   CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
            return {}
        return json.load(open(f.name))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--model", default="moe4", choices=["moe4", "moe2", "dense"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    cases = [("EP", g, 1, g) for g in (1, 2, 4, 8) if g <= args.gpus]
    cases += [("TP", 2, 2, 1)] if args.gpus >= 2 else []
    print(f"# {torch.cuda.get_device_name()}; {args.model}, {args.layers} layers of LLaMA-MoE-3.5B shape, "
          f"seq 4096, micro-batch {args.micro_batch} x {args.grad_accum} per data-parallel rank, bf16")
    print(f"{'kind':>4} {'GPUs':>4} {'TP':>2} {'EP':>2} {'DP':>2} {'step ms':>8} {'tok/s/GPU':>10} {'MFU':>6} {'efficiency':>10}")
    base = None
    for kind, gpus, tp, ep in cases:
        r = run(gpus, tp, ep, args)
        if not r:
            print(f"{kind:>4} {gpus:>4} {tp:>2} {ep:>2}  failed")
            continue
        if gpus == 1:
            base = r["tokens_per_s_per_gpu"]
        eff = r["tokens_per_s_per_gpu"] / base if base else float("nan")
        print(f"{kind:>4} {gpus:>4} {tp:>2} {ep:>2} {r['dp']:>2} {r['step_ms']:>8.1f} {r['tokens_per_s_per_gpu']:>10,.0f} "
              f"{100 * r['mfu']:>5.1f}% {100 * eff:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
