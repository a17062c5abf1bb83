"""The launcher behind scripts/launch.sh: sbatch -> srun (one task per node) -> torchrun.

    bash scripts/launch.sh TRAINER_FLAGS...      (what every scripts/cpt/*.sh calls)
      = megamoe launch TRAINER_FLAGS... (python -m megamoe launch)

Three situations, told apart by the SLURM_* variables:

* Inside a Slurm allocation, not in a job step (the sbatch batch script, or an salloc shell):
  check that the job's shape matches the flags (num_nodes == --nodes, num_gpu_per_node == the
  GPUs of --gres), pick the rendezvous (first host of SLURM_JOB_NODELIST, a port derived from
  the job id), then ``srun --nodes N --ntasks N --ntasks-per-node 1 python -m megamoe launch
  FLAGS``. Preemption: SIGUSR1 (``sbatch --signal=B:USR1@300``) to the batch script is passed to
  the training processes (and only to them; see _BatchSignals); the trainer checkpoints at the
  next step boundary and exits 0, and the job is requeued (``scontrol requeue``) so that it
  resumes from that checkpoint.
* Inside a job step (each srun task): run torchrun for this node, --node_rank = SLURM_NODEID.
* Outside Slurm: the same torchrun for one node (so one script serves a workstation).

Several nodes: every node's launcher first checks that its software is the batch node's (each
file of the megamoe package, the versions of Python, torch, megatron-core, numpy) and runs the
pre-flight check on its own view of the files (node_preflight): a node that differs refuses,
naming itself, before any training process starts. Then it beats to the batch launcher
(NodeWatch/NodeBeat): a node not heard from for MEGAMOE_NODE_TIMEOUT_S seconds is lost, the
other nodes kill their training processes (a collective with it would wait for gloo's or NCCL's
10-30 minute timeout), the job log names it and the newest complete checkpoint, and the job is
requeued to resume from that checkpoint on nodes that answer.

torchrun runs in this process (``torch.distributed.run.main``, what the ``torchrun`` command
calls), so that this process can pass signals to the training processes it starts and ignore
those meant for them (the default action of SIGUSR1 is to terminate).

CPU-only clusters (tests, the local Slurm of scripts/slurm/): a job without --gres has no GPUs;
with MEGAMOE_ALLOW_CPU=1 the launcher runs num_gpu_per_node CPU processes per node instead of
refusing.

Environment knobs: MEGAMOE_ALLOW_CPU=1 (see above), MASTER_PORT (override the derived port),
MEGAMOE_SKIP_CHECK=1 (skip the pre-flight checks, the per-node ones too), MEGAMOE_NO_REQUEUE=1
(do not requeue after a preemption signal or a lost node), MEGAMOE_PYTHON (the python srun
starts; default: this one), MEGAMOE_SIGNAL_REPEAT_S (how often a preemption request is repeated;
default 30), MEGAMOE_NODE_TIMEOUT_S (when a silent node is lost; default 60).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.layout import newest_checkpoint, training_finished
from .slurm import (
    in_allocation,
    in_step,
    job_shape,
    scontrol_hostnames,
    slurm_gpus_per_node,
    slurm_nnodes,
)

PREFIX = "[megamoe.launch]"
TRAIN_MODULE = "megamoe.train"
PORT_BASE = 15000  # below Linux's ephemeral range (32768-60999)
PORT_SPAN = 15000


class LaunchError(RuntimeError):
    """A refusal to start; the message says what to change."""


def log(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Trainer flags: read by the trainer's own parser; the launcher sets three of them
# ------------------------------------------------------------------------------------------------


def trainer_options(train_argv: Sequence[str]):
    """The trainer's RunConfig for these flags (and their --config file)."""
    from .script import OptionsError, parse_run

    try:
        return parse_run(train_argv)
    except OptionsError as e:
        raise LaunchError(f"refusing to start: {e}") from None


def set_flag(argv: Sequence[str], name: str, value: str) -> list[str]:
    """argv with --name (in either spelling, '--name v' or '--name=v') removed and '--name
    value' appended."""
    spellings = {"--" + name, "--" + name.replace("_", "-")}
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in spellings:
            skip = True
        elif a.split("=", 1)[0] not in spellings:
            out.append(a)
    return out + ["--" + name, str(value)]


# ------------------------------------------------------------------------------------------------
# The rendezvous
# ------------------------------------------------------------------------------------------------


