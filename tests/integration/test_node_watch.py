"""The launcher's lost-node watch (megamoe/ops/launcher.py: NodeWatch in the batch launcher,
NodeBeat in every node's launcher) over real sockets on loopback, and the software comparison
of the per-node pre-flight. tests/integration/test_multinode.py runs both on a real multi-node
Slurm; here each rule is checked on its own, in seconds."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megamoe.ops.launcher import NodeWatch, software_differences, software_manifest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A node launcher's side of the protocol, by hand."""

    def __init__(self, port: int, rank: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("r")
        self.send(f"hello {rank}")

    def send(self, line: str) -> None:
        self.sock.sendall((line + "\n").encode())

    def beat(self) -> str:
        self.send("beat")
        return self.file.readline().strip()


def wait_until(cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_silent_node_is_lost_after_the_timeout_and_the_others_are_told():
    w = NodeWatch(["n1", "n2"], timeout=1.0, port=_free_port())
    try:
        a, b = Node(w.port, 0), Node(w.port, 1)
        assert a.beat() == "ok" and b.beat() == "ok"
        t0 = time.monotonic()
        while w.lost is None:  # n1 keeps beating, n2 (its cable cut) says nothing more
            assert a.beat() == "ok" or w.lost
            assert time.monotonic() - t0 < 5
            time.sleep(0.2)
        took = time.monotonic() - t0
        assert 1.0 <= took < 2.5, took
        assert w.lost.startswith("node n2 (node rank 1) lost: not heard from for 1 s")
        assert a.beat() == f"stop {w.lost}"
    finally:
        w.close()


def test_a_launcher_that_ends_without_bye_is_lost_at_once():
    w = NodeWatch(["n1", "n2"], timeout=30.0, port=_free_port())
    try:
        a, b = Node(w.port, 0), Node(w.port, 1)
        assert a.beat() == "ok" and b.beat() == "ok"
        b.file.close()
        b.sock.close()  # killed: the kernel closes its connection
        assert wait_until(lambda: w.lost is not None, 5) < 2
        assert w.lost == (
            "node n2 (node rank 1) lost: its launcher ended without a word "
            "(killed, or the node went down)"
        )
    finally:
        w.close()


def test_after_a_bye_nothing_is_lost_and_a_refusal_is_told_apart():
    w = NodeWatch(["n1", "n2"], timeout=0.5, port=_free_port(), startup=0.5)
    try:
        a, b = Node(w.port, 0), Node(w.port, 1)
        assert a.beat() == "ok" and b.beat() == "ok"
        b.send("bye 2")  # refused by its pre-flight: srun then ends the others
        wait_until(lambda: w.refused() == ["n2"], 5)
        a.file.close()
        a.sock.close()  # ...killed by srun: not a lost node, the step is over
        time.sleep(1.5)
        assert w.lost is None and w.others_ended() is True
    finally:
        w.close()


def test_a_node_that_never_reports_is_lost_after_the_startup_allowance():
    w = NodeWatch(["n1", "n2"], timeout=30.0, port=_free_port(), startup=1.0)
    try:
        a = Node(w.port, 0)
        assert a.beat() == "ok"
        took = wait_until(lambda: w.lost is not None, 5)
        assert 0.5 < took < 3
        assert w.lost == (
            "node n2 (node rank 1) lost: its launcher did not report within 1 s of the start"
        )
    finally:
        w.close()


BEATING_NODE = """
import subprocess, sys, time
from megamoe.ops.launcher import NodeBeat
child = subprocess.Popen(["sleep", "60"])   # stands for a training process
print(child.pid, flush=True)
NodeBeat("127.0.0.1:" + sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), "n2 (node rank 1)")
time.sleep(60)
"""


def _beating_node(port: int, rank: int, timeout: float):
    p = subprocess.Popen(
        [sys.executable, "-c", BEATING_NODE, str(port), str(rank), str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return p, int(p.stdout.readline())


@pytest.mark.timeout(60)
def test_a_node_stops_its_training_processes_when_told_or_cut_off():
    # told: another node is lost
    w = NodeWatch(["n1", "n2"], timeout=1.0, port=_free_port())
    try:
        p, child = _beating_node(w.port, 1, 1.0)
        wait_until(lambda: 1 in w.last, 10)  # node rank 1 beats; rank 0 never says a word
        w._lose(0, "for the test")
        assert p.wait(timeout=10) == 1
        out = p.stdout.read()
        assert (
            "[megamoe.launch] n2 (node rank 1): stopping this node's training processes: "
            "node n1 (node rank 0) lost: for the test" in out
        )
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
        assert w.said_bye == {1: 1}
    finally:
        w.close()
    # cut off: the batch launcher stops answering
    server = socket.create_server(("127.0.0.1", 0))
    conns = []
    p, child = _beating_node(server.getsockname()[1], 1, 1.5)
    conns.append(server.accept())  # accepted, never answered
    t0 = time.monotonic()
    assert p.wait(timeout=10) == 1
    assert 1.5 <= time.monotonic() - t0 < 5
    assert re.search(
        r"n2 \(node rank 1\): stopping this node's training processes: the batch "
        r"node 127.0.0.1 has not answered for \d s",
        p.stdout.read(),
    )
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
    server.close()


def test_software_differences_name_the_file_and_the_version():
    here = software_manifest()
    assert software_differences(here, here) == []
    there = {
        "host": "node1",
        "versions": dict(here["versions"], torch="0.0.1"),
        "files": dict(here["files"]),
    }
    there["files"]["megamoe/train/trainer.py"] = "0" * 12
    there["files"]["megamoe/extra.py"] = "1" * 12
    del there["files"]["megamoe/cli.py"]
    assert software_differences(here, there) == [
        f"torch {here['versions']['torch']} here, 0.0.1 on node1",
        "files not as on node1: megamoe/cli.py (not on node1), megamoe/extra.py (missing here), "
        "megamoe/train/trainer.py",
    ]
