"""The training guide's "Estimation of Training Speed and Tokens".

    global batch size = per_device_train_batch_size * gradient_accumulation_steps
                        * num_nodes * num_gpu_per_node / (tensor_parallel * pipeline_parallel)
    #tokens/batch     = global batch size * block_size
    max_steps         = floor(tokens / #tokens/batch)
    wall time         = max_steps * time/step

With tensor and pipeline parallelism of 1 (the guide's scripts) the global batch size is the
guide's formula exactly; with TP/PP > 1 a micro-batch is shared by the TP x PP GPUs of one
data-parallel replica, so only the data-parallel size multiplies.

Data-parallel communication (DPComm; given --inter_node_bandwidth, and the model's size from the
script's pretrained model or --params): megatron-core's DDP with the distributed optimizer
reduce-scatters the gradients (fp32: grad_reduce_in_fp32) and, after the optimizer step,
all-gathers the updated parameters (bf16), over the data-parallel group for dense parameters and
the expert-data-parallel group (TP x DP / EP ranks) for experts. A ring collective over n ranks
sends (n - 1) / n of the buffer B (bytes per GPU) through every link:

    t = (n - 1) / n * B / bandwidth     (an all-reduce, without the distributed optimizer: 2x)

bandwidth: --intra_node_bandwidth (GB/s per GPU) within a node; a group that spans nodes is
limited by min(intra, --inter_node_bandwidth (GB/s per node, all its NICs) x m / G), where m of
the node's G GPUs belong to the group (the node's other groups share its NICs).

    step = compute + exposed communication
    exposed without --overlap_grad_reduce = t_grad + t_param
    exposed with --overlap_grad_reduce    = max(t_grad / buckets, t_grad - backward) + t_param

backward: the last micro-batch's backward, 2/3 of its compute (earlier micro-batches run under
no_sync); buckets: --ddp_bucket_size parameters each (megatron-core's default max(40M, 1M x DP));
the parameter all-gather is not overlapped (megamoe has no --overlap_param_gather). Latency terms
are left out: at these sizes each collective is bandwidth-bound.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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
    seconds_per_step: float | None = None

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.num_gpu_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.num_gpus // (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        )

    @property
    def global_batch_size(self) -> int:
        return (
            self.per_device_train_batch_size
            * self.gradient_accumulation_steps
            * self.data_parallel_size
        )

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
    def wall_seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return self.max_steps * self.seconds_per_step

    @property
    def tokens_per_second_per_gpu(self) -> float | None:
        if not self.seconds_per_step:
            return None
        return self.tokens_per_batch / self.seconds_per_step / self.num_gpus

    def validate(self) -> None:
        for name in (
            "block_size",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_nodes",
            "num_gpu_per_node",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.tokens > 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.num_gpus % mp:
            raise ValueError(
                f"{self.num_gpus} GPUs are not divisible by tensor x pipeline parallel = {mp}"
            )
        if self.seconds_per_step is not None and self.seconds_per_step <= 0:
            raise ValueError(f"--seconds_per_step must be positive, got {self.seconds_per_step}")
        if self.max_steps < 1:
            raise ValueError(
                f"{self.tokens:.4g} tokens are less than one global batch of "
                f"{self.tokens_per_batch} tokens"
            )


# ------------------------------------------------------------------------------------------------
# Data-parallel communication

INTRA_NODE_GBPS = 300.0  # default --intra_node_bandwidth: NVLink collective bandwidth per GPU
BACKWARD_SHARE = 2 / 3  # of a micro-batch's compute (backward ~ 2x forward)
GB = 1e9


@dataclass
class Collective:
    what: str  # "dense gradients", "expert parameters", ...
    kind: str  # "reduce-scatter" | "all-gather" | "all-reduce"
    ranks: int
    nodes: int
    nbytes: float  # the buffer of one GPU
    bandwidth: float  # bytes/s through each link of the ring
    gradients: bool

    @property
    def seconds(self) -> float:
        passes = 2 if self.kind == "all-reduce" else 1
        return passes * (self.ranks - 1) / self.ranks * self.nbytes / self.bandwidth


@dataclass
class DPComm:
    dense_params: float
    expert_params: float
    num_nodes: int
    num_gpu_per_node: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    inter_node_bandwidth: float | None = None  # GB/s per node
    intra_node_bandwidth: float = INTRA_NODE_GBPS  # GB/s per GPU
    distributed_optimizer: bool = True
    bf16: bool = True
    bucket_size: int | None = None  # parameters per bucket (--ddp_bucket_size)

    @property
    def world(self) -> int:
        return self.num_nodes * self.num_gpu_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def local_params(self) -> float:
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        return self.dense_params / (tp * pp) + self.expert_params / (ep * pp)

    def _bandwidth(self, per_node: int, nodes: int) -> float:
        intra = self.intra_node_bandwidth * GB
        if nodes <= 1:
            return intra
        if not self.inter_node_bandwidth:
            raise ValueError(
                f"the data-parallel group spans {nodes} nodes: give "
                "--inter_node_bandwidth (GB/s per node, e.g. 4 x 200 Gb/s "
                "InfiniBand = 100)"
            )
        return min(intra, self.inter_node_bandwidth * GB * per_node / self.num_gpu_per_node)

    def collectives(self) -> list[Collective]:
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        groups = [("dense", self.dp, self.dense_params / (tp * pp))]
        if self.expert_params:
            groups.append(("expert", max(1, tp * self.dp // ep), self.expert_params / (ep * pp)))
        out = []
        for name, n, params in groups:
            if n < 2 or params <= 0:
                continue
            nodes = min(self.num_nodes, n)
            bw = self._bandwidth(max(1, n // nodes), nodes)
            if self.distributed_optimizer:
                out.append(
                    Collective(
                        f"{name} gradients", "reduce-scatter", n, nodes, 4 * params, bw, True
                    )
                )
                out.append(
                    Collective(
                        f"{name} parameters",
                        "all-gather",
                        n,
                        nodes,
                        (2 if self.bf16 else 4) * params,
                        bw,
                        False,
                    )
                )
            else:
                out.append(
                    Collective(f"{name} gradients", "all-reduce", n, nodes, 4 * params, bw, True)
                )
        return out

    def buckets(self) -> int:
        size = self.bucket_size or max(40_000_000, 1_000_000 * self.dp)
        return max(1, math.ceil(self.local_params / size))

    def exposed(self, compute: float, gradient_accumulation_steps: int, overlap: bool) -> float:
        """Seconds of a step's communication that nothing else runs under."""
        grads = sum(c.seconds for c in self.collectives() if c.gradients)
        params = sum(c.seconds for c in self.collectives() if not c.gradients)
        if overlap:
            backward = compute * BACKWARD_SHARE / gradient_accumulation_steps
            grads = max(grads / self.buckets(), grads - backward)
        return grads + params


