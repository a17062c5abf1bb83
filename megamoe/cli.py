"""The `megamoe` command.

    megamoe check SCRIPT_OR_CONFIG      the training guide's checklist as a pre-flight report
    megamoe estimate --tokens 100e9 --block_size 4096 --per_device_train_batch_size 8 \\
        --gradient_accumulation_steps 4 --num_nodes 14 --num_gpu_per_node 8 [--seconds_per_step S]
    megamoe estimate SCRIPT_OR_CONFIG [--seconds_per_step S]   (sizes taken from the script)
    megamoe estimate SCRIPT_OR_CONFIG --from_run outputs/<job-name>-<job-id>  (measured time/step)
    megamoe train FLAGS...               the trainer (python -m megamoe.train FLAGS)
    megamoe launch FLAGS...              what scripts/launch.sh runs (srun -> torchrun)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_check(args: argparse.Namespace) -> int:
    from . import preflight
    try:
        report = preflight.check_target(args.target)
    except (FileNotFoundError, ValueError) as e:
        print(f"megamoe check: {e}", file=sys.stderr)
        return 2
    print(report.render())
    if report.errors:
        return 1
    if args.strict and report.warnings:
        return 1
    return 0


_EST_KEYS = ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps",
             "num_nodes", "num_gpu_per_node", "tensor_model_parallel_size",
             "pipeline_model_parallel_size")


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import Estimate, parse_number, report, seconds_per_step_from_tgs
    values = {}
    tokens = None
    if args.target:
        from . import preflight
        try:
            t = preflight.read_target(args.target)
            if t.problems:
                raise ValueError("; ".join(t.problems))
            opts = preflight.resolve_options(t.argv, t.config if t.kind == "config" else None)
        except (FileNotFoundError, ValueError) as e:
            print(f"megamoe estimate: {args.target}: {e}", file=sys.stderr)
            return 2
        for k in _EST_KEYS:
            if opts.get(k) not in (None, ""):
                values[k] = int(opts[k])
        if opts.get("max_tokens"):
            tokens = float(opts["max_tokens"])
        elif opts.get("max_steps") and all(k in values for k in _EST_KEYS[:5]):
            tokens = None  # computed below from max_steps
            values["_max_steps"] = int(opts["max_steps"])
    for k in _EST_KEYS:
        v = getattr(args, k)
        if v is not None:
            values[k] = v
    missing = [k for k in _EST_KEYS[:5] if k not in values]
    if missing:
        print("megamoe estimate: give " + ", ".join(f"--{k}" for k in missing), file=sys.stderr)
        return 2
    if args.tokens is not None:
        try:
            tokens = parse_number(args.tokens)
        except ValueError:
            print(f"megamoe estimate: --tokens {args.tokens!r} is not a number", file=sys.stderr)
            return 2
    ms = values.pop("_max_steps", None)
    if tokens is None and ms:
        per = 1
        for k in _EST_KEYS[1:5]:
            per *= values[k]
        mp = values.get("tensor_model_parallel_size", 1) * values.get(
            "pipeline_model_parallel_size", 1)
        tokens = ms * per * values["block_size"] / mp
    if tokens is None:
        print("megamoe estimate: give --tokens (e.g. 100e9, 200B)", file=sys.stderr)
        return 2
    seconds = args.seconds_per_step
    if args.from_run:
        if seconds is not None or args.tokens_per_second_per_gpu is not None:
            print("megamoe estimate: --from_run measures the time per step; do not also give "
                  "--seconds_per_step or --tokens_per_second_per_gpu", file=sys.stderr)
            return 2
        try:
            seconds = measured_seconds_per_step(args.from_run)
        except ValueError as err:
            print(f"megamoe estimate: {err}", file=sys.stderr)
            return 2
        print(f"measured in {args.from_run}: {seconds:.4g} s/step (mean of the last logged steps)")
    e = Estimate(tokens=tokens, seconds_per_step=seconds, **values)
    try:
        e.validate()
        if args.tokens_per_second_per_gpu is not None:
            if args.seconds_per_step is not None:
                raise ValueError("give --seconds_per_step or --tokens_per_second_per_gpu, not both")
            e.seconds_per_step = seconds_per_step_from_tgs(
                e.tokens_per_batch, e.num_gpus, args.tokens_per_second_per_gpu)
    except ValueError as err:
        print(f"megamoe estimate: {err}", file=sys.stderr)
        return 2
    print(report(e))
    return 0


def measured_seconds_per_step(output_dir: str, last: int = 20) -> float:
    """Mean time_per_step of the last `last` logged steps of a run (its train_log.jsonl)."""
    import json
    import os
    path = os.path.join(output_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"--from_run {output_dir}: no train_log.jsonl there (a run's output_dir)")
    times = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("kind") == "train" and r.get("time_per_step"):
                times.append(float(r["time_per_step"]))
    if not times:
        raise ValueError(f"--from_run {output_dir}: no training steps logged yet")
    times = times[-last:]
    return sum(times) / len(times)


def _forward(module: str, argv: Sequence[str]) -> int:
    import runpy
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="pre-flight checklist of an sbatch script or a config")
    c.add_argument("target", help="an sbatch script (scripts/cpt/...sh) or a YAML/JSON config")
    c.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    c.set_defaults(func=_cmd_check)

    e = sub.add_parser("estimate", help="max_steps, global batch size, #tokens/batch, wall time",
                       description="The guide's 'Estimation of Training Speed and Tokens'.")
    e.add_argument("target", nargs="?", help="optional sbatch script or config to take sizes from")
    e.add_argument("--tokens", help="token budget, e.g. 100e9, 200B, 10^11")
    for k in _EST_KEYS:
        e.add_argument(f"--{k}", type=int)
    e.add_argument("--seconds_per_step", type=float,
                   help="measured or assumed time per step (log's time/step or tensorboard)")
    e.add_argument("--tokens_per_second_per_gpu", type=float,
                   help="alternatively, a throughput in tokens/s/GPU")
    e.add_argument("--from_run", metavar="OUTPUT_DIR",
                   help="alternatively, the time per step measured by a run (its train_log.jsonl)")
    e.set_defaults(func=_cmd_estimate)

    for name, help_ in (("train", "run the trainer (python -m megamoe.train FLAGS)"),
                        ("launch", "srun -> torchrun launcher (what scripts/launch.sh runs)")):
        s = sub.add_parser(name, help=help_, add_help=False)
        s.set_defaults(func=None, forward=name)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _forward("megamoe.train", argv[1:])
    if argv and argv[0] == "launch":
        from .launch import main as launch_main
        return launch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