def first_host(
    env: Mapping[str, str], hostnames: Callable[[str], list[str]] = scontrol_hostnames
) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: cannot find the rendezvous host")
    return hostnames(nodelist)[0]


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def port_from_job_id(job_id: str | int) -> int:
    """A port in [15000, 30000) derived from the job id: concurrent jobs sharing a first node
    get different ports (ids that differ by less than 15000)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def port_is_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(
    job_id: str | int, is_free: Callable[[int], bool] = port_is_free, tries: int = 64
) -> int:
    """The job's derived port, or the next free one after it (checked on this host, which in a
    batch script is the first node of the allocation, where the rendezvous store listens)."""
    base = port_from_job_id(job_id)
    for i in range(tries):
        port = PORT_BASE + (base - PORT_BASE + i) % PORT_SPAN
        if is_free(port):
            return port
    raise LaunchError(
        f"no free port in {base}..{base + tries - 1} on {socket.gethostname()}; set MASTER_PORT"
    )


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def check_slurm_shape(
    num_nodes: int | None, num_gpu_per_node: int | None, env: Mapping[str, str]
) -> tuple[int, int, list[str]]:
    """Compare the flags with the job. Returns (nnodes, nproc_per_node, notes) or raises
    LaunchError naming what to change."""
    nnodes = slurm_nnodes(env)
    if nnodes is None:
        raise LaunchError("inside a Slurm job but SLURM_JOB_NUM_NODES/SLURM_NNODES is not set")
    gpus = slurm_gpus_per_node(env)
    allow_cpu = _truthy(env.get("MEGAMOE_ALLOW_CPU"))
    nodes, nproc, found = job_shape(
        num_nodes,
        num_gpu_per_node,
        nnodes,
        gpus,
        f"#SBATCH --nodes={nnodes}, SLURM_NNODES={nnodes}",
        allow_cpu,
    )
    if found:
        raise LaunchError("refusing to start:\n  - " + "\n  - ".join(f.text() for f in found))
    notes = []
    if num_nodes is None:
        notes.append(f"num_nodes not given: using the job's {nnodes} node(s)")
    if gpus is None:
        notes.append(f"no GPUs in the job; MEGAMOE_ALLOW_CPU=1: {nproc} CPU process(es) per node")
    elif num_gpu_per_node is None:
        notes.append(f"num_gpu_per_node not given: using the job's {gpus} GPU(s) per node")
    return int(nodes), int(nproc), notes


def check_local_shape(
    num_nodes: int | None,
    num_gpu_per_node: int | None,
    env: Mapping[str, str],
    cuda_devices: int,
) -> tuple[int, list[str]]:
    """Outside Slurm: one node; num_gpu_per_node GPUs on this machine (or CPU processes with
    MEGAMOE_ALLOW_CPU=1). Returns (nproc_per_node, notes)."""
    notes: list[str] = []
    errors: list[str] = []
    if num_nodes not in (None, 1):
        errors.append(
            f"num_nodes={num_nodes} outside Slurm: this machine is one node; submit the "
            "script with sbatch, or set num_nodes=1"
        )
    allow_cpu = _truthy(env.get("MEGAMOE_ALLOW_CPU"))
    nproc = num_gpu_per_node
    if cuda_devices > 0:
        if nproc is None:
            nproc = cuda_devices
            notes.append(f"num_gpu_per_node not given: using this machine's {cuda_devices} GPU(s)")
        elif nproc > cuda_devices:
            errors.append(
                f"num_gpu_per_node={nproc} but this machine has {cuda_devices} GPU(s) "
                f"visible: set num_gpu_per_node={cuda_devices} (or fewer)"
            )
        elif nproc < cuda_devices:
            notes.append(f"using {nproc} of this machine's {cuda_devices} GPUs")
    else:
        if not allow_cpu:
            errors.append(
                f"no CUDA GPU on this machine: set MEGAMOE_ALLOW_CPU=1 to run "
                f"num_gpu_per_node={nproc if nproc is not None else 1} process(es) on "
                "CPUs, or run on a GPU machine"
            )
        elif nproc is None:
            nproc = 1
            notes.append(
                "no GPU; MEGAMOE_ALLOW_CPU=1: one CPU process (num_gpu_per_node not given)"
            )
        else:
            notes.append(f"no GPU; MEGAMOE_ALLOW_CPU=1: {nproc} CPU process(es)")
    if nproc is not None and nproc < 1:
        errors.append(f"num_gpu_per_node={nproc} must be at least 1")
    if errors:
        raise LaunchError("refusing to start:\n  - " + "\n  - ".join(errors))
    return int(nproc), notes


# ------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------


def default_output_dir(env: Mapping[str, str], now: datetime.datetime | None = None) -> str:
    """outputs/<job-name>-<job-id> in Slurm (the guide's layout; a requeued job keeps its id and
    so its directory, and resumes); outputs/<name>-<date-time> outside."""
    if env.get("SLURM_JOB_ID"):
        return f"outputs/{env.get('SLURM_JOB_NAME') or 'job'}-{env['SLURM_JOB_ID']}"
    now = now or datetime.datetime.now()
    return f"outputs/{env.get('MEGAMOE_JOB_NAME') or 'local'}-{now:%Y%m%d-%H%M%S}"


def with_output_dir(train_argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The trainer flags with --output_dir filled in when missing or empty (flags or config)."""
    if trainer_options(train_argv).train.output_dir:
        return list(train_argv)
    return set_flag(train_argv, "output_dir", default_output_dir(env))


