"""The energy sampler's per-tick savings (issue 17) change no result: the process tree listed again
reuses what it knew, and lists what psutil lists."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from edge_proxy.energy.process_cpu import ProcessTreeCpu

ROOT_SCRIPT = r"""
import subprocess, sys
kids = []
for line in sys.stdin:
    if line.startswith("spawn"):
        kids.append(subprocess.Popen(["sleep", "60"]))
    elif line.startswith("kill"):
        k = kids.pop(0); k.kill(); k.wait()
    print("ok", flush=True)
"""


def _pidfds() -> int:
    """Pidfds this process holds."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            continue
    return n


def _say(p: subprocess.Popen[str], what: str) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(what + "\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"), reason="/proc, pidfds")
def test_tree_listed_again_reuses_live_processes_and_matches_psutil() -> None:
    top = subprocess.Popen([sys.executable, "-c", ROOT_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    base = _pidfds()
    tree = ProcessTreeCpu(lambda: top.pid, refresh_seconds=0.0)      # listed again on every read
    try:
        _say(top, "spawn")
        _say(top, "spawn")

        def listed() -> list[int]:
            root = psutil.Process(top.pid)
            return [top.pid, *(p.pid for p in root.children(recursive=True))]
        tree.busy_seconds()
        assert [p.pid for p in tree._procs] == listed()
        objs, fds = list(tree._procs), list(tree._fds)
        assert _pidfds() - base == 3
        tree.busy_seconds()                          # nothing changed: the very same objects and pidfds
        assert tree._procs == objs and all(a is b for a, b in zip(tree._procs, objs)) and tree._fds == fds
        _say(top, "spawn")                           # a new child is found; the others stay as they were
        tree.busy_seconds()
        assert [p.pid for p in tree._procs] == listed() and len(tree._procs) == 4
        assert all(a is b for a, b in zip(tree._procs, objs)) and tree._fds[:3] == fds
        _say(top, "kill")                            # an exited child leaves, its pidfd is closed
        tree.busy_seconds()
        assert [p.pid for p in tree._procs] == listed() and len(tree._procs) == 3
        assert _pidfds() - base == 3
        assert tree._procs[0] is objs[0] and tree._procs[1] is objs[2]
    finally:
        tree.close()
        for p in psutil.Process(top.pid).children(recursive=True):
            p.kill()
        assert top.stdin is not None
        top.stdin.close()
        top.wait(10)
    assert _pidfds() == base
