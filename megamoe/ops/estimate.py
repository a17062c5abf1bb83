"""The training guide's "Estimation of Training Speed and Tokens".

    global batch size = per_device_train_batch_size * gradient_accumulation_steps
                        * num_nodes * num_gpu_per_node / (tensor_parallel * pipeline_parallel)
    #tokens/batch     = global batch size * block_size
    max_steps         = floor(tokens / #tokens/batch)
    wall time         = max_steps * time/step

With tensor and pipeline parallelism of 1 (the guide's scripts) the global batch size is the
guide's formula exactly; with TP/PP > 1 a micro-batch is shared by the TP x PP GPUs of one
data-parallel replica, so only the data-parallel size multiplies.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from ..command import FlagParser, run_command


@dataclass
class Estimate:
    tokens: float
    block_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_nodes: int
    num_gpu_per_node: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    seconds_per_step: Optional[float] = None

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.num_gpu_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.num_gpus // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def global_batch_size(self) -> int:
        return (self.per_device_train_batch_size * self.gradient_accumulation_steps
                * self.data_parallel_size)

    @property
    def tokens_per_batch(self) -> int:
        return self.global_batch_size * self.block_size

    @property
    def max_steps(self) -> int:
        return int(self.tokens // self.tokens_per_batch)

    @property
    def trained_tokens(self) -> int:
        return self.max_steps * self.tokens_per_batch

    @property
    def wall_seconds(self) -> Optional[float]:
        if self.seconds_per_step is None:
            return None
        return self.max_steps * self.seconds_per_step

    @property
    def tokens_per_second_per_gpu(self) -> Optional[float]:
        if not self.seconds_per_step:
            return None
        return self.tokens_per_batch / self.seconds_per_step / self.num_gpus

    def validate(self) -> None:
        for name in ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_nodes", "num_gpu_per_node", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.tokens > 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.num_gpus % mp:
            raise ValueError(f"{self.num_gpus} GPUs are not divisible by tensor x pipeline "
                             f"parallel = {mp}")
        if self.seconds_per_step is not None and self.seconds_per_step <= 0:
            raise ValueError(f"--seconds_per_step must be positive, got {self.seconds_per_step}")
        if self.max_steps < 1:
            raise ValueError(f"{self.tokens:.4g} tokens are less than one global batch of "
                             f"{self.tokens_per_batch} tokens")


def format_duration(seconds: float) -> str:
    """1d 2h 3m (or 2h 3m 4s, 3m 4s, 4.2s)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m {s}s"
    return f"{m}m {s}s"


def human_tokens(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:g}"


def report(e: Estimate) -> str:
    """The guide's log header lines, then the token count and (given time/step) the wall time."""
    lines = [
        f"max_steps: {e.max_steps}",
        f"global batch size: {e.global_batch_size}",
        f"#tokens/batch: {e.tokens_per_batch}",
        f"tokens trained: {e.trained_tokens} ({human_tokens(e.trained_tokens)} of "
        f"{human_tokens(e.tokens)} requested)",
        f"GPUs: {e.num_nodes} node(s) x {e.num_gpu_per_node} = {e.num_gpus}"
        + (f" (data parallel {e.data_parallel_size}, tensor {e.tensor_model_parallel_size}, "
           f"pipeline {e.pipeline_model_parallel_size})"
           if e.data_parallel_size != e.num_gpus else ""),
    ]
    if e.seconds_per_step is not None:
        wall = e.wall_seconds
        lines += [
            f"time/step: {e.seconds_per_step:g}s -> {e.tokens_per_second_per_gpu:,.0f} "
            "tokens/s/GPU",
            f"wall time: {format_duration(wall)} ({wall / 3600:,.1f} h), "
            f"{wall / 3600 * e.num_gpus:,.0f} GPU-hours",
        ]
    else:
        lines.append("wall time: give --seconds_per_step (the 'time/step' of the training log or "
                     "tensorboard) or --tokens_per_second_per_gpu")
    return "\n".join(lines)


def seconds_per_step_from_tgs(tokens_per_batch: int, num_gpus: int, tgs: float) -> float:
    """time/step from a throughput in tokens/s/GPU."""
    if tgs <= 0:
        raise ValueError(f"--tokens_per_second_per_gpu must be positive, got {tgs}")
    return tokens_per_batch / (tgs * num_gpus)


def parse_number(text: str) -> float:
    """'100e9', '1e11', '200B', '1.5T', '10^11', '200*10^9' -> float."""
    t = str(text).strip().replace("_", "").replace(",", "")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    if t and t[-1].upper() in mult:
        return float(parse_number(t[:-1])) * mult[t[-1].upper()]
    if "*" in t:
        return math.prod(parse_number(p) for p in t.split("*"))
    if "^" in t:
        base, exp = t.split("^", 1)
        return float(base) ** float(exp)
    return float(t)


# ------------------------------------------------------------------------------------------------
# megamoe estimate

SIZES = ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps", "num_nodes",
         "num_gpu_per_node", "tensor_model_parallel_size", "pipeline_model_parallel_size")


def measured_seconds_per_step(output_dir: str, last: int = 20) -> float:
    """Mean time_per_step of the last `last` logged steps of a run (its train_log.jsonl)."""
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


