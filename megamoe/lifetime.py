"""Processes of a run die with it.

A trainer or preprocessing run killed with SIGKILL cannot clean up, yet its children
(megatron-core's checkpoint writer and multiprocessing's resource tracker, forked copies,
tokenizer workers) must not outlive it. Two mechanisms, Linux only:

- forked children ask the kernel for SIGKILL when their parent dies (PR_SET_PDEATHSIG, set right
  after the fork: children_die_with_me);
- a small watchdog process (watch_over_me) waits for the run to end and then kills every process
  the run left: the run marks its environment (MEGAMOE_RUN=<its pid>), which every process it
  starts inherits, spawned children that never run our code and their children included; then
  the watchdog exits itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
MARK = "MEGAMOE_RUN"  # in a run's environment: the pid of the process that leads it
_registered = False
_libc = None  # loaded in the parent: a forked child of a threaded process must not dlopen
_forking_parent = 0  # the pid a forked child expects as its parent


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent (the thread that started it) ends; `parent`: the
    pid it should have (by default its current parent): if that one is gone already, nobody
    would send the signal, so this process ends now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    _prctl()(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_forking_parent)


def children_die_with_me() -> None:
    """Every process forked from now on dies with this one."""
    global _registered
    if not _registered and sys.platform.startswith("linux"):
        _prctl()  # now, in the parent
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _registered = True


def watch_over_me() -> subprocess.Popen | None:
    """Start the watchdog of this process (see the module docstring); before any child."""
    if not sys.platform.startswith("linux") or os.environ.get(MARK) == str(os.getpid()):
        return None  # not Linux, or watched already
    os.environ[MARK] = str(os.getpid())
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megamoe.lifetime",
            str(os.getpid()),
            str(time.time() - 1.0),
        ],  # the run's children start after this
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _watch(pid: int, born: float, period: float = 0.2) -> None:
    import psutil

    try:
        run = psutil.Process(pid)
        while run.status() != psutil.STATUS_ZOMBIE:
            time.sleep(period)
    except psutil.NoSuchProcess:
        pass
    died, me = time.time(), os.getpid()
    for p in psutil.process_iter():
        try:  # the run's marked processes (a pid reused since has a later creation time)
            if (
                p.pid != me
                and born <= p.create_time() <= died
                and p.environ().get(MARK) == str(pid)
            ):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]), float(sys.argv[2]))
