"""The guide's sbatch scripts on a real multi-node Slurm, with failures.

scripts/slurm/multinode_slurm.sh makes three nodes on this machine, each a network namespace
with its own address (10.213.78.11-13), hostname (mtnode1-3) and /etc/hosts, its own slurmd,
spool and log; slurmctld lives in a namespace of its own that holds the bridge and is the login
node; munged is our own. Jobs go the users' way: sbatch on the login node -> scripts/cpt/*.sh ->
scripts/launch.sh -> srun, one task per node -> torchrun -> megamoe.train, a tiny LLaMA-MoE on
one CPU process per node (gloo across the namespaces; MEGAMOE_ALLOW_CPU=1). What the tests prove:

* a node whose software differs from the batch node's, and that does not see the data, refuses
  before anything trains, naming itself, the file and the flag;
* fpt.sh on 2 nodes (DP across them) has, step by step, the losses of a one-node run of the same
  global batch; preempted by the --signal warning, every node's trainer hears it, the ranks save
  one checkpoint, the job requeues and resumes: the losses stay exactly those of the one-node run;
* the dynamic-data-selection script with EP=2 across the 2 nodes: losses and the domain weights
  its evaluations choose equal those of EP=2 on one node;
* a node whose cable is cut mid-run: the other node's ranks are stopped within the node timeout
  set by the launcher (MEGAMOE_NODE_TIMEOUT_S, not gloo's 30 minutes), the job log names the lost
  node, the job requeues, its last complete checkpoint is unchanged, and the requeued job resumes
  from it on the nodes that answer; then the job's processes on one of those nodes are killed:
  that node is lost at once and the job requeues again.

One cluster serves the module (started fresh, stopped at the end, leftovers of a killed run
removed first). Skipped only where this machine cannot run it (not Linux, not root, no network
namespaces, no Slurm and no apt); MEGAMOE_REQUIRE_SLURM=1 turns those skips into failures.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import wait_gone
from tests.integration.slurm_common import (
    CPU_JOB,
    TERMINAL,
    cannot,
    clean_env,
    job_processes,
    log_of,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
MN = ROOT / "scripts" / "slurm" / "multinode_slurm.sh"
FPT = ROOT / "scripts" / "cpt" / "fpt.sh"
DDS = ROOT / "scripts" / "cpt" / "dynamic_data_selection" / "sheared_llama_112gpus.sh"
PYTHON = sys.executable
# Not the names and subnet of a cluster started by hand with the script's defaults.
MN_ENV = {
    "MEGAMOE_MN_DIR": os.environ.get("MEGAMOE_MN_TEST_DIR", "/tmp/megamoe-mnslurm-test"),
    "MEGAMOE_MN_NODES": "3",
    "MEGAMOE_MN_NET": "10.213.78",
    "MEGAMOE_MN_PREFIX": "mt",
}
NODE_TIMEOUT = 6.0  # MEGAMOE_NODE_TIMEOUT_S of these jobs


class Cluster:
    """The running cluster: commands on its login node and nodes, jobs, and where a process
    lives."""

    def __init__(self) -> None:
        self.dir = Path(MN_ENV["MEGAMOE_MN_DIR"])
        self.conf = self.dir / "slurm.conf"
        self.names = [f"mtnode{i}" for i in range(1, 4)]

    def env(self, extra: dict | None = None) -> dict:
        """This process's environment without any outer Slurm job's or torch.distributed's
        variables, pointed at this cluster."""
        env = clean_env()
        env.update(MN_ENV, SLURM_CONF=str(self.conf))
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def script(
        self,
        *args: str,
        timeout: float = 60,
        env: dict | None = None,
        cwd: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            ["bash", str(MN), *args],
            env=env or self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert not check or r.returncode == 0, f"multinode_slurm.sh {args}: {r.stdout}{r.stderr}"
        return r

    def login(self, *args: str, **kw) -> str:
        return self.script("login", *args, **kw).stdout

    def on(self, node: int, *args: str, **kw) -> str:
        return self.script("on", str(node), *args, **kw).stdout

    def sbatch(self, cwd: Path, script: Path, variables: dict, args: list[str]) -> str:
        env = self.env(
            {
                "MEGAMOE_ROOT": ROOT,
                "MEGAMOE_PYTHON": PYTHON,
                "MEGAMOE_ALLOW_CPU": 1,
                "OMP_NUM_THREADS": 1,
                "MEGAMOE_NODE_TIMEOUT_S": NODE_TIMEOUT,
                **variables,
            }
        )
        out = self.script("login", "sbatch", "--parsable", *args, str(script), env=env, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job(self, jid: str) -> dict:
        out = self.script("login", "scontrol", "-o", "show", "job", jid, check=False).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait(self, jid: str, timeout: float, until=None) -> dict:
        """Poll until the job ends (or `until(info)` holds)."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(jid)
            if (until is not None and until(info)) or info.get("JobState") in TERMINAL:
                return info
            time.sleep(0.5)
        self.script("login", "scancel", jid, check=False)
        raise AssertionError(f"job {jid} not there in {timeout:.0f}s: {info}\n{log_of(info)}")

    def release(self, jid: str) -> None:
        """Start a requeued job now rather than after Slurm's hold (BeginTime = requeue + the
        credential lifetime). Not within the second of the requeue: the job's credentials were
        revoked then, and a start in that second is refused ("Job credential revoked")."""
        self.wait(jid, 60, until=lambda i: i.get("JobState") == "PENDING")
        time.sleep(2)
        r = self.script("login", "scontrol", "update", f"JobId={jid}", "StartTime=now", check=False)
        assert r.returncode == 0 or "no longer pending" in r.stderr, r.stderr  # started already

    def hostnames(self, nodelist: str) -> list[str]:
        return self.login("scontrol", "show", "hostnames", nodelist).split()

    def node_of(self, pid: int) -> str:
        """The node a process runs on: the one whose UTS namespace it shares."""
        uts = os.readlink(f"/proc/{pid}/ns/uts")
        for name in self.names:
            holder = (self.dir / "run" / f"{name}.holder").read_text().strip()
            if os.readlink(f"/proc/{holder}/ns/uts") == uts:
                return name
        return "?"

    def node_state(self, name: str) -> str:
        return self.login("sinfo", "-h", "-N", "-n", name, "-o", "%T").strip()

    def restore(self) -> None:
        """No job left, every cable plugged, every node back in service and idle (after a fault
        test, whatever it left)."""
        self.login("scancel", "--user=root", check=False)
        for i in range(1, 4):
            self.script("mend", str(i))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = {n: self.node_state(n) for n in self.names}
            if all(s == "idle" for s in states.values()):
                return
            for n, s in states.items():
                if s.startswith(("down", "drain")):
                    self.login("scontrol", "update", f"NodeName={n}", "State=RESUME", check=False)
            time.sleep(1)
        raise AssertionError(f"nodes not idle again: {states}")