def run_differences(output_dir: str, sizes: dict, model: Optional[dict]) -> list[str]:
    """How the run in `output_dir` differs from the sizes (and model shapes, when known) being
    estimated: a time per step measured on another shape does not carry over."""
    try:
        with open(os.path.join(output_dir, "run_config.json")) as f:
            saved = json.load(f)
        cfg = saved["config"]
    except (OSError, ValueError, KeyError) as e:
        return [f"--from_run {output_dir}: its run_config.json is unreadable ({e}), so nothing "
                "says the run had these sizes"]
    flat = {k: v for sec in cfg.values() if isinstance(sec, dict) for k, v in sec.items()}
    flat.update({k: v for k, v in (saved.get("world") or {}).items() if v is not None})
    out = [f"{k} {flat.get(k)} there, {v} here" for k, v in sizes.items()
           if flat.get(k) is not None and flat.get(k) != v]
    ran = _model_of(flat.get("pretrained_model"))
    if model and ran:
        out += [f"{k} {ran[k]} there, {model[k]} here" for k in sorted(model)
                if k in ran and ran[k] != model[k]]
    if flat.get("cuda") is False:
        out.append("it ran on CPUs")
    return out


def _model_of(pretrained: Optional[str]) -> Optional[dict]:
    """The LLaMA shapes of a pretrained model directory, when it can be read here."""
    if not pretrained:
        return None
    from ..train.plan import read_pretrained

    found, _ = read_pretrained(pretrained)
    if found is None:
        return None
    shape = {k: getattr(found.model, k) for k in ("hidden_size", "num_hidden_layers",
                                                  "intermediate_size", "vocab_size")}
    if found.moe is not None:
        shape.update(num_experts=found.moe.num_experts, num_selects=found.moe.num_selects)
    return shape


def _sizes_from_target(target: str) -> tuple[dict, Optional[float], Optional[int]]:
    """(sizes, tokens, max_steps) that an sbatch script or config passes to the trainer."""
    from .script import OptionsError, resolve_options
    from .script import read_target

    t = read_target(target)
    if t.problems:
        raise ValueError(f"{target}: " + "; ".join(t.problems))
    try:
        opts = resolve_options(t.argv, t.config if t.kind == "config" else None)
    except OptionsError as e:
        raise ValueError(f"{target}: {e}") from None
    sizes = {k: int(opts[k]) for k in SIZES if opts.get(k) not in (None, "")}
    tokens = float(opts["max_tokens"]) if opts.get("max_tokens") else None
    return (sizes, tokens, int(opts["max_steps"]) if opts.get("max_steps") else None,
            opts.get("pretrained_model"))


def build_parser(prog: str) -> FlagParser:
    e = FlagParser(prog=prog, description="The guide's 'Estimation of Training Speed and Tokens': "
                   "max_steps, global batch size, #tokens/batch and the wall time.")
    e.add_argument("target", nargs="?", help="optional sbatch script or config to take sizes from")
    e.add_argument("--tokens", help="token budget, e.g. 100e9, 200B, 10^11")
    for k in SIZES:
        e.add_argument(f"--{k}", type=int)
    e.add_argument("--seconds_per_step", type=float,
                   help="measured or assumed time per step (log's time/step or tensorboard)")
    e.add_argument("--tokens_per_second_per_gpu", type=float,
                   help="alternatively, a throughput in tokens/s/GPU")
    e.add_argument("--from_run", metavar="OUTPUT_DIR",
                   help="alternatively, the time per step measured by a run (its train_log.jsonl)")
    return e


def _estimate(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    values: dict = {}
    tokens = max_steps = pretrained = None
    if args.target:
        values, tokens, max_steps, pretrained = _sizes_from_target(args.target)
    values.update({k: getattr(args, k) for k in SIZES if getattr(args, k) is not None})
    missing = [k for k in SIZES[:5] if k not in values]
    if missing:
        raise ValueError("give " + ", ".join(f"--{k}" for k in missing))
    if args.tokens is not None:
        try:
            tokens = parse_number(args.tokens)
        except ValueError:
            raise ValueError(f"--tokens {args.tokens!r} is not a number") from None
    if tokens is None and max_steps:
        per = math.prod(values[k] for k in SIZES[1:5])
        mp = values.get("tensor_model_parallel_size", 1) * values.get(
            "pipeline_model_parallel_size", 1)
        tokens = max_steps * per * values["block_size"] / mp
    if tokens is None:
        raise ValueError("give --tokens (e.g. 100e9, 200B)")
    seconds = args.seconds_per_step
    if args.from_run:
        if seconds is not None or args.tokens_per_second_per_gpu is not None:
            raise ValueError("--from_run measures the time per step; do not also give "
                             "--seconds_per_step or --tokens_per_second_per_gpu")
        seconds = measured_seconds_per_step(args.from_run)
        print(f"measured in {args.from_run}: {seconds:.4g} s/step (mean of the last logged steps)")
        diff = run_differences(args.from_run, values, _model_of(pretrained))
        if diff:
            print(f"warning: that run is not the one estimated ({'; '.join(diff)}): its time per "
                  "step does not carry over to these sizes; measure a run of the same model, "
                  "batch and layout", file=sys.stderr)
    e = Estimate(tokens=tokens, seconds_per_step=seconds, **values)
    e.validate()
    if args.tokens_per_second_per_gpu is not None:
        if args.seconds_per_step is not None:
            raise ValueError("give --seconds_per_step or --tokens_per_second_per_gpu, not both")
        e.seconds_per_step = seconds_per_step_from_tgs(
            e.tokens_per_batch, e.num_gpus, args.tokens_per_second_per_gpu)
    print(report(e))
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "megamoe estimate") -> int:
    return run_command(prog, _estimate, argv)
