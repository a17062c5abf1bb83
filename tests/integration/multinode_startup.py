"""How long a job takes to start on 1, 2 and 3 nodes of the multi-node test cluster: run by hand
(root), it prints the table of benchmarks/RESULTS.md's "Multi-node start-up" section.

    python tests/integration/multinode_startup.py [REPEATS]

Each job is scripts/cpt/fpt.sh with the tiny LLaMA-MoE of tests/launch/tiny_setup.py, one CPU
process per node, 4 steps; times are read from the job's log as it grows (polled every 0.1 s)
and counted from sbatch: Slurm starts the batch script, the batch launcher's pre-flight is done
and srun runs ("$ srun"), every node's launcher is up ("(node rank i): ..."), node 0 starts
torchrun, the trainers have built the model and read the data (the log header, "max_steps"),
the first step is done ("step 1/"). The cluster is started and stopped here.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "launch"))

import tests.integration.test_multinode as mn  # noqa: E402

MARKS = [
    ("running", None),
    ("srun", "[megamoe.launch] $ srun"),
    ("nodes up", None),
    ("torchrun", "$ torchrun"),
    ("trainer ready", "max_steps:"),
    ("step 1", "\nstep 1/"),
]


def timeline(c: mn.Cluster, tiny, workdir: Path, nodes: int) -> dict:
    jid = c.sbatch(
        workdir,
        mn.FPT,
        mn.fpt_vars(tiny, nodes, 1, 4, eval_steps=100, save_steps=100),
        [f"--nodes={nodes}", *mn.CPU_JOB],
    )
    t0, seen, info = time.monotonic(), {}, {}
    while len(seen) < len(MARKS):
        info = info if "StdOut" in info and info.get("JobState") == "RUNNING" else c.job(jid)
        if info.get("JobState") == "RUNNING":
            seen.setdefault("running", time.monotonic() - t0)
            text = mn.log_of(info)
            for name, mark in MARKS[1:]:
                need = 1
                if name == "nodes up" and nodes > 1:  # one line per node
                    mark, need = "process(es), rendezvous", nodes
                elif name == "nodes up":  # one node: its launcher says only this
                    mark = "$ torchrun"
                if name not in seen and text.count(mark) >= need:
                    seen[name] = time.monotonic() - t0
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "COMPLETED") or len(seen) == len(
            MARKS
        ), mn.log_of(info)
        assert time.monotonic() - t0 < 300
        time.sleep(0.1)
    c.wait(jid, 120)
    return seen


def main(repeats: int) -> None:
    import tiny_setup

    with mn.fresh_cluster() as c, tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "logs").mkdir()
        root = Path(tiny_setup.ensure(work / "tiny-run", c.env()))
        rows = {n: [timeline(c, (root, None), work, n) for _ in range(repeats)] for n in (1, 2, 3)}
    print("| nodes | " + " | ".join(name for name, _ in MARKS) + " |")
    print("|---|" + "---|" * len(MARKS))
    for n, runs in rows.items():
        cells = [f"{statistics.median(r[name] for r in runs):.1f}" for name, _ in MARKS]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
