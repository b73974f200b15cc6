"""Local scale-to-zero supervisor: start the backend process on demand, stop it gracefully, restart
with backoff, and never leave an orphan.

Orphan protection, in layers:

1. The backend runs in its own process group (``start_new_session``); stopping signals the whole
   group (SIGTERM, then SIGKILL after the grace period, then SIGKILL to any straggler in the group).
2. The proxy stops it from its aiohttp ``on_cleanup`` (run on SIGTERM/SIGINT by ``web.run_app``).
3. An ``atexit`` hook kills the group if the interpreter exits without cleanup.
4. The command runs under a watchdog (``watchdog.py``, the group's leader and the direct child),
   which holds the read end of a pipe whose write end only the proxy holds: when the proxy dies,
   even by SIGKILL, the kernel closes it and the watchdog takes the whole group down (SIGTERM,
   then SIGKILL after the grace period), a ``sh -c`` wrapper's children included. On Linux the
   watchdog also gets ``PR_SET_PDEATHSIG``.

Before starting, the port must be free: a backend left over from an earlier proxy (or anything
else) listening there is a :class:`SpawnError` naming the port (it used to answer the readiness
probe for a child that could not bind, giving a restart every second and bogus cold starts).
A failed start counts as a failure, so the backoff before the next attempt grows.

The command is split by :func:`edge_proxy.coldstart.spawn.build_argv` (no shell); ``{port}`` and
``{host}`` placeholders are filled from the backend URL. Use ``sh -c '...'`` explicitly when a
shell is needed.

The backend's stdout and stderr go to ``output`` (a file, appended) or, by default, to the proxy's
stderr with every line prefixed ``[backend PID]`` (:func:`relay_output`): never unmarked into the
JSON access log.

Owns: the one backend process (start, stop, exit watch, consecutive-failure count for the backoff).
Must not: decide when to start or stop it (the gate and its idle stop do), hold requests or
record cold starts.
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import ctypes.util
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from edge_proxy.coldstart.spawn import (SpawnError, backoff_seconds, build_argv, check_executable, port_in_use,
                                        relay_output)

log = logging.getLogger("edge_proxy.coldstart")

_PR_SET_PDEATHSIG = 1
WATCHDOG = str(Path(__file__).with_name("watchdog.py"))


class BackendSupervisor:
    """Owns at most one backend process at a time. All methods run on the event loop."""

    def __init__(
        self,
        command: str,
        host: str,
        port: int,
        stop_grace_seconds: float = 30.0,
        backoff_base_seconds: float = 1.0,
        backoff_max_seconds: float = 60.0,
        on_exit: Callable[[int | None, bool], None] | None = None,
        output: str | None = None,
    ) -> None:
        self.argv = build_argv(command, host, port)
        self.output = output                        # file for the backend's output; None: relay, prefixed
        self._relay_task: asyncio.Task[None] | None = None
        self.host, self.port = host, port
        self._pipe_w: int | None = None             # the watchdog's lifeline (see module docstring)
        self.stop_grace_seconds = stop_grace_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.on_exit = on_exit                      # (returncode, expected) after every exit
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self.failures = 0                           # consecutive failed starts / crashes
        self._last_failure_mono = 0.0
        self._last_rc: int | None = None           # the exit code _watch_exit saw last
        self.starts = 0
        self._atexit_registered = False
        self._prctl = None
        if sys.platform.startswith("linux"):
            try:
                self._prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
            except (OSError, AttributeError):
                self._prctl = None

    # -- state -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def last_returncode(self) -> int | None:
        """The exit code of the last process that exited (None before any did): the current process's own once it
        has exited, which ``running`` turns False on before the exit watcher has run (the driver reads it then)."""
        if self._proc is not None and self._proc.returncode is not None:
            return self._proc.returncode
        return self._last_rc

    @property
    def stopping(self) -> bool:
        """A stop was requested for the current process (it may still be draining)."""
        return self._proc is not None and self._stopping

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def record_failure(self) -> None:
        self.failures += 1
        self._last_failure_mono = time.monotonic()

    def record_success(self) -> None:
        self.failures = 0

    def backoff_remaining_seconds(self) -> float:
        delay = backoff_seconds(self.failures, self.backoff_base_seconds, self.backoff_max_seconds)
        return max(0.0, self._last_failure_mono + delay - time.monotonic())

    # -- start / stop ------------------------------------------------------------------------
    def _child_setup(self) -> None:   # runs in the child between fork and exec
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    async def start(self) -> int:
        """Start the backend (waiting out any backoff first); returns the monotonic ns just after
        the process was created. Raises :class:`SpawnError` when it cannot be executed."""
        async with self._lock:
            if self.running:
                raise RuntimeError("backend already running")
            wait = self.backoff_remaining_seconds()
            if wait > 0:
                log.info("cold start: waiting %.1f s backoff before restarting the backend", wait)
                await asyncio.sleep(wait)
            ppid = os.getpid()

            def setup() -> None:
                self._child_setup()
                if os.getppid() != ppid:   # parent died before prctl took effect
                    os._exit(1)

            log_file = None
            try:
                check_executable(self.argv[0])
                if await port_in_use(self.host, self.port):
                    raise SpawnError(
                        f"port {self.port} on {self.host} is already in use by another process (a backend "
                        f"left over from an earlier proxy?); --spawn starts its own backend there, so stop "
                        f"that process or choose another port")
            except SpawnError as exc:
                self.record_failure()
                log.error("cold start: %s", exc)
                raise
            r, w = os.pipe()            # both close-on-exec; pass_fds hands r to the watchdog only
            # The backend's output goes through a pipe this process owns, not one of the asyncio
            # transport's: asyncio's Process.wait() returns only once the transport's pipes close,
            # which a grandchild that outlives the watchdog would hold open (a crash unseen).
            out_r: int | None = None
            out_w: int | None = None
            try:
                if self.output:
                    log_file = open(self.output, "ab")
                else:
                    out_r, out_w = os.pipe()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", "-S", WATCHDOG, str(r), f"{self.stop_grace_seconds:g}", "--",
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file if log_file is not None else out_w,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(r,),
                    preexec_fn=setup if self._prctl is not None else None,
                )
            except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
                os.close(w)
                if out_r is not None:
                    os.close(out_r)
                self.record_failure()
                raise SpawnError(f"cannot start backend {self.argv[0]!r}: {exc.strerror or exc}") from None
            except OSError as exc:
                os.close(w)
                if out_r is not None:
                    os.close(out_r)
                self.record_failure()
                raise SpawnError(f"cannot start backend {self.argv[0]!r}: {exc}") from None
            finally:
                os.close(r)
                if out_w is not None:
                    os.close(out_w)         # the child has its own copy
                if log_file is not None:
                    log_file.close()        # the child has its own copy
            t = time.monotonic_ns()
            if out_r is not None:
                reader = asyncio.StreamReader()
                await asyncio.get_running_loop().connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(out_r, "rb", 0))
                self._relay_task = asyncio.create_task(relay_output(reader, f"[backend {proc.pid}] "),
                                                       name="coldstart-backend-output")
            self._close_pipe()
            self._pipe_w = w
            self._proc = proc
            self._stopping = False
            self.starts += 1
            if not self._atexit_registered:
                atexit.register(self._kill_sync)
                self._atexit_registered = True
            self._watch = asyncio.create_task(self._watch_exit(proc), name="coldstart-backend-watch")
            log.info("cold start: started backend process group %d: %s", proc.pid, shlex.join(self.argv))
            return t

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        expected = self._stopping
        self._last_rc = rc
        self._signal_group(proc.pid, signal.SIGKILL)   # stragglers left in the group
        if self._relay_task is not None:                # its last lines (the pipe closes now)
            await asyncio.wait({self._relay_task}, timeout=2.0)
        if self._proc is proc:
            self._close_pipe()
        if not expected:
            log.warning("cold start: backend pid %d exited unexpectedly with code %s", proc.pid, rc)
        if self.on_exit is not None:
            try:
                self.on_exit(rc, expected)
            except Exception:  # never let a callback break the watcher
                log.exception("cold start: on_exit callback failed")

    def _close_pipe(self) -> None:
        if self._pipe_w is not None:
            try:
                os.close(self._pipe_w)
            except OSError:
                pass
            self._pipe_w = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, grace_seconds: float | None = None) -> int | None:
        """SIGTERM the process group, SIGKILL after the grace period; returns the exit code."""
        async with self._lock:
            proc = self._proc
            if proc is None:
                return self.last_returncode
            grace = self.stop_grace_seconds if grace_seconds is None else grace_seconds
            self._stopping = True
            if proc.returncode is None:
                self._signal_group(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=grace)
                except asyncio.TimeoutError:
                    log.warning("cold start: backend pid %d ignored SIGTERM for %.1f s; SIGKILL", proc.pid, grace)
                    self._signal_group(proc.pid, signal.SIGKILL)
                    await proc.wait()
            self._signal_group(proc.pid, signal.SIGKILL)
            if self._watch is not None:
                await asyncio.gather(self._watch, return_exceptions=True)
            self._last_rc = proc.returncode             # (the watcher's too, unless it was cancelled)
            self._proc = None
            self._watch = None
            return proc.returncode

    async def close(self) -> None:
        await self.stop()
        if self._atexit_registered:
            atexit.unregister(self._kill_sync)
            self._atexit_registered = False

    def _kill_sync(self) -> None:
        """atexit fallback: the loop is gone, so signal and poll synchronously."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        pid = proc.pid
        self._signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + min(self.stop_grace_seconds, 5.0)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                break
            time.sleep(0.05)
        self._signal_group(pid, signal.SIGKILL)