def comm_report(c: DPComm, compute: float | None, ga: int, overlap: bool) -> list[str]:
    opt = "distributed optimizer" if c.distributed_optimizer else "no distributed optimizer"
    lines = [
        f"data-parallel communication per step (ring collectives, megatron-core DDP, {opt}; "
        f"inter-node {f'{c.inter_node_bandwidth:g}' if c.inter_node_bandwidth else '-'} "
        "GB/s per node, intra-node "
        f"{c.intra_node_bandwidth:g} GB/s per GPU):"
    ]
    coll = c.collectives()
    if not coll:
        lines.append("  none (data-parallel size 1)")
    for x in coll:
        dtype = "fp32" if x.gradients or not c.bf16 else "bf16"
        lines.append(
            f"  {x.what}: {x.kind} over {x.ranks} ranks on {x.nodes} node(s), "
            f"{x.nbytes / GB:.3g} GB {dtype} per GPU at {x.bandwidth / GB:.3g} GB/s -> "
            f"{x.seconds:.3g} s"
        )
    if compute is None:
        lines.append(
            "  step time: give --compute_seconds_per_step (a step without data-parallel "
            "communication, e.g. the time/step of a run on one GPU)"
        )
        return lines
    for on in (False, True):
        e = c.exposed(compute, ga, on)
        mark = "  <- this run" if on == overlap else ""
        lines.append(
            f"  {'with' if on else 'without'} --overlap_grad_reduce: {e:.3g} s exposed "
            f"-> {compute + e:.4g} s/step (compute {compute:g} s){mark}"
        )
    return lines


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