def torchrun_args(
    nnodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    train_argv: Sequence[str],
    module: str = TRAIN_MODULE,
) -> list[str]:
    """Arguments of torchrun (static rendezvous: node ranks follow the Slurm node order)."""
    return [
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc_per_node),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr,
        "--master_port",
        str(master_port),
        "--max_restarts",
        "0",
        "-m",
        module,
        *train_argv,
    ]


def srun_args(
    nnodes: int,
    env: Mapping[str, str],
    python: str,
    train_argv: Sequence[str],
    gpus_per_node: int | None = None,
) -> list[str]:
    """srun: one task per node, each `python -m megamoe launch FLAGS` (-> torchrun), with all
    of the job's GPUs, CPUs and memory on its node."""
    cmd = [
        "srun",
        f"--nodes={nnodes}",
        f"--ntasks={nnodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        "--mem=0",
    ]
    # Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: pass it on, or each
    # node's torchrun would be confined to one CPU.
    cpt = env.get("SLURM_CPUS_PER_TASK")
    if cpt:
        cmd.append(f"--cpus-per-task={cpt}")
    if gpus_per_node:
        cmd.append(f"--gres=gpu:{gpus_per_node}")
    return cmd + [python, "-u", "-m", "megamoe", "launch", *train_argv]


# ------------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    mode: str  # "srun" (batch script) | "node" (srun task) | "local"
    argv: list[str]  # srun command line, or torchrun arguments
    train_argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # extra environment
    notes: list[str] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1


def plan(
    train_argv: Sequence[str],
    env: Mapping[str, str],
    *,
    python: str = sys.executable,
    hostnames: Callable[[str], list[str]] = scontrol_hostnames,
    is_free: Callable[[int], bool] = port_is_free,
    cuda_devices: Callable[[], int] | None = None,
) -> Plan:
    """What to run for these trainer flags in this environment (no side effects)."""
    train_argv = list(train_argv)
    pc = trainer_options(train_argv).parallel
    num_nodes, num_gpu = pc.num_nodes, pc.num_gpu_per_node

    if in_step(env):
        # One srun task per node: torchrun for this node.
        nnodes, nproc, notes = check_slurm_shape(num_nodes, num_gpu, env)
        step_nodes = env.get("SLURM_STEP_NUM_NODES")
        if step_nodes and int(step_nodes) != nnodes:
            raise LaunchError(
                f"the job step has {step_nodes} node(s) but num_nodes={nnodes}: "
                "start one task per node (srun --ntasks-per-node=1)"
            )
        step_tasks = env.get("SLURM_STEP_NUM_TASKS")
        if step_tasks and int(step_tasks) != nnodes:
            raise LaunchError(
                f"the job step has {step_tasks} tasks on {nnodes} node(s): start "
                "one task per node (srun --ntasks-per-node=1); torchrun starts "
                "num_gpu_per_node processes on each"
            )
        addr = (
            env.get("MEGAMOE_MASTER_ADDR") or env.get("MASTER_ADDR") or first_host(env, hostnames)
        )
        port = (
            env.get("MEGAMOE_MASTER_PORT")
            or env.get("MASTER_PORT")
            or str(port_from_job_id(env["SLURM_JOB_ID"]))
        )
        rank = int(env.get("SLURM_NODEID", env.get("SLURM_PROCID", "0")))
        train_argv = set_flag(train_argv, "num_nodes", str(nnodes))
        train_argv = set_flag(train_argv, "num_gpu_per_node", str(nproc))
        return Plan(
            "node",
            torchrun_args(nnodes, nproc, rank, addr, int(port), train_argv),
            train_argv,
            notes=notes,
            nnodes=nnodes,
            nproc_per_node=nproc,
        )

    if in_allocation(env):
        # The batch script (or an salloc shell): srun one task per node.
        nnodes, nproc, notes = check_slurm_shape(num_nodes, num_gpu, env)
        train_argv = with_output_dir(train_argv, env)
        addr = first_host(env, hostnames)
        if not resolves(addr):
            if nnodes > 1:
                raise LaunchError(
                    f"the first node {addr} of the job does not resolve to an "
                    "address here: the other nodes could not reach the rendezvous"
                )
            notes.append(f"{addr} does not resolve: rendezvous on 127.0.0.1 (one node)")
            addr = "127.0.0.1"
        port = (
            int(env["MASTER_PORT"])
            if env.get("MASTER_PORT")
            else pick_port(env["SLURM_JOB_ID"], is_free)
        )
        train_argv = set_flag(train_argv, "num_nodes", str(nnodes))
        train_argv = set_flag(train_argv, "num_gpu_per_node", str(nproc))
        extra = {"MEGAMOE_MASTER_ADDR": addr, "MEGAMOE_MASTER_PORT": str(port)}
        gpus = slurm_gpus_per_node(env)
        return Plan(
            "srun",
            srun_args(nnodes, env, python, train_argv, gpus),
            train_argv,
            env=extra,
            notes=notes,
            nnodes=nnodes,
            nproc_per_node=nproc,
        )

    # Outside Slurm: torchrun alone.
    if cuda_devices is None:
        cuda_devices = _cuda_device_count
    nproc, notes = check_local_shape(num_nodes, num_gpu, env, cuda_devices())
    train_argv = with_output_dir(train_argv, env)
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _free_port()
    train_argv = set_flag(train_argv, "num_nodes", "1")
    train_argv = set_flag(train_argv, "num_gpu_per_node", str(nproc))
    return Plan(
        "local",
        torchrun_args(1, nproc, 0, "127.0.0.1", port, train_argv),
        train_argv,
        notes=notes,
        nnodes=1,
        nproc_per_node=nproc,
    )


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Every node: the same software and the same files as the batch node
# ------------------------------------------------------------------------------------------------


