"""Weak scaling of expert, tensor and data parallelism at LLaMA-MoE shapes, with and without the
communication overlaps.

    python benchmarks/scaling.py [--gpus 2] [--layers 8] [--variants NAME:key=value,... ...]

Runs benchmarks/train_step.py once on one GPU (the baseline) and once under torchrun on --gpus
GPUs with every variant in that one launch (train_step.py --variants: the processes, NCCL and the
compiled kernels are set up once). LLaMA-MoE-3.5B layer shapes, top-4, bf16, seq 4096, micro-batch
2 x --grad-accum per data-parallel rank. Efficiency = the variant's tokens/s per GPU over the
one-GPU run's: weak scaling, the same work per GPU, except for the "TP2 mb2" row, where the two
TP ranks share one GPU's micro-batch (the issue's first measurement; each GPU then does half the
work). NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
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
DEFAULT_VARIANTS = [  # grouped by layout: the process groups are made once per layout
    "EP2:ep=2",
    "EP2+ov2:ep=2,ep_overlap=2",
    "EP2+ov4:ep=2,ep_overlap=4",
    "TP2_mb2:tp=2,micro_batch=2",
    "TP2_mb2+ov:tp=2,micro_batch=2,tp_overlap=1",
    "TP2:tp=2,micro_batch=4",
    "TP2+ov:tp=2,micro_batch=4,tp_overlap=1",
    "DP2:ep=1",
    "DP2+ogr:overlap_grad_reduce=1",
    "DP2+ogr+opg:overlap_grad_reduce=1,overlap_param_gather=1",
]


def run(gpus: int, args, variants=None) -> list:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={gpus}",
            os.path.join(HERE, "train_step.py"),
            "--models",
            args.model,
            "--layers",
            str(args.layers),
            "--micro-batch",
            str(args.micro_batch),
            "--grad-accum",
            str(args.grad_accum),
            "--steps",
            str(args.steps),
            "--json",
            f.name,
            *args.train_step_args.split(),
        ]
        if variants:
            cmd += ["--variants", *variants]
        env = dict(
            os.environ,
            NCCL_NVLS_ENABLE="0",
            TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
            NVSHMEM_DISABLE_NVLS="1",
            CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))),
        )
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(p.stdout, flush=True)  # train_step's own table (step times, losses, bytes)
        if p.returncode:
            print(p.stderr[-6000:], file=sys.stderr)
        try:
            return json.load(open(f.name))
        except (OSError, ValueError):
            return []


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 2)
    ap.add_argument("--model", default="moe4", choices=["moe4", "moe2", "dense"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument(
        "--train-step-args", default="", help="more train_step.py flags (e.g. a tiny CPU smoke run)"
    )
    args = ap.parse_args()
    base_rows = run(1, args)
    rows = run(args.gpus, args, args.variants) if args.gpus >= 2 else []
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run)"
    print(
        f"# {name}; {args.model}, {args.layers} layers of LLaMA-MoE-3.5B shape, "
        f"seq 4096, micro-batch {args.micro_batch} x {args.grad_accum} per data-parallel rank, bf16"
    )
    print(
        f"{'variant':>12} {'GPUs':>4} {'TP':>2} {'EP':>2} {'DP':>2} {'mb':>2} {'step ms':>8} {'tok/s/GPU':>10} "
        f"{'MFU':>6} {'efficiency':>10} {'last loss':>10}"
    )
    base = base_rows[0]["tokens_per_s_per_gpu"] if base_rows else float("nan")
    for r in base_rows + rows:
        label = r.get("variant") or "1 GPU"
        print(
            f"{label:>12} {r['gpus']:>4} {r['tp']:>2} {r['ep']:>2} {r['dp']:>2} {r['micro_batch']:>2} "
            f"{r['step_ms']:>8.1f} {r['tokens_per_s_per_gpu']:>10,.0f} {100 * r['mfu']:>5.1f}% "
            f"{100 * r['tokens_per_s_per_gpu'] / base:>9.1f}% {r['loss']:>10.6f}",
            flush=True,
        )
    for r in rows:  # issue 15: what the data-parallel collectives move per step
        if r["dp"] > 1 and r["ep"] == 1 and r["tp"] == 1:
            print(
                f"# {r.get('variant')}: DP={r['dp']} reduces {r['grad_bytes'] / 1e9:.2f} GB of fp32 gradients "
                f"(reduce-scatter) and gathers {r['param_bytes'] / 1e9:.2f} GB of bf16 parameters per step"
            )


if __name__ == "__main__":
    main()
