"""The guide's sbatch scripts on a real Slurm: this machine as a one-node, CPU-only cluster.

The module installs Debian's slurm-wlm parts and munge when missing
(scripts/slurm/install_slurm.sh), starts munged, slurmctld and slurmd
(scripts/slurm/start_local_slurm.sh, idempotent) and stops them at the end if it started them.
Jobs are submitted with sbatch through scripts/cpt/fpt.sh, i.e. through scripts/launch.sh ->
srun -> torchrun -> python -m megamoe.train, with small overrides in the environment (the
scripts' variables: a tiny LLaMA-MoE and three tiny domains made by tests/launch/tiny_setup.py)
and `--gres=none --cpus-per-task=2` on the command line (this cluster has no GPUs; the launcher
is told so by MEGAMOE_ALLOW_CPU=1). Two processes train on CPU with gloo.

Skipped only where this machine cannot run Slurm (not Linux, not root, no apt and no Slurm);
MEGAMOE_REQUIRE_SLURM=1 turns those skips into failures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = Path(os.environ.get("MEGAMOE_SLURM_DIR", "/tmp/megamoe-slurm"))
SCRIPT = ROOT / "scripts" / "cpt" / "fpt.sh"
PYTHON = sys.executable


def _slurm_env(extra: dict | None = None) -> dict:
    """This process's environment without any outer Slurm job's variables, pointed at ours."""
    env = clean_env()
    env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def slurm():
    if not sys.platform.startswith("linux"):
        cannot("Slurm needs Linux")
    if os.geteuid() != 0:
        cannot("starting slurmd needs root (jobs run as their users)")
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
    env = _slurm_env()
    was_up = (
        subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True).stdout.count(
            "is UP"
        )
        > 0
    )
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/slurm/start_local_slurm.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, f"start_local_slurm.sh failed:\n{r.stdout}\n{r.stderr}"
    # A second start is a no-op (idempotent).
    r2 = subprocess.run(
        ["bash", str(ROOT / "scripts/slurm/start_local_slurm.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r2.returncode == 0 and "already running" in r2.stdout, r2.stdout + r2.stderr
    yield env
    if not was_up:
        subprocess.run(
            ["bash", str(ROOT / "scripts/slurm/stop_local_slurm.sh")], env=env, timeout=120
        )


def sbatch(env: dict, cwd: Path, args: list[str]) -> str:
    r = subprocess.run(
        ["sbatch", "--parsable", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"sbatch {args} failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_info(env: dict, jid: str) -> dict:
    r = subprocess.run(
        ["scontrol", "-o", "show", "job", jid], env=env, capture_output=True, text=True, timeout=30
    )
    info = {}
    for tok in r.stdout.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            info[k] = v
    return info


def wait_job(env: dict, jid: str, timeout: float, until=None) -> dict:
    """Poll until the job reaches a terminal state (or `until(info)` holds)."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = job_info(env, jid)
        if until is not None and until(info):
            return info
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", jid], env=env)
    raise AssertionError(f"job {jid} did not finish in {timeout:.0f}s: {info}")


def wait_first_step(env: dict, jid: str, out: Path, timeout: float = 180) -> None:
    """Until job `jid`'s train.log in `out` shows its first step (fails if the job ends first)."""
    deadline = time.monotonic() + timeout
    while not (out / "train.log").is_file() or "\nstep 1/" not in (out / "train.log").read_text():
        info = job_info(env, jid)
        assert info.get("JobState") not in TERMINAL, (info, log_of(info))
        assert time.monotonic() < deadline, f"training did not start within {timeout:.0f} s"
        time.sleep(0.5)