def report(e: Estimate, comm: Sequence[str] = ()) -> str:
    """The guide's log header lines, then the token count and (given time/step) the wall time."""
    lines = [
        f"max_steps: {e.max_steps}",
        f"global batch size: {e.global_batch_size}",
        f"#tokens/batch: {e.tokens_per_batch}",
        f"tokens trained: {e.trained_tokens} ({human_tokens(e.trained_tokens)} of "
        f"{human_tokens(e.tokens)} requested)",
        f"GPUs: {e.num_nodes} node(s) x {e.num_gpu_per_node} = {e.num_gpus}"
        + (
            f" (data parallel {e.data_parallel_size}, tensor {e.tensor_model_parallel_size}, "
            f"pipeline {e.pipeline_model_parallel_size})"
            if e.data_parallel_size != e.num_gpus
            else ""
        ),
    ]
    lines += list(comm)
    if e.seconds_per_step is not None:
        wall = e.wall_seconds
        lines += [
            f"time/step: {e.seconds_per_step:g}s -> {e.tokens_per_second_per_gpu:,.0f} "
            "tokens/s/GPU",
            f"wall time: {format_duration(wall)} ({wall / 3600:,.1f} h), "
            f"{wall / 3600 * e.num_gpus:,.0f} GPU-hours",
        ]
    else:
        lines.append(
            "wall time: give --seconds_per_step (the 'time/step' of the training log or "
            "tensorboard) or --tokens_per_second_per_gpu"
        )
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

SIZES = (
    "block_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_nodes",
    "num_gpu_per_node",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
)


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


def run_differences(output_dir: str, sizes: dict, model: dict | None) -> list[str]:
    """How the run in `output_dir` differs from the sizes (and model shapes, when known) being
    estimated: a time per step measured on another shape does not carry over."""
    try:
        with open(os.path.join(output_dir, "run_config.json")) as f:
            saved = json.load(f)
        cfg = saved["config"]
    except (OSError, ValueError, KeyError) as e:
        return [
            f"--from_run {output_dir}: its run_config.json is unreadable ({e}), so nothing "
            "says the run had these sizes"
        ]
    flat = {k: v for sec in cfg.values() if isinstance(sec, dict) for k, v in sec.items()}
    flat.update({k: v for k, v in (saved.get("world") or {}).items() if v is not None})
    out = [
        f"{k} {flat.get(k)} there, {v} here"
        for k, v in sizes.items()
        if flat.get(k) is not None and flat.get(k) != v
    ]
    ran = _model_of(flat.get("pretrained_model"))
    if model and ran:
        out += [
            f"{k} {ran[k]} there, {model[k]} here"
            for k in sorted(model)
            if k in ran and ran[k] != model[k]
        ]
    if flat.get("cuda") is False:
        out.append("it ran on CPUs")
    return out


def _model_of(pretrained: str | None) -> dict | None:
    """The LLaMA shapes of a pretrained model directory, when it can be read here."""
    if not pretrained:
        return None
    from ..train.plan import read_pretrained

    found, _ = read_pretrained(pretrained)
    if found is None:
        return None
    shape = {
        k: getattr(found.model, k)
        for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    }
    if found.moe is not None:
        shape.update(num_experts=found.moe.num_experts, num_selects=found.moe.num_selects)
    return shape


