"""A stand-in for megamoe.train with the trainer's launch contract, for launcher tests on Slurm:
prints the log header, takes --max_steps/--output_dir, checkpoints and exits 0 on
SIGUSR1/SIGTERM at the next step boundary, resumes from the latest checkpoint, and writes
FINISHED at the end. Each step sleeps FAKE_STEP_SECONDS (default 0.2)."""
import json
import os
import signal
import sys
import time


def flag(name, default=None):
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--" + name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = flag("output_dir")
    max_steps = int(os.environ.get("FAKE_MAX_STEPS") or flag("max_steps", "20"))
    nn, ng = int(flag("num_nodes")), int(flag("num_gpu_per_node"))
    assert world == nn * ng, (world, nn, ng)
    stop = []
    signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    os.makedirs(out, exist_ok=True)
    ckpts = sorted((int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-")))
    step = ckpts[-1] if ckpts else 0
    if rank == 0:
        print(f"max_steps: {max_steps}\nworld size: {world}", flush=True)
        if step:
            print(f"resumed from checkpoint-{step}", flush=True)
        with open(os.path.join(out, "ready"), "w") as f:
            f.write(str(os.getpid()))
    while step < max_steps:
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.2")))
        step += 1
        if stop:
            break
    if rank == 0:
        os.makedirs(os.path.join(out, f"checkpoint-{step}"), exist_ok=True)
        with open(os.path.join(out, "events.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "signal": stop[0] if stop else None,
                                "job": os.environ.get("SLURM_JOB_ID"),
                                "restarts": os.environ.get("SLURM_RESTART_COUNT")}) + "\n")
        if step >= max_steps:
            open(os.path.join(out, "FINISHED"), "w").close()
        print(f"stopped at step {step}" + (f" on signal {stop[0]}" if stop else ""), flush=True)


if __name__ == "__main__":
    main()