@pytest.fixture
def submit_dir(tmp_path):
    (tmp_path / "logs").mkdir()  # the scripts' #SBATCH --output=logs/%x-%j.log
    return tmp_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny pretrained LLaMA-MoE (4 experts, top-2), tokenizer and 3-domain data."""
    sys.path.insert(0, str(ROOT / "tests" / "launch"))
    import tiny_setup

    return Path(tiny_setup.ensure(tmp_path_factory.getbasetemp() / "tiny-run", _slurm_env()))


def tiny_vars(tiny: Path, **kw) -> dict:
    """The fpt.sh variables for a tiny CPU run: 2 processes x 2 sequences of 32 tokens = 128
    tokens per step; `max_tokens` sets the number of steps."""
    v = dict(
        MEGAMOE_ROOT=str(ROOT),
        MEGAMOE_PYTHON=PYTHON,
        MEGAMOE_ALLOW_CPU="1",
        pretrained_model=str(tiny / "model"),
        tokenizer_model=str(tiny / "tok.model"),
        dataset_dir=str(tiny / "train"),
        validation_dir=str(tiny / "valid"),
        prob_map="uniform",
        num_selects="2",
        scale_factor="2.0",
        block_size="32",
        per_device_train_batch_size="2",
        gradient_accumulation_steps="1",
        max_tokens=str(6 * 128),
        warmup_steps="2",
        eval_steps="3",
        save_steps="3",
        logging_steps="1",
        bf16="false",
        lr="3e-3",
        num_nodes="1",
        num_gpu_per_node="2",
        comment="tiny CPU job on the test cluster",
    )
    v.update({k: str(x) for k, x in kw.items()})
    return v


def test_sbatch_wrap_hostname(slurm, submit_dir):
    jid = sbatch(
        slurm,
        submit_dir,
        ["--output=logs/%x-%j.log", "--job-name=hello", "--wrap", "hostname; srun hostname"],
    )
    info = wait_job(slurm, jid, 60)
    assert info["JobState"] == "COMPLETED", (info, log_of(info))
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert log_of(info).split() == [host, host]


def test_wrong_num_nodes_is_refused(slurm, submit_dir):
    """#SBATCH --nodes=1 (fpt.sh) with num_nodes=2: the launcher refuses, saying what to change."""
    env = _slurm_env(
        {
            "MEGAMOE_ROOT": str(ROOT),
            "num_nodes": "2",
            "num_gpu_per_node": "1",
            "MEGAMOE_ALLOW_CPU": "1",
            "MEGAMOE_PYTHON": PYTHON,
        }
    )
    jid = sbatch(env, submit_dir, ["--gres=none", "--cpus-per-task=1", str(SCRIPT)])
    info = wait_job(slurm, jid, 120)
    err = Path(info["StdErr"]).read_text()
    assert info["JobState"] == "FAILED", (info, err)
    assert info["ExitCode"] == "2:0"
    assert "refusing to start" in err
    assert (
        "num_nodes=2 but the job has 1 node(s) (#SBATCH --nodes=1, SLURM_NNODES=1): set "
        "num_nodes=1 in the script, or #SBATCH --nodes=2"
    ) in err
    assert "srun" not in err  # nothing was started


def test_gpus_without_gres_are_refused(slurm, submit_dir):
    """No --gres and no MEGAMOE_ALLOW_CPU: the launcher asks for --gres=gpu:N."""
    env = _slurm_env({"MEGAMOE_ROOT": str(ROOT), "num_gpu_per_node": "2", "MEGAMOE_PYTHON": PYTHON})
    jid = sbatch(env, submit_dir, ["--gres=none", "--cpus-per-task=1", str(SCRIPT)])
    info = wait_job(slurm, jid, 120)
    err = Path(info["StdErr"]).read_text()
    assert info["JobState"] == "FAILED", (info, err)
    assert "the job has no GPUs (no --gres=gpu:N): add #SBATCH --gres=gpu:2" in err
    assert "MEGAMOE_ALLOW_CPU=1" in err


def read_scalars(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tiny_training_job(slurm, submit_dir, tiny):
    """sbatch scripts/cpt/fpt.sh -> launch.sh -> srun -> torchrun (2 CPU processes) ->
    megamoe.train: the guide's log header, checkpoints and tensorboard events in
    outputs/<job-name>-<job-id>/."""
    jid = sbatch(_slurm_env(tiny_vars(tiny)), submit_dir, [*CPU_JOB, str(SCRIPT)])
    info = wait_job(slurm, jid, 240)
    log = log_of(info)
    assert info["JobState"] == "COMPLETED", (info, log)
    name = info["JobName"]
    assert name == "cpt-moe-fpt-bs16"  # the script's #SBATCH --job-name
    out = submit_dir / "outputs" / f"{name}-{jid}"
    # the guide's log header: tokens / (block * bs * grad_accum * nodes * gpus_per_node)
    assert "max_steps: 6\nglobal batch size: 4\n#tokens/batch: 128\n" in log
    assert f"rendezvous {info['BatchHost']}:" in log
    assert "torchrun --nnodes 1 --nproc_per_node 2 --node_rank 0" in log
    assert "step 6/6" in log and "done: 6 steps, 768 tokens" in log
    # checkpoints every 3 steps, the last one final
    for step in (3, 6):
        meta = json.loads((out / f"checkpoint-{step}" / "megamoe.json").read_text())
        assert meta["step"] == step and meta["model_type"] == "llama_moe"
    # tensorboard: outputs/<job-name>-<job-id>/runs/<logging-dir>/events.out.tfevents.*
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"[A-Z][a-z]{2}\d\d_\d\d-\d\d-\d\d_.+", runs[0].name)
    assert list(runs[0].glob("events.out.tfevents.*"))
    scalars = read_scalars(runs[0])
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert {"train/lr", "train/balance_loss", "eval/code_loss"} <= set(scalars)


