"""The two support modules (issue 16): tests/net_support.py and benchmarks/support.py, with real
sockets and real processes: the percentile every benchmark reports, free ports, waiting for an
endpoint, stopping a process that ignores SIGTERM."""
from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.net_support import free_port, stop_process, wait_http_ok, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import support as bench  # noqa: E402  (benchmarks/support.py)

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def test_percentile_is_nearest_rank_on_the_sorted_values() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [bench.percentile(xs, q) for q in (0.0, 0.25, 0.5, 0.99, 1.0)] == [1.0, 2.0, 3.0, 5.0, 5.0]
    # 4 values: q (n - 1) = 1.5 is a tie between ranks 1 and 2: Python's round picks the even one
    assert bench.percentile([10.0, 20.0, 30.0, 40.0], 0.5) == 30.0
    assert bench.percentile(list(range(1000)), 0.999) == 998        # always a measured value
    assert bench.percentile([], 0.5) is None
    assert math.isnan(bench.pct([], 0.5)) and bench.pct([7.0], 0.99) == 7.0


def test_free_ports_can_be_bound_and_are_not_handed_out_twice_in_a_row() -> None:
    for fp in (free_port, bench.free_port):
        a, b = fp(), fp()
        with socket.socket() as s:
            s.bind(("127.0.0.1", a))
        assert 0 < a < 65536 and 0 < b < 65536


def test_wait_http_ok_reports_a_process_that_died() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_http_ok(url, timeout=30, proc=proc)
    with pytest.raises(bench.NotReady, match="exited with status 3"):
        bench.wait_http_ok(url, timeout=30, proc=proc, name="x")
    with pytest.raises(TimeoutError):
        wait_http_ok(url, timeout=0.3)


def test_wait_http_ok_returns_once_a_server_answers() -> None:
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/", timeout=30, proc=srv)
        bench.wait_http_ok(f"http://127.0.0.1:{port}/", timeout=30, proc=srv)
    finally:
        assert stop_process(srv) is not None


@pytest.mark.parametrize("stop", [lambda p: stop_process(p, timeout=0.5), lambda p: bench.stop_process(p, timeout=0.5)])
def test_stop_process_kills_what_ignores_sigterm(stop) -> None:
    proc = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    rc = stop(proc)
    assert rc == -9 and proc.poll() == -9          # SIGKILL after the grace period
    proc.stdout.close()


def test_wait_until_returns_the_last_truth() -> None:
    t0 = time.monotonic()
    assert wait_until(lambda: time.monotonic() - t0 > 0.1, timeout=10, interval=0.01)
    assert not wait_until(lambda: False, timeout=0.05, interval=0.01)
