"""The process ``--spawn`` starts: runs the backend command and takes its whole process group down
when the proxy dies, however it dies (SIGKILL included).

Run as a script (standard library only; ``python -I -S watchdog.py FD GRACE -- CMD...``) by
:class:`~edge_proxy.coldstart.supervisor.BackendSupervisor`, as the leader of a new process group.
FD is the read end of a pipe whose only write end the proxy holds: the kernel closes it when the
proxy exits, so end-of-file on FD means "the proxy is gone". Then the watchdog sends SIGTERM to its
process group (the backend and everything it started: a ``sh -c`` wrapper's children too, which
``PR_SET_PDEATHSIG`` on the direct child alone cannot reach), waits up to GRACE seconds, and
SIGKILLs the group. While the proxy lives, the watchdog only waits: it exits with the backend's
status (killed by a signal: by the same signal), and ignores SIGTERM/SIGINT itself, because the
supervisor's stop signals the whole group and the backend's exit ends the watchdog.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time


def _exit_like(status: int) -> None:
    """Exit with the same status the backend had (a signal death as that signal)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _reap(pid: int) -> int | None:
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    return status if done == pid else None


def _take_group_down(pid: int, grace: float) -> None:
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _reap(pid) is None:
        time.sleep(0.05)
    try:
        os.killpg(0, signal.SIGKILL)        # everything left in the group, this process last
    except OSError:
        pass
    os._exit(1)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: watchdog.py FD GRACE -- CMD [ARG...]\n")
        return 2
    fd, grace, cmd = int(argv[0]), float(argv[1]), argv[3:]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvp(cmd[0], cmd)
        except OSError as exc:
            sys.stderr.write(f"edge-proxy --spawn: cannot run {cmd[0]!r}: {exc.strerror or exc}\n")
        os._exit(127)
    # SIGTERM while the proxy lives is the supervisor's stop (to the whole group): the backend got
    # it too and its exit ends this process. SIGTERM after the proxy died (PR_SET_PDEATHSIG) is the
    # same news as end-of-file on fd.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        child_fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        child_fd = None
    parent = os.getppid()
    while True:
        status = _reap(pid)
        if status is not None:
            _exit_like(status)
        watch = [fd] + ([child_fd] if child_fd is not None else [])
        try:
            ready, _, _ = select.select(watch, [], [], 0.2 if child_fd is None else 1.0)
        except InterruptedError:
            ready = []
        if fd in ready:
            try:
                data = os.read(fd, 64)
            except OSError:
                data = b""
            if not data:                    # end-of-file: the proxy is gone
                _take_group_down(pid, grace)
        elif os.getppid() != parent:        # reparented: the proxy is gone (belt and braces)
            _take_group_down(pid, grace)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