def software_manifest() -> dict:
    """What must be the same on every node: each file of the megamoe package (sha256, 12 hex
    digits), the versions of Python and of the packages training runs on, and this host."""
    import hashlib
    import platform
    from importlib import metadata

    pkg = Path(__file__).resolve().parents[1]
    files = {}
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            files[f.relative_to(pkg.parent).as_posix()] = hashlib.sha256(
                f.read_bytes()
            ).hexdigest()[:12]
    versions = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"host": socket.gethostname(), "files": files, "versions": versions}


def software_differences(here: dict, batch: dict) -> list[str]:
    """How this node's software_manifest() differs from the batch node's, one phrase each."""
    there = batch.get("host", "the batch node")
    mine, theirs = here["versions"], batch["versions"]
    out = [
        f"{k} {mine.get(k) or 'missing'} here, {theirs.get(k) or 'missing'} on {there}"
        for k in sorted(set(mine) | set(theirs))
        if mine.get(k) != theirs.get(k)
    ]
    files = sorted(set(here["files"]) | set(batch["files"]))
    differ = [
        f
        + (
            " (missing here)"
            if f not in here["files"]
            else f" (not on {there})"
            if f not in batch["files"]
            else ""
        )
        for f in files
        if here["files"].get(f) != batch["files"].get(f)
    ]
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        out.append(f"files not as on {there}: {', '.join(differ[:3])}{more}")
    return out