@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux"):
        cannot("Slurm and network namespaces need Linux")
    if os.geteuid() != 0:
        cannot("network namespaces and slurmd need root")
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            cannot(f"{tool} not found (iproute2, util-linux)")
    if (
        subprocess.run(
            ["unshare", "--net", "--uts", "--mount", "true"], capture_output=True
        ).returncode
        != 0
    ):
        cannot("cannot create network namespaces here (unshare --net failed)")
    installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not shutil.which("apt-get"):
        cannot("Slurm is not installed and apt-get is not available to install it")
    if not installed:
        r = subprocess.run(
            ["bash", str(ROOT / "scripts/slurm/install_slurm.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode != 0:
            cannot(
                "could not install slurm-wlm/munge with apt-get: "
                + (r.stderr or r.stdout).strip()[-800:]
            )
    with fresh_cluster() as c:
        yield c


@contextlib.contextmanager
def fresh_cluster():
    """The test cluster, started fresh (leftovers of a killed session removed first) and stopped
    on any exit; one session at a time owns its names and subnet (a lock file)."""
    c = Cluster()
    with open(f"{c.dir}.lock", "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{c.dir}.lock held by another session"
                time.sleep(2)
        try:
            c.script("stop", timeout=120)
            c.script("start", timeout=180)
            yield c
        finally:
            c.script("stop", timeout=120, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cluster):
    """A tiny LLaMA-MoE (4 experts, top-2), its tokenizer, three tiny domains for fpt.sh and
    the seven SlimPajama domains (same texts generator) for the dynamic-data-selection script,
    whose prob_map and reference losses name them."""
    sys.path.insert(0, str(ROOT / "tests" / "launch"))
    import tiny_setup

    root = Path(tiny_setup.ensure(tmp_path_factory.getbasetemp() / "tiny-run", cluster.env()))
    sp = tmp_path_factory.getbasetemp() / "tiny-slimpajama"
    if not (sp / "done").exists():
        from megamoe.data.domains import DOMAINS

        names, tiny_setup.DOMAINS = tiny_setup.DOMAINS, list(DOMAINS)
        try:
            tiny_setup.write_domains(str(sp / "train"), 0)
            tiny_setup.write_domains(str(sp / "valid"), 1)
        finally:
            tiny_setup.DOMAINS = names
        (sp / "done").touch()
    return root, sp


def fpt_vars(tiny, nodes: int, per_node: int, steps: int, **kw) -> dict:
    """fpt.sh's variables for a tiny CPU run: `nodes` x `per_node` processes x 2 sequences of 32
    tokens per step, `steps` steps."""
    root = tiny[0]
    v = dict(
        pretrained_model=root / "model",
        tokenizer_model=root / "tok.model",
        dataset_dir=root / "train",
        validation_dir=root / "valid",
        prob_map="uniform",
        num_selects=2,
        scale_factor=2.0,
        block_size=32,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_tokens=steps * nodes * per_node * 64,
        warmup_steps=2,
        eval_steps=6,
        save_steps=6,
        save_total_limit=10,
        logging_steps=1,
        bf16="false",
        lr="3e-3",
        num_nodes=nodes,
        num_gpu_per_node=per_node,
        comment="tiny CPU job on the multi-node test cluster",
    )
    v.update(kw)
    return v


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if r["kind"] == "train"}


def trainers(jid: str) -> list[psutil.Process]:
    """The training processes of a job (torchrun's workers: python -m megamoe.train)."""
    out = []
    for pid in job_processes(jid):
        try:
            p = psutil.Process(pid)
            if "megamoe.train" in p.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


def tree(path: Path) -> dict:
    """{file: sha256} of everything under `path`, to compare before and after."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def wait_for(what: str, cond, timeout: float, job=None, cluster=None) -> float:
    """Poll `cond()` until true; returns when (monotonic). Fails early if the job ended."""
    deadline = time.monotonic() + timeout
    while not cond():
        if job is not None:
            info = cluster.job(job)
            assert info.get("JobState") not in TERMINAL, (what, info, log_of(info))
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)
    return time.monotonic()


def trains(out: Path, step: int = 1):
    log = out / "train.log"
    return lambda: log.is_file() and f"\nstep {step}/" in log.read_text()


def sigusr1_pending(p: psutil.Process) -> bool:
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            if (
                line.startswith(("ShdPnd:", "SigPnd:"))
                and int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1
            ):
                return True
    return False


class Clock:
    """Prints what happened when (pytest -s shows it; the start-up figures of RESULTS.md)."""

    def __init__(self, name: str) -> None:
        self.name, self.t0 = name, time.monotonic()

    def __call__(self, what: str) -> float:
        t = time.monotonic() - self.t0
        print(f"[{self.name} +{t:6.1f} s] {what}", flush=True)
        return t


@pytest.fixture
def submit_dir(tmp_path):
    (tmp_path / "logs").mkdir()  # the scripts' #SBATCH --output=logs/%x-%j.log
    return tmp_path


# ------------------------------------------------------------------------------------------------


def test_cluster_nodes_are_separate_hosts(cluster, submit_dir):
    """One task per node: each has its own hostname and address, and finds the others by name."""
    jid = cluster.login(
        "sbatch",
        "--parsable",
        "--nodes=3",
        "--output=hosts.txt",
        "--wrap",
        "srun -l bash -c 'echo $(hostname) $(getent hosts mtnode1)'",
        cwd=submit_dir,
    ).strip()
    info = cluster.wait(jid, 60)
    assert info["JobState"] == "COMPLETED", info
    lines = sorted((submit_dir / "hosts.txt").read_text().split("\n"))
    assert [x.split()[:3] for x in lines if x] == [
        ["0:", "mtnode1", "10.213.78.11"],
        ["1:", "mtnode2", "10.213.78.11"],
        ["2:", "mtnode3", "10.213.78.11"],
    ], lines


def test_node_with_other_software_and_no_data_is_refused(cluster, submit_dir, tiny, tmp_path):
    """mtnode2 runs a megamoe tree with one file changed and does not see dataset_dir (an empty
    mount point, as when the shared filesystem did not mount there): it refuses before any
    training process starts, naming itself, the file and the flag; the job fails with exit 2."""
    alt = tmp_path / "alt"
    shutil.copytree(ROOT / "megamoe", alt / "megamoe", ignore=shutil.ignore_patterns("__pycache__"))
    with open(alt / "megamoe" / "train" / "trainer.py", "a") as f:
        f.write("# a local edit on one node\n")
    data = str(tiny[0] / "train")
    before = tree(tiny[0])
    cluster.on(2, "mount", "--bind", str(alt / "megamoe"), str(ROOT / "megamoe"))
    try:
        cluster.on(2, "mount", "-t", "tmpfs", "-o", "size=1m", "megamoe-test-empty", data)
        try:
            jid = cluster.sbatch(
                submit_dir,
                FPT,
                fpt_vars(tiny, 2, 1, 4),
                ["--nodes=2", "--nodelist=mtnode1,mtnode2", *CPU_JOB],
            )
            info = cluster.wait(jid, 120)
        finally:
            cluster.on(2, "umount", data, check=False)
    finally:
        cluster.on(2, "umount", str(ROOT / "megamoe"), check=False)
    log = log_of(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert (
        "[megamoe.launch] mtnode2 (node rank 1): refusing to start: its software is not the "
        "batch node's: files not as on mtnode1: megamoe/train/trainer.py: install the same "
        "megamoe checkout and packages on every node"
    ) in log, log
    assert (
        f"[megamoe.launch] mtnode2 (node rank 1): refusing to start: data path: "
        f"--dataset_dir: {data} has no domain sub-folders"
    ) in log, log
    assert "mtnode1 (node rank 0): refusing" not in log
    assert "[megamoe.launch] refusing to start: mtnode2 refused (above)" in log
    out = submit_dir / "outputs" / f"cpt-moe-fpt-bs16-{jid}"
    assert not (out / "train.log").exists() and not list(out.glob("checkpoint-*"))
    assert tree(tiny[0]) == before  # the model and data, as every node sees them again
    assert not wait_gone(job_processes(jid), 20)
    assert cluster.on(2, "ls", data).split() == ["code", "noise", "prose"]  # unmounted again


def test_fpt_on_two_nodes_is_one_node_and_resumes_exactly(cluster, submit_dir, tiny):
    """fpt.sh, 12 steps of a global batch of 4 sequences: on one node (2 processes) and on two
    (1 process each, DP across the nodes) at the same time. The two-node run is preempted as
    `#SBATCH --signal=B:USR1@300` does it (its ranks paused first, so that the warning lands at
    a known step): both nodes' launchers pass SIGUSR1 on, every rank saves one checkpoint, the job
    requeues and resumes. Every step's loss equals the one-node run's, exactly."""
    steps = 12
    one = cluster.sbatch(submit_dir, FPT, fpt_vars(tiny, 1, 2, steps), ["--nodes=1", *CPU_JOB])
    two = cluster.sbatch(
        submit_dir,
        FPT,
        fpt_vars(tiny, 2, 1, steps, MEGAMOE_SIGNAL_REPEAT_S=5),
        ["--nodes=2", *CPU_JOB],
    )
    out1 = submit_dir / "outputs" / f"cpt-moe-fpt-bs16-{one}"
    out2 = submit_dir / "outputs" / f"cpt-moe-fpt-bs16-{two}"
    wait_for("the two-node run trains", trains(out2), 240, two, cluster)
    ranks = trainers(two)
    info = cluster.job(two)
    hosts = cluster.hostnames(info["NodeList"])
    assert len(hosts) == 2 and sorted(cluster.node_of(p.pid) for p in ranks) == sorted(hosts)
    for p in ranks:
        p.suspend()
    try:
        cluster.login("scancel", "--batch", "--signal=USR1", two)
        wait_for(
            "SIGUSR1 reaches the trainer on every node",
            lambda: all(sigusr1_pending(p) for p in ranks),
            60,
        )
    finally:
        for p in ranks:
            p.resume()
    info = cluster.wait(
        two, 120, until=lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING"
    )
    assert info.get("Restarts") == "1", (info, log_of(info))
    saved = {d.name: tree(d) for d in out2.glob("checkpoint-*")}  # the signal's among them
    cluster.release(two)
    info1, info2 = cluster.wait(one, 240), cluster.wait(two, 240)
    log1, log2 = log_of(info1), log_of(info2)
    assert info1["JobState"] == "COMPLETED", log1
    assert info2["JobState"] == "COMPLETED", log2
    # the launch path across nodes: one srun task per node, node ranks in Slurm's order
    assert f"torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0 --master_addr {hosts[0]} " in log2
    for rank, host in enumerate(hosts):
        assert (
            f"[megamoe.launch] {host} (node rank {rank}): 1 process(es), rendezvous "
            f"{hosts[0]}:" in log2
        )
        assert f"[megamoe.launch] {host} (node rank {rank}): SIGUSR1 to training process" in log2
    assert "processes: 2 = 2 node(s) x 1 per node; TP 1 PP 1 EP 1 DP 2" in log2
    assert "processes: 2 = 1 node(s) x 2 per node; TP 1 PP 1 EP 1 DP 2" in log1
    # one consistent checkpoint at the step where every rank stopped, and the resume from it
    stopped = [r for r in records(out2) if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR1", records(out2)
    k = stopped[0]["step"]
    assert 1 <= k < steps
    ckpt = out2 / f"checkpoint-{k}"
    assert tree(ckpt) == saved[ckpt.name]  # the resumed run read it, changed nothing
    from megamoe.checkpoint.layout import verify

    assert verify(ckpt) == [] and {f.name for f in ckpt.glob("rank_state_*.pt")} == {
        "rank_state_00000.pt",
        "rank_state_00001.pt",
    }
    assert f"resuming from {ckpt.relative_to(submit_dir)}: step {k}" in log2
    assert (
        f"stopped on SIGUSR1 with a checkpoint in {out2.relative_to(submit_dir)}: "
        f"requeueing job {two}" in log2
    )
    # the loss curve of two nodes, preempted and resumed, is the one-node run's
    l1, l2 = losses(out1), losses(out2)
    assert sorted(l1) == sorted(l2) == list(range(1, steps + 1))
    assert l2 == l1, {s: (l1[s], l2[s]) for s in l1 if l1[s] != l2[s]}
    assert not wait_gone(job_processes(one) + job_processes(two), 20)


def test_dynamic_data_selection_with_ep2_across_nodes(cluster, submit_dir, tiny):
    """scripts/cpt/dynamic_data_selection/sheared_llama_112gpus.sh (sheared_llama domain weights
    updated at each evaluation) with expert parallelism 2: the two experts' halves on two nodes
    (the token exchange crosses them) give the losses and the domain weights of EP=2 on one
    node, step by step."""
    steps, sp = 12, tiny[1]

    def dds_vars(nodes, per_node):
        return fpt_vars(
            tiny,
            nodes,
            per_node,
            steps,
            dataset_dir=sp / "train",
            validation_dir=sp / "valid",
            prob_map="llama",
            eval_steps=4,
            save_steps=12,
            expert_model_parallel_size=2,
        )

    one = cluster.sbatch(submit_dir, DDS, dds_vars(1, 2), ["--nodes=1", *CPU_JOB])
    two = cluster.sbatch(submit_dir, DDS, dds_vars(2, 1), ["--nodes=2", *CPU_JOB])
    info1, info2 = cluster.wait(one, 300), cluster.wait(two, 300)
    assert info1["JobState"] == "COMPLETED", log_of(info1)
    assert info2["JobState"] == "COMPLETED", log_of(info2)
    log2 = log_of(info2)
    assert "processes: 2 = 2 node(s) x 1 per node; TP 1 PP 1 EP 2 DP 2" in log2
    assert "torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0" in log2
    name = "cpt-llama-moe-16_4-dynamic-sheared-112gpus"
    out1 = submit_dir / "outputs" / f"{name}-{one}"
    out2 = submit_dir / "outputs" / f"{name}-{two}"
    assert losses(out1) == losses(out2) and len(losses(out1)) == steps
    w1 = [r["weights"] for r in records(out1) if r["kind"] == "eval"]
    w2 = [r["weights"] for r in records(out2) if r["kind"] == "eval"]
    assert len(w1) == 3 and w1 == w2
    assert w1[0] != w1[-1]  # the weights did move: the selection ran
    assert not wait_gone(job_processes(one) + job_processes(two), 20)


def test_lost_node_stops_the_job_in_bounded_time_and_it_resumes(cluster, submit_dir, tiny):
    """The cable of the second node of a running two-node job is cut. Within
    MEGAMOE_NODE_TIMEOUT_S (+ a beat and the kill) the first node's ranks are gone, and so are the
    cut-off node's own (its launcher loses the batch node); the job log names the lost node and
    the newest complete checkpoint, and the job requeues. Marked down (as an administrator or a
    health check would), the node is left out: the job restarts on the two nodes that answer,
    resumes from that checkpoint, which is byte for byte what it was when the job failed. Then
    every process of the job on one of those nodes is killed: that node is lost at once, the
    other's rank is stopped, the job requeues again."""
    clock = Clock("lost node")
    try:
        # no --nodelist: it would hold for the requeued job too
        jid = cluster.sbatch(
            submit_dir,
            FPT,
            fpt_vars(tiny, 2, 1, 3000, save_steps=5, eval_steps=1000),
            ["--nodes=2", *CPU_JOB],
        )
        out = submit_dir / "outputs" / f"cpt-moe-fpt-bs16-{jid}"
        wait_for(
            "a checkpoint",
            lambda: (out / "checkpoint-5" / "megamoe.json").is_file(),
            240,
            jid,
            cluster,
        )
        first, lost = cluster.hostnames(cluster.job(jid)["NodeList"])
        (spare,) = set(cluster.names) - {first, lost}
        ranks = {cluster.node_of(p.pid): p.pid for p in trainers(jid)}
        assert sorted(ranks) == sorted([first, lost]), ranks
        clock(f"{out.name}/checkpoint-5 written; cutting {lost}'s cable")
        cut = time.monotonic()
        cluster.script("cut", lost[len("mtnode") :])
        bound = NODE_TIMEOUT + 2 * max(0.5, NODE_TIMEOUT / 6) + 10
        left = wait_gone([ranks[first]], bound + 30)
        took = time.monotonic() - cut
        assert not left and took <= bound, f"{first}'s rank ended {took:.1f} s after the cut"
        clock(f"{first}'s rank gone, {took:.1f} s after the cut")
        assert not wait_gone([ranks[lost]], bound + 30 - took)  # and the cut-off node's own
        clock(f"{lost}'s rank gone")
        info = cluster.wait(jid, 60, until=lambda i: i.get("Restarts") == "1")
        clock("job requeued")
        log = log_of(info)
        assert info.get("Restarts") == "1", (info, log)
        assert f"[megamoe.launch] node {lost} (node rank 1) lost: not heard from for " in log, log
        from megamoe.checkpoint.layout import newest_checkpoint, verify

        newest = Path(newest_checkpoint(str(out)))
        assert verify(newest) == []
        rel = newest.relative_to(submit_dir)
        assert f"[megamoe.launch] job {jid} failed: node {lost} (node rank 1) lost" in log
        assert f"the newest complete checkpoint is {rel}" in log
        assert (
            f"[megamoe.launch] requeueing job {jid}: it restarts on nodes that answer and "
            f"resumes from {rel}" in log
        )
        before = tree(newest)
        # Slurm would mark it down after SlurmdTimeout; an administrator does it now
        cluster.login("scontrol", "update", f"NodeName={lost}", "State=DOWN", "Reason=cable cut")
        cluster.release(jid)
        step = int(newest.name.split("-")[1])
        wait_for(
            "the requeued job resumes",
            lambda: f"resuming from {rel}: step {step}" in log_of(info),
            240,
            jid,
            cluster,
        )
        clock(f"resumed from {newest.name}")
        assert tree(newest) == before
        info = cluster.job(jid)
        assert cluster.hostnames(info["NodeList"]) == sorted([first, spare]), info
        wait_for("a step after the resume", trains(out, step + 1), 120, jid, cluster)
        # now the other way to lose a node: every process of the job on it killed at once
        survivor = [p.pid for p in trainers(jid) if cluster.node_of(p.pid) == first]
        doomed = sorted(pid for pid in job_processes(jid) if cluster.node_of(pid) == spare)
        clock(f"killing the job's {len(doomed)} processes on {spare}")
        killed = time.monotonic()
        for pid in doomed:  # the launcher first (the oldest): as if the node went
            psutil.Process(pid).kill()
        assert not wait_gone(survivor, 15), f"{first}'s rank outlived {spare}'s processes"
        clock(f"{first}'s rank gone, {time.monotonic() - killed:.1f} s after the kill")
        info = cluster.wait(jid, 60, until=lambda i: i.get("Restarts") == "2")
        assert info.get("Restarts") == "2", (info, log_of(info))
        assert (
            f"[megamoe.launch] node {spare} (node rank 1) lost: its launcher ended without a "
            "word (killed, or the node went down)"
        ) in log_of(info)
        cluster.login("scancel", jid)
        info = cluster.wait(jid, 60)
        assert info["JobState"] == "CANCELLED", info
        clock("cancelled")
    finally:
        cluster.restore()
        clock("every node idle again")
    # nothing of the job is left on any node, the one that was cut off included
    assert not wait_gone(job_processes(jid), 30)
