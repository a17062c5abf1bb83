"""What every fault test checks: the user's bytes before and after, and no process left."""

import hashlib
import os
import time
from pathlib import Path

import psutil
import pytest

from tests.data.conftest import helpers, sp_model  # noqa: F401  (the data tests' fixtures)


def tree(*paths) -> dict:
    """{path: sha256} of every file under `paths` (files or folders), to compare before/after."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def wait_gone(pids, timeout: float = 20.0) -> list:
    """The processes among `pids` still running (zombies count as gone) after `timeout`."""
    t0 = time.time()
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() - t0 > timeout:
            return alive
        time.sleep(0.2)


@pytest.fixture
def no_children_left():
    """After the test, this process has no child processes left (what a command started ended)."""
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    yield
    new = [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert not wait_gone(new), f"processes left behind: {new}"


def descendants(pid: int) -> list:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_dir_copy(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(autouse=True)
def one_omp_thread(monkeypatch):
    """Training subprocesses of these tests use one thread each (2-core machines); set per test
    so that it does not leak into other directories' tests (nproc honours OMP_NUM_THREADS, and
    the Slurm test clusters size their nodes with it)."""
    if "OMP_NUM_THREADS" not in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
