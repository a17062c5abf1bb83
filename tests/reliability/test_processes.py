"""Killed, interrupted and failing runs: no process of the run is left, what a killed run left
is cleaned by the next, and every way a run ends is one clear line (and in train.log)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import wait_gone
from tests.reliability.conftest import descendants, tree
from tests.train import fixtures as F


def _start_train(argv):
    return subprocess.Popen(
        [sys.executable, "-m", "megamoe.train", *argv],
        cwd=F.ROOT,
        env=F.clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: a test run started in the background (`make test &`) would pass
        # on an ignored SIGINT, which the trainer then rightly keeps ignoring (as under nohup)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(p, words, timeout=180):
    t0, seen = time.time(), []
    while time.time() - t0 < timeout:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
        seen.append(line)
        if words in line:
            return "".join(seen)
    raise AssertionError(f"never saw {words!r}:\n" + "".join(seen[-40:]))


def test_a_trainer_killed_alone_takes_its_processes_along(tiny, tmp_path):
    """SIGKILL to the trainer process only (not its group): megatron-core's checkpoint writer,
    the resource tracker and forked copies all end; the rerun resumes."""
    out = str(tmp_path / "run")
    argv = F.train_argv(
        tiny.moe, tiny.data, tiny.valid, out, max_steps=400, save_steps=1, eval_steps=0
    )
    p = _start_train(argv)
    _wait_for(p, "saved ")
    time.sleep(1.0)
    kids = descendants(p.pid)
    assert kids, "the trainer has no child process to test with"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not wait_gone(kids), [psutil.Process(k).cmdline() for k in wait_gone(kids, 0)]
    r = F.run_train(
        F.train_argv(tiny.moe, tiny.data, tiny.valid, out, max_steps=3, save_steps=1, eval_steps=0)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [n for n in os.listdir(out) if ".tmp-" in n or ".old-" in n]


def test_ctrl_c_is_one_line_and_resumable(tiny, tmp_path):
    out = str(tmp_path / "run")
    p = _start_train(
        F.train_argv(
            tiny.moe, tiny.data, tiny.valid, out, max_steps=400, save_steps=2, eval_steps=0
        )
    )
    _wait_for(p, "saved ")
    kids = descendants(p.pid)
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 130, rest[-3000:]
    assert "interrupted (Ctrl-C) at step" in rest and "Traceback" not in rest, rest[-3000:]
    assert "run the same command to resume" in rest
    assert "interrupted (Ctrl-C)" in open(os.path.join(out, "train.log")).read()
    assert not wait_gone(kids)


def test_an_unexpected_error_reaches_train_log(tiny, tmp_path, monkeypatch, capsys):
    """A bug (here an error injected into the training step) ends the run with its traceback on
    the console and in train.log, exit 1, and the newest checkpoint stays."""
    from megamoe.train import step
    from megamoe.train.main import main

    calls = {"n": 0}
    real = step.forward_backward

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected fault in step 4")
        return real(*a, **k)

    monkeypatch.setattr(step, "forward_backward", failing)
    out = str(tmp_path / "run")
    rc = main(
        F.train_argv(tiny.moe, tiny.data, tiny.valid, out, max_steps=6, save_steps=2, eval_steps=0)
    )
    assert rc == 1
    log = open(os.path.join(out, "train.log")).read()
    assert "RuntimeError: injected fault in step 4" in log and "Traceback" in log
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


def _big_corpus(helpers, path, n=6000):
    texts = helpers.make_texts(200, seed=1)
    return helpers.write_jsonl(path, [{"text": texts[i % 200] * 3} for i in range(n)])


def test_a_killed_preprocess_leaves_nothing_running_and_the_rerun_cleans(
    tmp_path, helpers, sp_model
):
    inp = _big_corpus(helpers, tmp_path / "in" / "big.jsonl")
    out = tmp_path / "out"
    tool = os.path.join(F.ROOT, "tools", "preprocess_data.py")
    argv = [
        sys.executable,
        tool,
        "--input",
        inp,
        "--output-prefix",
        str(out / "big"),
        "--tokenizer-model",
        sp_model,
        "--workers",
        "2",
        "--batch-lines",
        "16",
        "--no-progress",
    ]
    p = subprocess.Popen(
        argv, cwd=F.ROOT, env=F.clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    t0 = time.time()
    while time.time() - t0 < 60 and not (
        len(descendants(p.pid)) >= 3 and out.is_dir() and any(".tmp" in n for n in os.listdir(out))
    ):
        time.sleep(0.05)
    kids = descendants(p.pid)
    assert len(kids) >= 3, kids  # the watchdog and two workers (and spawn's helpers)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not wait_gone(kids)
    left = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert left  # what a killed run could not remove ...
    r = subprocess.run(
        argv, cwd=F.ROOT, env=F.clean_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == [
        "big_text_document.bin",
        "big_text_document.idx",
        "big_text_document.stats.json",
    ]  # ... the rerun removed


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs of this test's own (root only): a disk that fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_preprocess_is_one_line_and_frees_the_space(
    tmp_path, helpers, sp_model, small_disk
):
    from megamoe.data.preprocess import main

    inp = _big_corpus(helpers, tmp_path / "in.jsonl", n=30000)
    (small_disk / "keep.txt").write_text("a user's file")
    before = tree(small_disk)
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(F.ROOT, "tools", "preprocess_data.py"),
            "--input",
            inp,
            "--output-prefix",
            str(small_disk / "o"),
            "--tokenizer-model",
            sp_model,
            "--no-progress",
        ],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert tree(small_disk) == before  # the temporaries are gone: the space is free again
    assert shutil.disk_usage(small_disk).used < 64 * 1024
    del main
