"""reserve_fd_table: the kernel's descriptor table (FDSize in /proc/PID/status) has the requested
size afterwards; no descriptor is replaced or left behind; RLIMIT_NOFILE bounds it."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import pytest

from edge_proxy.process_tuning import reserve_fd_table


def _open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def test_reserve_leaves_no_descriptor_and_keeps_open_ones():
    r, w = os.pipe()
    try:
        before = _open_fds()
        n = reserve_fd_table(512)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert n == min(512, soft)
        assert _fd_table_size() >= n
        assert _open_fds() == before          # nothing leaked (the listing's own fd aside, same)
        os.write(w, b"x")                     # the pipe still works: nothing was replaced
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def _fd_table_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    raise AssertionError("no FDSize in /proc/self/status")


def test_reserve_grows_the_kernel_table_in_a_fresh_process():
    code = textwrap.dedent("""
        from edge_proxy.process_tuning import reserve_fd_table
        def size():
            return int(next(l for l in open("/proc/self/status") if l.startswith("FDSize:")).split()[1])
        a = size()
        n = reserve_fd_table(2048)
        print(a, n, size())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, n, after = (int(x) for x in out.stdout.split())
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert n == min(2048, soft)
    if n <= before:
        pytest.skip(f"RLIMIT_NOFILE {soft} leaves nothing to grow over the initial {before} slots")
    assert before < n <= after, (before, n, after)


def test_reserve_bounded_by_rlimit_and_does_not_clobber_a_high_descriptor():
    # in a child: soft limit 256; an fd already open at 255 must survive a request for 4096 slots
    code = textwrap.dedent("""
        import os, resource
        from edge_proxy.process_tuning import reserve_fd_table
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        r, w = os.pipe()
        os.dup2(w, 255)
        n = reserve_fd_table(4096)
        os.write(255, b"y")
        print(n, os.read(r, 1).decode(), reserve_fd_table(32))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # 255 was taken, so F_DUPFD found no free slot below the limit: nothing reserved, nothing broken
    assert out.stdout.split() == ["0", "y", "0"]
