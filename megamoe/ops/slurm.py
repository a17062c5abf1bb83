"""What a Slurm job is, read from its environment (inside a job) or its #SBATCH header (a
script not yet submitted). Pure functions of strings; `scontrol` is asked only to expand a node
list, with a fallback of our own when it is not installed."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Mapping


def in_allocation(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def in_step(env: Mapping[str, str]) -> bool:
    """True inside an srun task (the batch script itself has no SLURM_STEP_ID)."""
    return (
        in_allocation(env)
        and bool(env.get("SLURM_STEP_ID"))
        and env.get("SLURM_STEP_ID") not in ("batch", "extern", "4294967294", "4294967291")
    )


def slurm_nnodes(env: Mapping[str, str]) -> int | None:
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key):
            return int(env[key])
    return None


def count_gres(spec: str, all_gpus: bool = False) -> int | None:
    """'8' | 'gpu:8' | 'gpu:h100:8' | 'gpu:8(IDX:0-7)' | 'gpu:a:4,gpu:b:4' -> number of GPUs.
    all_gpus: every entry is a GPU count ('h100:4', as in --gpus-per-node)."""
    total, found = 0, False
    for part in spec.split(","):
        part = re.sub(r"\(.*?\)", "", part.strip())
        if not part:
            continue
        fields = part.split(":")
        if len(fields) >= 2 and fields[0] != "gpu" and not all_gpus:
            continue  # another gres type
        try:
            total += int(fields[-1])
            found = True
        except ValueError:
            if len(fields) >= 2:  # 'gpu:h100' with no count = 1
                total += 1
                found = True
    return total if found else None


def slurm_gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs the job has on each node, or None when the job asked for none (no --gres/--gpus*).

    SLURM_GPUS_ON_NODE (set by recent Slurm for gres jobs), else SLURM_JOB_GPUS / SLURM_STEP_GPUS
    (comma-separated indices), else SLURM_GPUS_PER_NODE ('8' or 'gpu:8'), else
    SLURM_JOB_GRES / SLURM_TRES_PER_NODE ('gpu:8' or 'gres/gpu:8')."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(key):
            return len([x for x in env[key].split(",") if x.strip()])
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_JOB_GRES", "SLURM_TRES_PER_NODE"):
        if env.get(key):
            n = count_gres(
                env[key].replace("gres/", "").replace("gres:", ""),
                all_gpus=key == "SLURM_GPUS_PER_NODE",
            )
            if n is not None:
                return n
    return None


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x for x in (o.strip() for o in out) if x]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm hostlist expression -> host names ('n[01-03,7],m1' -> n01 n02 n03 n7 m1).
    Used when `scontrol show hostnames` is not available."""
    hosts: list[str] = []
    for item in _split_top(nodelist):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        names = []
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                names += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                names.append(prefix + r)
        tails = expand_nodelist(rest) if rest else [""]
        hosts += [n + t for n in names for t in tails]
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str]:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)


def parse_sbatch_header(text: str) -> dict[str, str]:
    """#SBATCH options of a script, as sbatch reads them: lines before the first command.
    Short options are mapped to long names (-N nodes, -J job-name, -o output, -e error,
    -p partition, -c cpus-per-task, -n ntasks, -t time)."""
    short = {
        "N": "nodes",
        "J": "job-name",
        "o": "output",
        "e": "error",
        "p": "partition",
        "c": "cpus-per-task",
        "n": "ntasks",
        "t": "time",
        "G": "gpus",
    }
    opts: dict[str, str] = {}
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if i == 0 and line.startswith("#!"):
            continue
        if not line or (line.startswith("#") and not line.startswith("#SBATCH")):
            continue
        if not line.startswith("#SBATCH"):
            break  # sbatch stops at the first command
        rest = line[len("#SBATCH") :].strip()
        rest = rest.split(" #", 1)[0].strip()
        try:
            toks = shlex.split(rest)
        except ValueError:
            toks = rest.split()
        j = 0
        while j < len(toks):
            t = toks[j]
            if t.startswith("--"):
                if "=" in t:
                    k, v = t[2:].split("=", 1)
                elif j + 1 < len(toks) and not toks[j + 1].startswith("-"):
                    k, v = t[2:], toks[j + 1]
                    j += 1
                else:
                    k, v = t[2:], ""
                opts[k] = v
            elif t.startswith("-") and len(t) >= 2:
                k = short.get(t[1], t[1])
                if len(t) > 2:
                    v = t[2:].lstrip("=")
                elif j + 1 < len(toks):
                    v = toks[j + 1]
                    j += 1
                else:
                    v = ""
                opts[k] = v
            j += 1
    return opts