def node_preflight(train_argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Why this node must not start (empty: it may): its software differs from the batch node's
    (MEGAMOE_SOFTWARE, set by the batch launcher), or the pre-flight check of `megamoe check`
    finds errors here (a data path, model or tokenizer missing on this node). Warnings were
    printed by the batch launcher already."""
    from .checklist import check_flags

    problems = []
    batch = env.get("MEGAMOE_SOFTWARE")
    if batch:
        diff = software_differences(software_manifest(), json.loads(batch))
        if diff:
            problems.append(
                "its software is not the batch node's: "
                + "; ".join(diff)
                + ": install the same megamoe checkout and packages on every node (a "
                "shared filesystem, or the same commit and `make setup`)"
            )
    report = check_flags(list(train_argv), env=dict(env))
    problems += [f"{item}: {msg}" for item, msg in report.errors]
    return problems


# ------------------------------------------------------------------------------------------------
# Lost nodes: a heartbeat from every node's launcher to the batch launcher
# ------------------------------------------------------------------------------------------------

NODE_TIMEOUT_S = 60.0  # a node not heard from for this long is lost (MEGAMOE_NODE_TIMEOUT_S)


def node_timeout(env: Mapping[str, str]) -> float:
    v = env.get("MEGAMOE_NODE_TIMEOUT_S")
    if not v:
        return NODE_TIMEOUT_S
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise LaunchError(f"MEGAMOE_NODE_TIMEOUT_S={v!r} must be a positive number of seconds")
    return t


def beat_period(timeout: float) -> float:
    return min(10.0, max(0.5, timeout / 6))


class NodeWatch:
    """The batch launcher's side. Every node's launcher connects, says `hello RANK`, then `beat`
    every beat_period() seconds and `bye CODE` when its torchrun has ended; each beat is answered
    `ok`, or `stop REASON` once a node is lost. A node is lost when it has not been heard from
    for `timeout` seconds (its cable, its switch port or the whole node is down: TCP does not
    notice, and gloo/NCCL collectives wait 10-30 minutes), when its launcher ends without `bye`
    (killed, or the node rebooted), or when it never reports (`startup` seconds). After a `bye`,
    or once the job is ending (`ending`), nothing more counts as lost: the step is over."""

    def __init__(
        self, hosts: Sequence[str], timeout: float, port: int, startup: float | None = None
    ) -> None:
        self.hosts = list(hosts)
        self.timeout = timeout
        self.startup = startup if startup is not None else max(120.0, 5 * timeout)
        self.sock = socket.create_server(("", port))
        self.port = port
        self.t0 = time.monotonic()
        self.last: dict[int, float] = {}
        self.said_bye: dict[int, int] = {}  # node rank -> exit code of its launcher
        self.lost: str | None = None
        self.ending = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._monitor, daemon=True).start()

    def _host(self, rank: int) -> str:
        return self.hosts[rank] if 0 <= rank < len(self.hosts) else f"node rank {rank}"

    def _lose(self, rank: int, why: str) -> None:
        with self.lock:
            if self.lost or self.ending or self.said_bye:
                return
            self.lost = f"node {self._host(rank)} (node rank {rank}) lost: {why}"
        log(f"{self.lost}; stopping the training processes of the other nodes")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        rank = None
        try:
            for line in conn.makefile("r", encoding="utf-8", newline="\n"):
                word, _, arg = line.strip().partition(" ")
                if word == "hello":
                    rank = int(arg)
                elif rank is None:
                    continue
                elif word == "bye":
                    with self.lock:
                        self.said_bye[rank] = int(arg)
                    return
                with self.lock:
                    self.last[rank] = time.monotonic()
                if word == "beat":
                    reply = f"stop {self.lost}" if self.lost else "ok"
                    conn.sendall((reply + "\n").encode())
        except (OSError, ValueError):
            pass
        finally:
            conn.close()
            if rank is not None and rank not in self.said_bye:
                self._lose(
                    rank, "its launcher ended without a word (killed, or the node went down)"
                )

    def _monitor(self) -> None:
        while not (self.lost or self.ending):
            time.sleep(min(1.0, beat_period(self.timeout) / 2))
            now = time.monotonic()
            for rank in range(len(self.hosts)):
                with self.lock:
                    last, gone = self.last.get(rank), rank in self.said_bye
                if gone:
                    continue
                if last is None and now - self.t0 > self.startup:
                    self._lose(
                        rank,
                        f"its launcher did not report within {self.startup:.0f} s of the start",
                    )
                elif last is not None and now - last > self.timeout:
                    self._lose(
                        rank,
                        f"not heard from for {now - last:.0f} s (the node or its "
                        "network is down; MEGAMOE_NODE_TIMEOUT_S="
                        f"{self.timeout:g})",
                    )

    def refused(self) -> list[str]:
        """The nodes whose launcher refused to start (exit code 2: its pre-flight check)."""
        with self.lock:
            return [self._host(r) for r, code in sorted(self.said_bye.items()) if code == 2]

    def others_ended(self) -> bool:
        """Every node but the lost one has said bye (its launcher has ended)."""
        with self.lock:
            return len(self.said_bye) >= len(self.hosts) - 1

    def close(self) -> None:
        self.ending = True
        try:
            self.sock.close()
        except OSError:
            pass


class NodeBeat:
    """A node launcher's side of NodeWatch: beats from a thread; when the batch launcher says a
    node is lost, or cannot be reached for `timeout` seconds, this node's training processes are
    killed and the launcher exits 1 (a collective with a lost node would otherwise wait for its
    10-30 minute timeout)."""

    def __init__(self, address: str, rank: int, timeout: float, label: str) -> None:
        host, _, port = address.rpartition(":")
        self.addr = (host, int(port))
        self.rank = rank
        self.timeout = timeout
        self.label = label  # "mmnode2 (node rank 1)"
        self.done = False
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        period = beat_period(self.timeout)
        last_ok = time.monotonic()
        buf = b""
        while not self.done:
            sent = time.monotonic()
            try:
                with self.lock:
                    if self.sock is None:
                        self.sock = socket.create_connection(self.addr, timeout=period)
                        self.sock.sendall(f"hello {self.rank}\n".encode())
                        buf = b""
                    sock = self.sock
                    sock.sendall(b"beat\n")
                while b"\n" not in buf and time.monotonic() < sent + period:
                    sock.settimeout(max(0.05, sent + period - time.monotonic()))
                    try:
                        chunk = sock.recv(4096)
                    except TimeoutError:
                        break
                    if not chunk:
                        raise ConnectionError("the batch launcher closed the connection")
                    buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"stop "):
                        return self._stop(line[5:].decode(errors="replace"))
                    last_ok = time.monotonic()
            except OSError:
                with self.lock:
                    if self.sock is not None:
                        self.sock.close()
                    self.sock = None
            if self.done:
                return
            if time.monotonic() - last_ok > self.timeout:
                return self._stop(
                    f"the batch node {self.addr[0]} has not answered for "
                    f"{time.monotonic() - last_ok:.0f} s (that node or this node's "
                    "network is down)"
                )
            time.sleep(max(0.0, sent + period - time.monotonic()))

    def _stop(self, reason: str) -> None:
        if self.done:  # torchrun has ended already: its exit code stands
            return
        log(f"{self.label}: stopping this node's training processes: {reason}")
        import psutil

        procs = []
        for child in psutil.Process().children(recursive=False):
            try:
                if "megamoe.lifetime" not in " ".join(child.cmdline()):
                    child.kill()
                    procs.append(child)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
        self.close(1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # torchrun's agent may wait on a store that lived on the lost node

    def close(self, code: int) -> None:
        """torchrun has ended with `code`: say goodbye (nothing more is a lost node)."""
        with self.lock:
            self.done = True
            if self.sock is not None:
                try:
                    self.sock.settimeout(2.0)
                    self.sock.sendall(f"bye {code}\n".encode())
                    self.sock.close()
                except OSError:
                    pass
                self.sock = None


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _preflight(train_argv: list[str]) -> None:
    """The checklist of `megamoe check` on these flags: errors refuse, warnings are printed."""
    from .checklist import check_flags

    report = check_flags(train_argv, env=dict(os.environ))
    for line in report.lines(only_problems=True):
        log(line)
    if report.errors:
        raise LaunchError(
            "refusing to start: the pre-flight check found errors (above); fix "
            "them or set MEGAMOE_SKIP_CHECK=1"
        )


def default_omp_threads(env: Mapping[str, str], nproc_per_node: int) -> int:
    """OMP_NUM_THREADS for each training process when the user sets none: the node's CPUs
    (SLURM_CPUS_PER_TASK of the task, or this machine's) shared by its processes (torchrun's own
    default is 1, which starves CPU runs)."""
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or 0) or (os.cpu_count() or 1)
    return max(1, cpus // max(1, nproc_per_node))


def catches_signal(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux /proc SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


class _ChildForwarder:
    """Pass SIGUSR1 on to our direct children (the training processes torchrun started), each
    once per request, as soon as it has installed a handler for it (a process still importing
    would die of it). Helper processes further down (data loaders, checkpoint writers) are
    never signalled."""

    def __init__(self, label: str | None = None) -> None:
        self.pending = threading.Event()
        self.sent: set[int] = set()
        self.label = label  # a node of a multi-node job says so in the log
        threading.Thread(target=self._loop, daemon=True).start()

    def __call__(self, signum, frame) -> None:
        self.sent.clear()
        self.pending.set()

    def _loop(self) -> None:
        import psutil

        while True:
            self.pending.wait()
            for child in psutil.Process().children(recursive=False):
                if child.pid not in self.sent and catches_signal(child.pid, signal.SIGUSR1):
                    try:
                        child.send_signal(signal.SIGUSR1)
                        self.sent.add(child.pid)
                        if self.label:
                            log(f"{self.label}: SIGUSR1 to training process {child.pid}")
                    except psutil.Error:
                        pass
            time.sleep(0.5)


# The signal the batch launcher sends to the job step (scancel --signal=URG) to mean "SIGUSR1 to
# the training processes": its default action is to do nothing, so the processes of the step
# that do not handle it (torchrun's helpers, data loader workers, checkpoint writer processes)
# are unaffected, whereas a step-wide SIGUSR1 would kill them.
STEP_SIGNAL = signal.SIGURG


def _run_torchrun(args: list[str], in_slurm_step: bool, label: str | None = None) -> int:
    """torchrun in this process (what the `torchrun` command calls).

    SIGUSR1 to this process, or (in a Slurm step) SIGURG from the batch launcher, is passed on
    to the training processes only (_ChildForwarder). A SIGUSR1 that Slurm delivers to the whole
    step (sbatch --signal=USR1 without B:) is ignored here, and by the training processes while
    they start (an ignored signal stays ignored across exec) until the trainer installs its
    handler."""
    forward = _ChildForwarder(label)
    if in_slurm_step:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(STEP_SIGNAL, forward)
    else:
        signal.signal(signal.SIGUSR1, forward)
    from torch.distributed import run as torchrun

    try:
        torchrun.main(args)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # ChildFailedError: torchrun printed the failure report
        log(f"training failed: {type(e).__name__}")
        return 1
    return 0


class _BatchSignals:
    """The batch script's signal handling, installed first thing (before any slow import).

    SIGUSR1 (sbatch --signal=B:USR1@T) becomes `scancel --signal=URG <job>`: every process of
    the job step receives SIGURG, which only our per-node launchers act on (they send SIGUSR1 to
    their training processes). It is repeated every `repeat` seconds until the step ends, so
    that training processes still starting hear it too. SIGTERM (scancel, time limit) reaches
    the step from Slurm directly; it is only recorded here."""

    def __init__(self, repeat: float = 30.0) -> None:
        self.got: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.watch: NodeWatch | None = None
        self.requeued = False  # then Slurm's SIGTERM to this script is expected
        self.repeat = repeat
        self.last_sent = 0.0
        signal.signal(signal.SIGUSR1, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame) -> None:
        self.got.append(signum)
        if signum == signal.SIGUSR1:
            log(
                "SIGUSR1 (preemption or time-limit warning): asking the trainer to checkpoint "
                "and stop"
            )
            self.forward()
        else:
            if self.watch is not None:  # the step is being ended: nodes going away are not lost
                self.watch.ending = True
            if not self.requeued:
                log(f"signal {signum}: waiting for the training processes to stop")

    @property
    def usr1(self) -> bool:
        return signal.SIGUSR1 in self.got

    def forward(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.last_sent = time.monotonic()
            job = os.environ.get("SLURM_JOB_ID", "")
            try:
                subprocess.Popen(
                    ["scancel", f"--signal={STEP_SIGNAL.name[3:]}", job], stdout=subprocess.DEVNULL
                )
            except OSError as e:
                log(f"cannot run scancel ({e}): the trainer is not told to stop")

    def wait(self, proc: subprocess.Popen) -> int:
        """srun's exit code. Once a node is lost, srun is killed when the other nodes' launchers
        have ended (they stop their training processes on their next beat), or after a grace
        period: it would wait for the lost node's tasks until Slurm declares that node down."""
        self.proc = proc
        if self.usr1:
            self.forward()
        lost_at = None
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if self.usr1 and time.monotonic() - self.last_sent >= self.repeat:
                    self.forward()
                if self.watch is not None and self.watch.lost:
                    lost_at = lost_at or time.monotonic()
                    # srun waits for the lost node's tasks until Slurm declares that node down
                    grace = (
                        3.0
                        if self.watch.others_ended()
                        else (2 * beat_period(self.watch.timeout) + 10)
                    )
                    if time.monotonic() - lost_at > grace:
                        log("killing srun: it waits for the lost node")
                        proc.kill()


def _run_srun(p: Plan, sig: _BatchSignals) -> int:
    env = dict(os.environ)
    env.update(p.env)
    rc = sig.wait(subprocess.Popen(p.argv, env=env))
    output_dir = trainer_options(p.train_argv).train.output_dir
    watch = sig.watch
    if watch is not None:
        watch.close()
    if watch is not None and watch.lost:
        job = os.environ.get("SLURM_JOB_ID", "")
        newest = newest_checkpoint(output_dir)
        log(
            f"job {job} failed: {watch.lost}; the newest complete checkpoint is "
            f"{newest or '(none yet)'}"
        )
        if _truthy(os.environ.get("MEGAMOE_NO_REQUEUE")):
            log(f"MEGAMOE_NO_REQUEUE=1: not requeueing job {job}; {_resubmit(output_dir)}")
        else:
            log(
                f"requeueing job {job}: it restarts on nodes that answer and resumes from "
                f"{newest or 'the start'}"
            )
            sig.requeued = True
            r = subprocess.run(["scontrol", "requeue", job])
            if r.returncode != 0:
                log(
                    f"scontrol requeue {job} failed (submit with --requeue); {_resubmit(output_dir)}"
                )
        return rc or 1
    if watch is not None and rc != 0 and watch.refused():
        log(
            f"refusing to start: {', '.join(watch.refused())} refused (above); fix that node or "
            "leave it out (sbatch --exclude=NODE)"
        )
        return 2
    if sig.usr1 and rc == 0 and not training_finished(output_dir):
        job = os.environ.get("SLURM_JOB_ID", "")
        if _truthy(os.environ.get("MEGAMOE_NO_REQUEUE")):
            log(
                f"stopped on SIGUSR1; MEGAMOE_NO_REQUEUE=1: not requeueing job {job}; "
                f"{_resubmit(output_dir)}"
            )
        else:
            log(
                f"stopped on SIGUSR1 with a checkpoint in {output_dir}: requeueing job {job}; it "
                "resumes from that checkpoint"
            )
            r = subprocess.run(["scontrol", "requeue", job])
            if r.returncode != 0:
                log(
                    f"scontrol requeue {job} failed (submit with --requeue); {_resubmit(output_dir)}"
                )
    elif sig.usr1 and rc == 0:
        log("training finished")
    return rc


def _resubmit(output_dir: str) -> str:
    """How to go on when the job is not requeued: the same script into the same directory."""
    return f"resubmit the script with output_dir={output_dir} to resume"


def _start_watch(p: Plan, env: Mapping[str, str]) -> NodeWatch:
    """The batch launcher's NodeWatch of a multi-node job, on the first free port after the
    rendezvous port; its address and the batch node's software_manifest() go to every node."""
    timeout = node_timeout(env)
    hosts = scontrol_hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    addr, master = p.env["MEGAMOE_MASTER_ADDR"], int(p.env["MEGAMOE_MASTER_PORT"])
    for port in range(master + 1, min(master + 64, 65536)):
        try:
            watch = NodeWatch(hosts[: p.nnodes], timeout, port)
            break
        except OSError:
            continue
    else:
        raise LaunchError(
            f"no free port in {master + 1}..{master + 63} on {socket.gethostname()} "
            "for the node watch; set MASTER_PORT"
        )
    p.env["MEGAMOE_WATCH"] = f"{addr}:{watch.port}"
    p.env["MEGAMOE_SOFTWARE"] = json.dumps(software_manifest(), separators=(",", ":"))
    return watch


def main(argv: Sequence[str] | None = None, prog: str = "megamoe launch") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    env = dict(os.environ)
    sig = beat = None
    node_rank = int(env.get("SLURM_NODEID", "0") or 0)
    label = f"{socket.gethostname()} (node rank {node_rank})"
    if in_allocation(env) and not in_step(env):
        sig = _BatchSignals(float(env.get("MEGAMOE_SIGNAL_REPEAT_S") or 30))
    elif in_step(env) and env.get("MEGAMOE_WATCH"):
        # first thing, so that a node slow to import is not taken for a lost one
        try:
            timeout = node_timeout(env)
        except LaunchError:  # the batch launcher said so and did not start this step
            timeout = NODE_TIMEOUT_S
        beat = NodeBeat(env["MEGAMOE_WATCH"], node_rank, timeout, label)
    rc = 1
    try:
        rc = _launch(argv, env, sig, label)
        return rc
    finally:
        if beat is not None:  # said on every way out: a node that ends is not a lost one
            beat.close(rc)


def _launch(argv: list[str], env: dict[str, str], sig: _BatchSignals | None, label: str) -> int:
    python = env.get("MEGAMOE_PYTHON") or sys.executable
    try:
        p = plan(argv, env, python=python)
        if p.mode != "node" and not _truthy(env.get("MEGAMOE_SKIP_CHECK")):
            _preflight(p.train_argv)
        if p.mode == "srun" and p.nnodes > 1:
            assert sig is not None
            sig.watch = _start_watch(p, env)
    except LaunchError as e:
        print(f"{PREFIX} {e}", file=sys.stderr, flush=True)
        return 2
    first = p.mode != "node" or env.get("SLURM_NODEID", "0") == "0"
    if p.mode != "node":  # the batch launcher already said them
        for n in p.notes:
            log(n)
    od = trainer_options(p.train_argv).train.output_dir
    if p.mode == "srun":
        log(
            f"job {env.get('SLURM_JOB_NAME')} ({env.get('SLURM_JOB_ID')}"
            + (f", restart {env['SLURM_RESTART_COUNT']}" if env.get("SLURM_RESTART_COUNT") else "")
            + f"): {p.nnodes} node(s) x {p.nproc_per_node} process(es); rendezvous "
            f"{p.env['MEGAMOE_MASTER_ADDR']}:{p.env['MEGAMOE_MASTER_PORT']}"
        )
        assert sig is not None
        if sig.watch is not None:
            log(
                f"node watch on {p.env['MEGAMOE_WATCH']}: a node not heard from for "
                f"{sig.watch.timeout:g} s is lost (MEGAMOE_NODE_TIMEOUT_S); every node checks its "
                "software and files before it starts"
            )
        log(f"output_dir: {od}  (tensorboard --logdir {od}/runs)")
        log("$ " + shlex.join(p.argv))
        return _run_srun(p, sig)
    if p.mode == "local":
        log(f"outside Slurm: torchrun on this machine, {p.nproc_per_node} process(es)")
        log(f"output_dir: {od}  (tensorboard --logdir {od}/runs)")
    if p.mode == "node" and p.nnodes > 1:
        rdzv = ":".join(p.argv[p.argv.index(k) + 1] for k in ("--master_addr", "--master_port"))
        log(f"{label}: {p.nproc_per_node} process(es), rendezvous {rdzv}")
        skip = _truthy(env.get("MEGAMOE_SKIP_CHECK"))
        problems = [] if skip else node_preflight(p.train_argv, env)
        if problems:
            for problem in problems:
                print(
                    f"{PREFIX} {label}: refusing to start: {problem}", file=sys.stderr, flush=True
                )
            return 2
    for k in ("MEGAMOE_SOFTWARE", "MEGAMOE_WATCH"):  # the launchers' business, not the trainer's
        os.environ.pop(k, None)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(default_omp_threads(env, p.nproc_per_node))
    if first:
        log(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} $ torchrun " + shlex.join(p.argv))
    return _run_torchrun(
        p.argv,
        in_slurm_step=p.mode == "node",
        label=label if p.mode == "node" and p.nnodes > 1 else None,
    )


if __name__ == "__main__":
    sys.exit(main())