def _sizes_from_target(target: str) -> tuple:
    """(sizes, tokens, max_steps, pretrained_model, every option) that an sbatch script or
    config passes to the trainer."""
    from .script import OptionsError, read_target, resolve_options

    t = read_target(target)
    if t.problems:
        raise ValueError(f"{target}: " + "; ".join(t.problems))
    try:
        opts = resolve_options(t.argv, t.config if t.kind == "config" else None)
    except OptionsError as e:
        raise ValueError(f"{target}: {e}") from None
    sizes = {k: int(opts[k]) for k in SIZES if opts.get(k) not in (None, "")}
    tokens = float(opts["max_tokens"]) if opts.get("max_tokens") else None
    return (
        sizes,
        tokens,
        int(opts["max_steps"]) if opts.get("max_steps") else None,
        opts.get("pretrained_model"),
        opts,
    )


def build_parser(prog: str) -> FlagParser:
    e = FlagParser(
        prog=prog,
        description="The guide's 'Estimation of Training Speed and Tokens': "
        "max_steps, global batch size, #tokens/batch and the wall time.",
    )
    e.add_argument("target", nargs="?", help="optional sbatch script or config to take sizes from")
    e.add_argument("--tokens", help="token budget, e.g. 100e9, 200B, 10^11")
    for k in SIZES:
        e.add_argument(f"--{k}", type=int)
    e.add_argument(
        "--seconds_per_step",
        type=float,
        help="measured or assumed time per step (log's time/step or tensorboard)",
    )
    e.add_argument(
        "--tokens_per_second_per_gpu",
        type=float,
        help="alternatively, a throughput in tokens/s/GPU",
    )
    e.add_argument(
        "--from_run",
        metavar="OUTPUT_DIR",
        help="alternatively, the time per step measured by a run (its train_log.jsonl)",
    )
    c = e.add_argument_group(
        "data-parallel communication (gradient reduce-scatter, parameter all-gather)"
    )
    c.add_argument(
        "--inter_node_bandwidth",
        type=float,
        metavar="GB/s",
        help="bandwidth between nodes, per node (all its NICs): e.g. 8 x 400 Gb/s "
        "= 400, 4 x 200 Gb/s = 100",
    )
    c.add_argument(
        "--intra_node_bandwidth",
        type=float,
        metavar="GB/s",
        default=INTRA_NODE_GBPS,
        help="collective bandwidth between the GPUs of a node, per GPU (NVLink; "
        f"default {INTRA_NODE_GBPS:g})",
    )
    c.add_argument(
        "--compute_seconds_per_step",
        type=float,
        help="a step without data-parallel communication (e.g. the time/step of a "
        "one-GPU run with this per-GPU batch): the step time is this plus the "
        "exposed communication",
    )
    c.add_argument(
        "--overlap_grad_reduce",
        type=_bool,
        help="true: the gradient reduce-scatter "
        "runs under the backward (default: the script's setting, else false)",
    )
    c.add_argument("--ddp_bucket_size", type=int, help="parameters per gradient bucket")
    c.add_argument("--expert_model_parallel_size", type=int)
    c.add_argument(
        "--use_distributed_optimizer", type=_bool, help="default true (megamoe's default on GPUs)"
    )
    c.add_argument(
        "--params",
        help="parameters of the model (e.g. 6.7B) when the script's "
        "pretrained model cannot be read here",
    )
    c.add_argument("--expert_params", help="how many of --params are expert weights")
    return e


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _params_of(pretrained: str | None) -> tuple[int, int] | None:
    """(dense, expert) parameters of a pretrained model directory readable here."""
    if not pretrained:
        return None
    from ..train.plan import read_pretrained
    from .memory import parameter_counts

    found, _ = read_pretrained(pretrained)
    return None if found is None else parameter_counts(found.model, found.moe)


