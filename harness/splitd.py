"""The real splitd, started on a directory for a test, a benchmark or a crash round.

    d = Splitd(tmp_path).start()      # data/, nbd.sock, admin.sock, splitd.log in tmp_path
    d.call("volume.create", name="db", size="1G")
    d.uri("db")                       # nbd+unix:///db?socket=.../nbd.sock
    d.stop()                          # SIGTERM, then SIGKILL after the timeout

start() returns once the daemon answers `status` on its admin socket, and
raises DaemonFailed (with the log) if it exits first or does not answer in
time. Admin calls go through splitctl's client library (splitctl/client.py),
so they fail with its AdminError.

The attributes are plain and may be changed between start()s: tests move
`data_dir`, swap `extra_args`, or replace `args` to start it their own way.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Self

from harness.procs import stop_process
from splitctl.client import AdminClient, AdminError

# The interpreter's own bin directory: the virtualenv's splitd and splitctl.
BIN = Path(sys.executable).parent


class DaemonFailed(RuntimeError):
    """splitd exited while starting (`returncode`), or did not answer in time
    (`returncode` None). The message holds its log."""

    def __init__(self, message: str, returncode: int | None):
        super().__init__(message)
        self.returncode = returncode


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Splitd:
    """One splitd process on `base`: its data directory, sockets and log there.

    tcp: also listen on a free port of 127.0.0.1 (`tcp_port`).
    new_session: start it in a session of its own, out of reach of the
    terminal's Ctrl-C (the caller stops it), and end its whole process group
    on stop().
    wrap: a command that runs the rest (`Namespaces.cmd(ns, [])` runs it in a
    network namespace); it must exec its argument, so that the pid is splitd's.
    """

    def __init__(self, base: Path, extra_args: list[str] | None = None, tcp: bool = False,
                 new_session: bool = False, wrap: list[str] | None = None):
        self.base = base
        self.data_dir = base / "data"
        self.nbd_socket = base / "nbd.sock"
        self.admin_socket = base / "admin.sock"
        self.log_path = base / "splitd.log"
        self.tcp_port = free_tcp_port() if tcp else None
        self.extra_args = list(extra_args or [])
        self.new_session = new_session
        self.wrap = list(wrap or [])
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    # -- process ------------------------------------------------------------------------

    def args(self) -> list[str]:
        a = [str(BIN / "splitd"), "--data-dir", str(self.data_dir),
             "--listen", f"unix:{self.nbd_socket}",
             "--admin-socket", str(self.admin_socket), "--config", "/dev/null"]
        if self.tcp_port:
            a += ["--listen", f"tcp://127.0.0.1:{self.tcp_port}"]
        return a + self.extra_args

    @property
    def pid(self) -> int:
        assert self.proc is not None, "splitd is not running"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> Self:
        for p in (self.nbd_socket, self.admin_socket):
            p.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.wrap + self.args(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=self.new_session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonFailed(f"splitd exited with {self.proc.returncode}:\n{self.log()}",
                                   self.proc.returncode)
            if self.admin_socket.exists() and self.nbd_socket.exists() and self._answers():
                return self
            time.sleep(0.05)
        message = f"splitd did not come up in {timeout:g} s:\n{self.log()}"
        # Not left running: a fixture whose start() fails never gets to stop it.
        self.stop(signal.SIGKILL, 5)
        raise DaemonFailed(message, None)

    def _answers(self) -> bool:
        try:
            self.call("status")
            return True
        except AdminError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig`, wait up to `timeout` s, then SIGKILL; the exit status
        (negative: the signal that ended it)."""
        if self.proc is None:
            return 0
        stop_process(self.proc, timeout, sig)
        if self.new_session:
            # Whatever it left behind in its group goes too (pgid == pid).
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        rc = self.proc.returncode
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # -- clients ------------------------------------------------------------------------

    def uri(self, export: str, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://127.0.0.1:{self.tcp_port}/{export}"
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def admin(self, timeout: float = 60.0) -> AdminClient:
        """A client that keeps its connection open across calls (close it, or
        use it in a `with`). Not for sharing between threads."""
        return AdminClient(str(self.admin_socket), timeout=timeout)

    def call(self, method: str, **params: Any) -> Any:
        """One admin request on a connection of its own; the result, or AdminError."""
        with self.admin(timeout=10) as a:
            return a.call(method, **params)

    def export_read_bytes(self, export: str) -> int:
        """READ bytes the daemon served on connections to `export`, open or
        closed (its per-connection counters)."""
        conns = self.call("connections")
        return sum(c["read_bytes"] for c in conns["connections"] + conns["closed"]
                   if c["export"] == export)