def sbatch_nodes_gpus(sbatch: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(--nodes, GPUs per node from --gres/--gpus-per-node) of an #SBATCH header."""
    nodes = None
    if sbatch.get("nodes"):
        try:
            nodes = int(str(sbatch["nodes"]).split("-")[0])
        except ValueError:
            pass
    gpus = None
    gres = sbatch.get("gres")
    if gres and gres != "none":
        gpus = count_gres(gres)
    elif sbatch.get("gpus-per-node"):
        gpus = count_gres(sbatch["gpus-per-node"], all_gpus=True)
    return nodes, gpus


def job_shape(
    num_nodes: int | None,
    num_gpu_per_node: int | None,
    job_nodes: int,
    job_gpus: int | None,
    where: str,
    allow_cpu: bool,
) -> tuple[int, int | None, list]:
    """The guide's rule that num_nodes equals the job's nodes and num_gpu_per_node its GPUs per
    node, for a job seen from its #SBATCH header or from inside it (`where` says which, e.g.
    "#SBATCH --nodes=14"). Returns (nodes, processes per node or None, findings); a flag left
    out takes the job's value."""
    from ..findings import error

    out = []
    if num_nodes is None:
        num_nodes = job_nodes
    elif num_nodes != job_nodes:
        out.append(
            error(
                "num_nodes",
                f"num_nodes={num_nodes} but the job has {job_nodes} node(s) ({where})",
                f"set num_nodes={job_nodes} in the script, or "
                f"#SBATCH --nodes={num_nodes} (the two must be equal)",
            )
        )
    if job_gpus is None:
        want = num_gpu_per_node if num_gpu_per_node else "N"
        if not allow_cpu:
            out.append(
                error(
                    "num_gpu_per_node",
                    "the job has no GPUs (no --gres=gpu:N)",
                    f"add #SBATCH --gres=gpu:{want} to match num_gpu_per_node="
                    f"{num_gpu_per_node}, or, on a CPU-only cluster, set "
                    "MEGAMOE_ALLOW_CPU=1 to run num_gpu_per_node processes per node on "
                    "CPUs",
                )
            )
        elif num_gpu_per_node is None:
            out.append(
                error(
                    "num_gpu_per_node",
                    "num_gpu_per_node is not given and the job has no GPUs",
                    "set num_gpu_per_node (the number of CPU processes per node)",
                )
            )
    elif num_gpu_per_node is None:
        num_gpu_per_node = job_gpus
    elif num_gpu_per_node != job_gpus:
        out.append(
            error(
                "num_gpu_per_node",
                f"num_gpu_per_node={num_gpu_per_node} but the job has "
                f"{job_gpus} GPU(s) per node (#SBATCH --gres=gpu:{job_gpus})",
                f"set num_gpu_per_node={job_gpus} in the script, or #SBATCH "
                f"--gres=gpu:{num_gpu_per_node} (the two must agree)",
            )
        )
    if num_gpu_per_node is not None and num_gpu_per_node < 1:
        out.append(
            error("num_gpu_per_node", f"num_gpu_per_node={num_gpu_per_node} must be at least 1")
        )
    return num_nodes, num_gpu_per_node, out
