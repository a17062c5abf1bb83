"""A real run, killed with SIGKILL, resumed, stopped with SIGTERM, resumed again: the loss curve
is the uninterrupted one bit for bit (CPU). Also what the run shows: the log header and the
tensorboard events (read back with tensorboard's own reader), and a non-finite loss stopping
the run with the last good checkpoint kept."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.train import fixtures as F

STEPS = 16


def _argv(tiny, out, **kw):
    flags = dict(
        max_steps=STEPS,
        save_steps=4,
        eval_steps=4,
        save_total_limit=2,
        dynamic_data_selection="sheared_llama",
        ref_loss=tiny.ref,
    )
    flags.update(kw)
    return F.train_argv(tiny.moe, tiny.data, tiny.valid, out, **flags)


def _wait_for_step(proc, out, step, timeout=240):
    log = os.path.join(out, "train_log.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if os.path.exists(log):
            with open(log) as f:
                if any(
                    json.loads(x)["kind"] == "train" and json.loads(x)["step"] >= step
                    for x in f
                    if x.strip()
                ):
                    return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def run_a(tiny):
    out = os.path.join(tiny.root, "run-a")
    r = F.run_train(_argv(tiny, out))
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_header_log_lines_and_checkpoints(run_a):
    out, r = run_a
    lines = r.stdout.splitlines()
    # the guide's header, first thing in the log
    assert lines[:3] == [f"max_steps: {STEPS}", "global batch size: 4", "#tokens/batch: 128"]
    assert lines[3].startswith("config: {")
    assert '"gate_balance_loss_weight"' in r.stdout and '"learning_rate": 0.003' in r.stdout
    steps = [x for x in lines if x.startswith("step ")]
    assert len(steps) == STEPS
    assert steps[-1].startswith(f"step {STEPS}/{STEPS} | loss ")
    for key in (
        "| lm ",
        "| balance ",
        "| lr ",
        "| grad norm ",
        "tok/s/gpu",
        "| MFU ",
        "s/step",
        "| ETA ",
    ):
        assert key in steps[-1], key
    assert any(x.startswith("eval step 4:") for x in lines)
    # rotation: save_total_limit 2 keeps the newest two
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert ckpts == [f"checkpoint-{STEPS - 4}", f"checkpoint-{STEPS}"]
    meta = json.load(open(os.path.join(out, f"checkpoint-{STEPS}", "megamoe.json")))
    assert meta["step"] == STEPS and meta["consumed_tokens"] == STEPS * 128
    assert meta["trainer"]["data"]["sampler"]["rule"] == "sheared_llama"
    assert meta["run"]["optim"]["learning_rate"] == 0.003
    assert os.path.exists(os.path.join(out, f"checkpoint-{STEPS}", "optimizer"))
    assert os.path.exists(os.path.join(out, f"checkpoint-{STEPS}", "rank_state_00000.pt"))


def test_tensorboard_events(run_a):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_a
    dirs = glob.glob(os.path.join(out, "runs", "*"))
    assert len(dirs) == 1 and os.path.basename(dirs[0]).count("_") >= 2  # Mon DD_HH-MM-SS_host
    ea = EventAccumulator(dirs[0], size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    for t in [
        "train/loss",
        "train/lm_loss",
        "train/balance_loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec_per_gpu",
        "train/mfu",
        "train/loss_on_tokens",
        "eval/code_loss",
        "eval/prose_loss",
        "eval/noise_loss",
        "prob_map/code",
        "prob_map/prose",
        "prob_map/noise",
        "routing/specialisation/layer_0",
        "routing/specialisation/layer_1",
    ]:
        assert t in tags["scalars"], t
    for t in ["moe/expert_load/layer_0", "moe/expert_load/layer_1"]:
        assert t in tags["histograms"], t
    for t in ["moe/expert_load_heatmap", "routing/code", "routing/prose", "routing/noise"]:
        assert t in tags["images"], t
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    # loss against tokens: the same values, x = consumed tokens
    on_tokens = ea.Scalars("train/loss_on_tokens")
    assert [e.step for e in on_tokens] == [128 * s for s in range(1, STEPS + 1)]
    assert [e.value for e in on_tokens] == [e.value for e in loss]
    lm, bal = ea.Scalars("train/lm_loss"), ea.Scalars("train/balance_loss")
    assert all(abs(a.value - (b.value + c.value)) < 1e-5 for a, b, c in zip(loss, lm, bal))
    assert all(e.value > 0 for e in bal)
    # the domain weights move (dynamic selection) and stay a distribution
    w = {d: [e.value for e in ea.Scalars(f"prob_map/{d}")] for d in F.DOMAINS}
    assert all(abs(sum(x) - 1) < 1e-5 for x in zip(*w.values()))
    assert max(abs(w[d][-1] - 1 / 3) for d in F.DOMAINS) > 0.01
    # histograms: every token of the step routed to k = 2 experts
    h = ea.Histograms("moe/expert_load/layer_0")[-1].histogram_value
    assert h.num == 4 * F.SEQ * 2 and len(h.bucket) == 4
    img = ea.Images("routing/code")[-1]
    assert img.width > 0 and img.height > 0 and img.encoded_image_string[:4] == b"\x89PNG"
    lr = [e.value for e in ea.Scalars("train/lr")]
    assert lr[0] == pytest.approx(1.5e-3) and lr[1] == pytest.approx(3e-3) and lr[-1] < lr[2]


def test_resume_after_kill9_and_sigterm_is_exact(tiny, run_a):
    ref, _ = run_a
    out = os.path.join(tiny.root, "run-b")
    argv = _argv(tiny, out)
    cmd = [sys.executable, "-m", "megamoe.train", *argv]
    # 1. SIGKILL in the middle of the run (after the step-4 checkpoint), to its whole process
    # group as Slurm kills a job's cgroup (megatron-core's checkpoint writer starts a
    # multiprocessing manager process that would outlive a lone SIGKILL of the trainer)
    p = subprocess.Popen(
        cmd,
        cwd=F.ROOT,
        env=F.clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert _wait_for_step(p, out, 6), "run B did not reach step 6"
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, f"checkpoint-{STEPS}"))
    killed_at = max(F.log_records(out, "train"))
    # 2. resume; SIGTERM later: checkpoint at the step boundary, exit 0
    p = subprocess.Popen(
        cmd,
        cwd=F.ROOT,
        env=F.clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert _wait_for_step(p, out, 10), "the resumed run did not reach step 10"
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=240)
    assert p.returncode == 0, text[-3000:]
    assert "resuming from" in text
    stopped = [x for x in text.splitlines() if "received SIGTERM: stopped at step" in x]
    assert stopped, text[-3000:]
    stop_step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert stop_step < STEPS and os.path.isdir(os.path.join(out, f"checkpoint-{stop_step}"))
    # 3. resume to the end
    r = F.run_train(argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {os.path.join(out, f'checkpoint-{stop_step}')}" in r.stdout
    a, b = F.log_records(ref, "train"), F.log_records(out, "train")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:  # bit for bit: the floats as logged (repr round-trips)
        for k in ("loss", "lm_loss", "balance_loss", "grad_norm", "lr"):
            assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k], killed_at, stop_step)
    ea, eb = F.log_records(ref, "eval"), F.log_records(out, "eval")
    assert sorted(ea) == sorted(eb)
    for s in ea:
        assert ea[s]["losses"] == eb[s]["losses"] and ea[s]["weights"] == eb[s]["weights"]
    ma = json.load(open(os.path.join(ref, f"checkpoint-{STEPS}", "megamoe.json")))
    mb = json.load(open(os.path.join(out, f"checkpoint-{STEPS}", "megamoe.json")))
    assert ma["trainer"]["data"] == mb["trainer"]["data"]
    assert not [d for d in os.listdir(out) if ".tmp-" in d]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, run_a):
    src, _ = run_a
    out = os.path.join(tiny.root, "run-nan")
    shutil.copytree(src, out)
    # resume at step 16 with an absurd balance loss weight: the loss of step 17 overflows
    r = F.run_train(
        _argv(tiny, out, max_steps=STEPS + 4, save_steps=1, gate_balance_loss_weight=1e39)
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr
    assert f"non-finite loss at step {STEPS + 1}" in err, err[-2000:]
    assert "stopping before the update" in err
    assert f"the last good checkpoint is {os.path.join(out, f'checkpoint-{STEPS}')}" in err
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert ckpts == [f"checkpoint-{STEPS - 4}", f"checkpoint-{STEPS}"]
    meta = json.load(open(os.path.join(out, f"checkpoint-{STEPS}", "megamoe.json")))
    assert meta["step"] == STEPS
    assert json.loads(open(os.path.join(out, "train_log.jsonl")).readlines()[-1])["kind"] == "error"


def test_exit_interval_stops_saves_and_resumes_exactly(tiny, run_a):
    """--exit_interval 6: the run saves and exits 0 at step 6 and 12 (keeping the 16-step
    schedule), and three runs of the same command give the uninterrupted curve bit for bit."""
    ref, _ = run_a
    out = os.path.join(tiny.root, "run-exit")
    stops = []
    for _ in range(3):
        r = F.run_train(_argv(tiny, out, exit_interval=6))
        assert r.returncode == 0, r.stderr[-3000:]
        stops += [x for x in r.stdout.splitlines() if "received --exit_interval 6" in x]
    assert len(stops) == 2 and "stopped at step 6 of 16" in stops[0] and "step 12 of 16" in stops[1]
    assert os.path.isdir(os.path.join(out, "checkpoint-6")) or os.path.isdir(
        os.path.join(out, "checkpoint-12")
    )
    got, want = F.log_records(out, "train"), F.log_records(ref, "train")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in sorted(got)] == [want[s]["loss"] for s in sorted(want)]


def _copy_at(ref, out, step):
    """A copy of run `ref` as it stood after its checkpoint at `step` (later ones removed)."""
    shutil.copytree(ref, out)
    for d in os.listdir(out):
        if d.startswith("checkpoint-") and int(d.split("-")[1]) > step:
            shutil.rmtree(os.path.join(out, d))
    with open(os.path.join(out, "train_log.jsonl")) as f:
        keep = [x for x in f if json.loads(x)["step"] <= step]
    with open(os.path.join(out, "train_log.jsonl"), "w") as f:
        f.writelines(keep)


def test_unreadable_optimizer_state_stops_cleanly_and_load_optimizer_false_goes_on(tiny, run_a):
    ref, _ = run_a
    out = os.path.join(tiny.root, "run-noopt")
    _copy_at(ref, out, STEPS - 4)
    ckpt = os.path.join(out, f"checkpoint-{STEPS - 4}")
    for f in glob.glob(os.path.join(ckpt, "optimizer", "*.distcp")):
        os.remove(f)  # the optimizer's tensors are gone; the weights are intact
    # without its manifest (a checkpoint of an older megamoe) nothing tells the damage before
    # the load (with it, the run resumes from an older intact checkpoint: tests/reliability)
    os.remove(os.path.join(ckpt, "manifest.json"))
    before = sorted(os.listdir(ckpt)), sorted(os.listdir(os.path.join(ckpt, "model")))
    r = F.run_train(_argv(tiny, out))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stdout + r.stderr
    assert "could not load the optimizer state" in err and "--load_optimizer false" in err
    assert (sorted(os.listdir(ckpt)), sorted(os.listdir(os.path.join(ckpt, "model")))) == before
    # going on from the weights with fresh Adam moments
    r = F.run_train(_argv(tiny, out, load_optimizer="false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optimizer state of" in r.stdout + r.stderr and "not loaded" in r.stdout + r.stderr
    got, want = F.log_records(out, "train"), F.log_records(ref, "train")
    assert sorted(got) == list(range(1, STEPS + 1))
    first = STEPS - 3  # computed before any update with the fresh moments: the same loss
    assert got[first]["loss"] == want[first]["loss"]
    assert got[STEPS]["loss"] != want[STEPS]["loss"]
