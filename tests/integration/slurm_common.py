"""What the one-node (test_slurm.py) and the multi-node (test_multinode.py) Slurm tests share:
job states, the CPU-only job shape, the environment handed to Slurm commands, job logs and the
processes a job leaves."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tests.conftest import TORCH_DIST_VARS

CPU_JOB = ["--gres=none", "--cpus-per-task=2"]  # the node's CPUs; no GPUs on these clusters
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def cannot(reason: str):
    """Skip, or fail where MEGAMOE_REQUIRE_SLURM=1 says the cluster must run."""
    if os.environ.get("MEGAMOE_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEGAMOE_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def clean_env() -> dict:
    """This process's environment without any outer Slurm job's variables, nor the pytest
    process's own torch.distributed ones (tests/conftest.py's world1), which would make the
    launcher reuse a port that is in use."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in TORCH_DIST_VARS and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
    }


def log_of(info: dict) -> str:
    p = Path(info.get("StdOut", ""))
    return p.read_text(errors="replace") if p.is_file() else f"<no log at {p}>"


def job_processes(jid: str) -> list[int]:
    """Every process of a job on any node (they carry its SLURM_JOB_ID)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURM_JOB_ID") == jid:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out
