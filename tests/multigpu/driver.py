"""Several real trainer runs in one torchrun launch (`torchrun --nproc_per_node=N driver.py PLAN`).

Each process starting, importing torch and megatron-core, joining NCCL and compiling the MoE
layer's kernels cost ~40 s per trainer run on the H200 machines; the runs of a test suite at one
world size share those costs here: each run is `megamoe.train.main.main(argv)` in the same
processes (the trainer re-creates megatron-core's groups when the layout changes). PLAN is a JSON
list of runs: {"name", "argv", "out", "ga" (micro-batches per rank and step), "step_offset"
(steps done before this run: a resumed leg), "replay" (a run's output directory whose recorded
routing this run replays, or null)}. Each run's routing is recorded by
tests/multigpu/routing_probe.py into <out>/route.<tag>.<rank>.pt (tag: the run's "tag", default
"run"), and rank 0 appends {"name", "code", "seconds"} to PLAN + ".status" (one JSON line per run).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(plan_path: str) -> int:
    import torch.distributed as dist

    from megamoe.train.main import main as train_main
    from tests.multigpu import routing_probe

    runs = json.load(open(plan_path))
    rank = int(os.environ.get("RANK", "0"))
    failed = 0
    for run in runs:
        replay = None
        if run.get("replay"):
            replay = routing_probe.load(
                sorted(glob.glob(os.path.join(run["replay"], "route.*.pt")))
            )
        probe = routing_probe.Probe(run["ga"], run.get("step_offset", 0), replay).install()
        t0 = time.time()
        try:
            code = train_main(run["argv"])  # the overlaps come with its flags
        finally:
            probe.uninstall()
        os.makedirs(run["out"], exist_ok=True)
        probe.save(os.path.join(run["out"], f"route.{run.get('tag', 'run')}.{rank}.pt"))
        if dist.is_initialized():
            dist.barrier()
        seconds = time.time() - t0
        failed += code != 0
        if rank == 0:
            with open(plan_path + ".status", "a") as f:
                f.write(
                    json.dumps({"name": run["name"], "code": code, "seconds": round(seconds, 1)})
                    + "\n"
                )
            print(f"driver: {run['name']} exit {code} in {seconds:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # guard: dist_checkpointing's save spawns a process
    sys.exit(main(sys.argv[1]))
