"""Times the MoE token dispatch (permute) and combine (weighted unpermute) kernels on CUDA.

For T in {4096, 8192, 16384} tokens, d = 4096, bf16, E = 16 experts, k in {2, 4}: the forward and
backward of permute and unpermute (the megamoe._C ops themselves), in ms, in GB/s counting the bytes
each op must read and write at least once, and as a fraction of the bandwidth of a plain
device-to-device copy (torch's copy_) of a buffer of the same size, measured alongside. Also times
make_routing and, for comparison ("ref ms"), the pure-PyTorch references of make_routing and of
the two forwards.

    python benchmarks/dispatch.py [--tokens 4096 8192] [--topk 2 4] [--hidden 4096] [--reps 50]

Timing: CUDA events around each call, after warm-ups; the median of the repeats.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--no-reference", action="store_true", help="skip timing the pure-PyTorch reference"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/dispatch.py times the CUDA kernels and needs a CUDA device; none was found."
        )

    from megamoe.model.moe import dispatch as D

    if not D.HAVE_EXTENSION:
        sys.exit("megamoe._C is not built: run `make setup` first.")
    ops, dev, dt, d, E = torch.ops.megamoe, "cuda", torch.bfloat16, args.hidden, args.experts
    esize = torch.tensor([], dtype=dt).element_size()
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  d={d} E={E} {dt}  "
        f"median of {args.reps} after {args.warmup} warm-ups"
    )
    header = (
        f"{'op':<18}{'T':>6}{'k':>3}{'ms':>9}{'GB/s':>8}{'copy GB/s':>11}{'of copy':>9}"
        f"{'ref ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for T in args.tokens:
        for k in args.topk:
            torch.manual_seed(0)
            idx = torch.rand(T, E, device=dev).argsort(dim=1)[:, :k]  # k distinct experts per token
            routing = D.make_routing(idx, E)
            m = routing.row_id_map
            x = torch.randn(T, d, device=dev, dtype=dt)
            y = torch.randn(T * k, d, device=dev, dtype=dt)
            g_rows = torch.randn(T * k, d, device=dev, dtype=dt)
            g_tok = torch.randn(T, d, device=dev, dtype=dt)
            s = torch.rand(T, k, device=dev)
            small = T * k * 4 + T * k * 4  # row_id_map + scores (fp32), read once
            tok, rows = T * d * esize, T * k * d * esize
            cases = [  # name, fn, bytes read + written, reference fn
                (
                    "permute fwd",
                    functools.partial(ops.permute, x, m, k),
                    tok + rows,
                    functools.partial(D.dispatch_reference, x, routing),
                ),
                (
                    "permute bwd",
                    functools.partial(ops.unpermute, g_rows, m, None, k, 1.0),
                    rows + tok,
                    None,
                ),
                (
                    "unpermute fwd",
                    functools.partial(ops.unpermute, y, m, s, k, 0.5),
                    rows + tok + small,
                    functools.partial(D.combine_reference, y, routing, s, 0.5),
                ),
                (
                    "unpermute bwd",
                    functools.partial(ops.unpermute_backward, g_tok, y, m, s, k, 0.5),
                    tok + 2 * rows + small,
                    None,
                ),
            ]
            for name, fn, nbytes, ref in cases:
                ms = time_ms(fn, args.warmup, args.reps)
                # a copy moving the same number of bytes (half read, half written)
                src = torch.empty(nbytes // 2 // esize, device=dev, dtype=dt)
                copy_ms = time_ms(
                    functools.partial(torch.Tensor.copy_, torch.empty_like(src), src),
                    args.warmup,
                    args.reps,
                )
                del src
                gbs, copy_gbs = nbytes / ms / 1e6, nbytes / copy_ms / 1e6
                ref_ms = "" if ref is None or args.no_reference else f"{time_ms(ref, 3, 10):.3f}"
                print(
                    f"{name:<18}{T:>6}{k:>3}{ms:>9.3f}{gbs:>8.0f}{copy_gbs:>11.0f}{gbs / copy_gbs:>9.0%}"
                    f"{ref_ms:>9}"
                )
            ms = time_ms(lambda: D.make_routing(idx, E), args.warmup, args.reps)
            ref_ms = (
                ""
                if args.no_reference
                else f"{time_ms(lambda: D.make_routing_reference(idx, E), 3, 10):.3f}"
            )
            print(f"{'make_routing':<18}{T:>6}{k:>3}{ms:>9.3f}{'':>28}{ref_ms:>9}")
            del x, y, g_rows, g_tok, s, routing, m
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