def test_preemption_checkpoints_requeues_and_resumes(slurm, submit_dir, tiny):
    """What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit: the launcher tells
    the training processes, which checkpoint at the next step boundary and exit 0; the
    launcher requeues the job, which resumes from that checkpoint in the same
    outputs/<job-name>-<job-id>/ and runs to the end."""
    steps = 300
    env = _slurm_env(
        tiny_vars(
            tiny, max_tokens=steps * 128, eval_steps=100, save_steps=100, MEGAMOE_SIGNAL_REPEAT_S=5
        )
    )
    jid = sbatch(env, submit_dir, [*CPU_JOB, str(SCRIPT)])
    out = submit_dir / "outputs" / f"cpt-moe-fpt-bs16-{jid}"
    wait_first_step(slurm, jid, out)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], env=slurm, check=True)
    info = wait_job(
        slurm,
        jid,
        120,
        until=lambda i: i.get("Restarts", "0") != "0" and i.get("JobState") == "PENDING",
    )
    assert info.get("Restarts") == "1", (info, log_of(info))
    # Slurm holds a requeued job for a while (BeginTime); let it start now.
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env=slurm, check=True)
    info = wait_job(slurm, jid, 240)
    log = log_of(info)
    assert info["JobState"] == "COMPLETED", (info, log)
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    stopped = [r for r in records if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR1", records
    k = stopped[0]["step"]
    assert 0 < k < steps
    assert f"saved {out.relative_to(submit_dir)}/checkpoint-{k}" in log
    assert f"requeueing job {jid}" in log
    assert f"resuming from {out.relative_to(submit_dir)}/checkpoint-{k}: step {k}" in log
    assert records[-1]["kind"] == "end" and records[-1]["step"] == steps
    meta = json.loads((out / f"checkpoint-{steps}" / "megamoe.json").read_text())
    assert meta["step"] == meta["max_steps"] == steps


@pytest.mark.parametrize("requeue_off", ["sbatch --no-requeue", "MEGAMOE_NO_REQUEUE=1"])
def test_preemption_without_requeue_says_how_to_resume(slurm, submit_dir, tiny, requeue_off):
    """A job that may not be requeued (submitted with --no-requeue, or MEGAMOE_NO_REQUEUE=1)
    still checkpoints on SIGUSR1 and ends cleanly, and its log says how to go on; the
    resubmission it names resumes from that checkpoint, whose files it leaves as they were,
    and runs to the end."""
    steps = 300
    extra = {"MEGAMOE_NO_REQUEUE": "1"} if requeue_off.startswith("MEGAMOE") else {}
    v = tiny_vars(tiny, max_tokens=steps * 128, eval_steps=0, save_steps=1000, **extra)
    flags = ["--no-requeue"] if requeue_off.startswith("sbatch") else []
    jid = sbatch(_slurm_env(v), submit_dir, [*CPU_JOB, *flags, str(SCRIPT)])
    out = submit_dir / "outputs" / f"cpt-moe-fpt-bs16-{jid}"
    wait_first_step(slurm, jid, out)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], env=slurm, check=True)
    info = wait_job(slurm, jid, 120)
    log = log_of(info)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "0", (info, log)
    rel = out.relative_to(submit_dir)
    assert f"resubmit the script with output_dir={rel} to resume" in log, log
    k = json.loads(
        [x for x in (out / "train_log.jsonl").read_text().splitlines() if '"stopped"' in x][0]
    )["step"]
    assert 0 < k < steps and f"saved {rel}/checkpoint-{k}" in log
    assert not wait_gone(job_processes(jid), 10), f"processes of job {jid} are left"
    if extra:
        return
    ckpt = out / f"checkpoint-{k}"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    jid2 = sbatch(_slurm_env({**v, "output_dir": str(rel)}), submit_dir, [*CPU_JOB, str(SCRIPT)])
    info = wait_job(slurm, jid2, 240)
    log2 = log_of(info)
    assert info["JobState"] == "COMPLETED", (info, log2)
    assert f"resuming from {rel}/checkpoint-{k}: step {k}" in log2, log2
    assert json.loads((out / f"checkpoint-{steps}" / "megamoe.json").read_text())["step"] == steps
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
