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

import math
from dataclasses import dataclass
from typing import Optional


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