def _estimate(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    values: dict = {}
    opts: dict = {}
    tokens = max_steps = pretrained = None
    if args.target:
        values, tokens, max_steps, pretrained, opts = _sizes_from_target(args.target)
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
            "pipeline_model_parallel_size", 1
        )
        tokens = max_steps * per * values["block_size"] / mp
    if tokens is None:
        raise ValueError("give --tokens (e.g. 100e9, 200B)")
    seconds = args.seconds_per_step
    if args.from_run:
        if seconds is not None or args.tokens_per_second_per_gpu is not None:
            raise ValueError(
                "--from_run measures the time per step; do not also give "
                "--seconds_per_step or --tokens_per_second_per_gpu"
            )
        seconds = measured_seconds_per_step(args.from_run)
        print(f"measured in {args.from_run}: {seconds:.4g} s/step (mean of the last logged steps)")
        diff = run_differences(args.from_run, values, _model_of(pretrained))
        if diff:
            print(
                f"warning: that run is not the one estimated ({'; '.join(diff)}): its time per "
                "step does not carry over to these sizes; measure a run of the same model, "
                "batch and layout",
                file=sys.stderr,
            )
    e = Estimate(tokens=tokens, seconds_per_step=seconds, **values)
    e.validate()
    if args.tokens_per_second_per_gpu is not None:
        if args.seconds_per_step is not None:
            raise ValueError("give --seconds_per_step or --tokens_per_second_per_gpu, not both")
        e.seconds_per_step = seconds_per_step_from_tgs(
            e.tokens_per_batch, e.num_gpus, args.tokens_per_second_per_gpu
        )
    comm = _communication(args, e, opts, pretrained)
    print(report(e, comm))
    return 0


def _communication(args, e: Estimate, opts: dict, pretrained: str | None) -> list[str]:
    """The data-parallel communication lines, when asked for (a bandwidth or a compute time);
    with a compute time and no time/step, the modelled step sets the wall time."""
    if args.inter_node_bandwidth is None and args.compute_seconds_per_step is None:
        return []
    if args.params is not None:
        total = parse_number(args.params)
        expert = parse_number(args.expert_params) if args.expert_params else 0.0
        if not 0 <= expert <= total:
            raise ValueError(f"--expert_params {args.expert_params} must be within --params")
        counts = (total - expert, expert)
    else:
        counts = _params_of(pretrained)
        if counts is None:
            raise ValueError(
                "the model's size is unknown here: give --params (and "
                "--expert_params for a LLaMA-MoE with expert parallelism)"
            )

    def pick(name, default):
        given = getattr(args, name)
        return (
            given
            if given is not None
            else (opts.get(name) if opts.get(name) is not None else default)
        )

    c = DPComm(
        counts[0],
        counts[1],
        e.num_nodes,
        e.num_gpu_per_node,
        e.tensor_model_parallel_size,
        e.pipeline_model_parallel_size,
        int(pick("expert_model_parallel_size", 1)),
        args.inter_node_bandwidth,
        args.intra_node_bandwidth,
        bool(pick("use_distributed_optimizer", True)),
        bool(opts.get("bf16", True)),
        pick("ddp_bucket_size", None),
    )
    for name in ("inter_node_bandwidth", "intra_node_bandwidth", "compute_seconds_per_step"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name} must be positive, got {v}")
    overlap = bool(pick("overlap_grad_reduce", False))
    compute = args.compute_seconds_per_step
    lines = comm_report(c, compute, e.gradient_accumulation_steps, overlap)
    if compute is not None and e.seconds_per_step is None:
        e.seconds_per_step = compute + c.exposed(compute, e.gradient_accumulation_steps, overlap)
    return lines


def main(argv: Sequence[str] | None = None, prog: str = "megamoe estimate") -> int:
    return run_command(prog, _estimate, argv)
