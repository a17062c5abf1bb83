"""What every fault test checks: the user's bytes before and after, and no process left."""

import hashlib
import os
from pathlib import Path

import psutil
import pytest

from tests.data.conftest import helpers, sp_model  # noqa: F401  (the data tests' fixtures)
from tests.helpers import wait_gone


def tree(*paths) -> dict:
    """{path: sha256} of every file under `paths` (files or folders), to compare before/after."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


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
