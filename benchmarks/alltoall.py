"""All-to-all bandwidth between the GPUs of one node, at the MoE layer's message sizes.

    torchrun --standalone --nproc_per_node=4 benchmarks/alltoall.py [--tokens 8192] [--hidden 4096]

Session 2 measured EP=4 losing 61% of its throughput, which works out to ~24 GB/s of
all-to-all against ~180 GB/s at EP=2. This separates the network from the layer. Rank 0 prints
`nvidia-smi topo -m` (how the GPUs are linked). Then every rank times all_to_all_single (NCCL on
CUDA, gloo on CPU as a smoke test) in two ways:
- equal splits of R bytes, R from 1 MB to 512 MB;
- the forward exchange of an MoE layer: T tokens (half, once and twice --tokens), top-2 and top-4
  of 16 experts drawn uniformly, rows sent once per (token, rank) as
  megamoe/model/moe/expert_parallel.py does, bf16 rows of d; also the bytes that leave the GPU;
- the distributed optimizer's data-parallel collectives: reduce-scatter of an fp32 gradient
  buffer and all-gather of bf16 parameters, 256 MB to 4 GB (the size is the whole buffer).

It prints the median time, the algorithm bandwidth (the buffer's bytes / time: each rank's send
buffer for all-to-all, the whole buffer for reduce-scatter and all-gather) and the bus bandwidth
(x (n-1)/n, NCCL-tests' convention: what the links carry). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, as benchmarks/gpu_session.sh sets it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, device, warmup=3, reps=10) -> float:
    """Median seconds of fn(), all ranks in step (a barrier before each repeat)."""
    times = []
    for i in range(warmup + reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name, seconds, sent_bytes, n):
    algbw = sent_bytes / seconds / 1e9
    print(
        f"{name:<34}{sent_bytes / 1e6:>10.1f}{seconds * 1e3:>10.3f}{algbw:>10.1f}{algbw * (n - 1) / n:>10.1f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--max-mb", type=int, default=512)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU (gloo)"
        print(f"# {n} ranks, {name}, torch {torch.__version__}")
        if cuda and shutil.which("nvidia-smi"):
            topo = subprocess.run(
                ["nvidia-smi", "topo", "-m"], capture_output=True, text=True
            ).stdout
            print("# nvidia-smi topo -m\n" + "\n".join("#   " + line for line in topo.splitlines()))
        print(f"{'case':<34}{'MB/rank':>10}{'ms':>10}{'algbw':>10}{'busbw':>10}   (GB/s)")

    size = 1 << 20
    while size <= args.max_mb << 20 and (cuda or size <= 8 << 20):
        elems = size // 2 // n * n  # bf16, a multiple of n
        x = torch.empty(elems, dtype=torch.bfloat16, device=device)
        y = torch.empty_like(x)
        t = timed(lambda: dist.all_to_all_single(y, x), device)
        if rank == 0:
            report("equal splits", t, elems * 2, n)
        size *= 4

    # The MoE layer's forward exchange (expert_parallel.py): rows once per (token, rank), bf16.
    # Index tensors live on the device: NCCL has no CPU backend (the first version of this
    # benchmark crashed here with "No backend type associated with device type cpu").
    from megamoe.model.moe.expert_parallel import plan_send

    E, d = 16, args.hidden if cuda else 256
    g = torch.Generator().manual_seed(rank)
    for T in (args.tokens // 2, args.tokens, 2 * args.tokens) if cuda else (256,):
        for k in (2, 4):
            idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(device)
            counts = plan_send(idx, n, E // n).counts[:, 0].contiguous()
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts)
            send_splits, recv_splits = counts.tolist(), recv.tolist()
            x = torch.randn(sum(send_splits), d, device=device).to(torch.bfloat16)
            y = torch.empty(sum(recv_splits), d, device=device, dtype=torch.bfloat16)
            t = timed(lambda: dist.all_to_all_single(y, x, recv_splits, send_splits), device)
            remote = (sum(send_splits) - send_splits[rank]) * d * 2  # bytes that leave this GPU
            if rank == 0:
                report(f"MoE exchange T={T} d={d} top-{k}", t, x.numel() * 2, n)
                print(
                    f"{'':<34}{remote / 1e6:>10.1f} MB to other GPUs: {remote / t / 1e9:.1f} GB/s",
                    flush=True,
                )

    # The data-parallel collectives of the distributed optimizer (issue 15's bandwidth model):
    # reduce-scatter of the fp32 gradient buffer, all-gather of the bf16 parameters.
    def dp_collectives(elems: int) -> None:  # buffers scoped here: freed before the next size
        g32 = torch.ones(elems, dtype=torch.float32, device=device)
        shard = torch.empty(elems // n, dtype=torch.float32, device=device)
        t = timed(lambda: dist.reduce_scatter_tensor(shard, g32), device, reps=5)
        if rank == 0:
            report("reduce_scatter fp32", t, elems * 4, n)
        p16 = torch.empty(elems * 2, dtype=torch.bfloat16, device=device)
        part = torch.ones(elems * 2 // n, dtype=torch.bfloat16, device=device)
        t = timed(lambda: dist.all_gather_into_tensor(p16, part), device, reps=5)
        if rank == 0:
            report("all_gather bf16", t, elems * 4, n)

    for mb in (256, 1024, 4096) if cuda else (8,):
        dp_collectives((mb << 20) // 4 // n * n)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
