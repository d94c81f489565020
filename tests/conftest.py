"""Shared fixtures: the real splitd daemon on a temporary directory and sockets."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The suite runs beside daemons, QEMU guests and fio on two cores: how fast
# Hypothesis draws its inputs says nothing about the code under test, and a
# draw slowed by a busy machine must not fail a test. Coverage is unchanged.
settings.register_profile("splitd", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("splitd")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(*tools: str) -> None:
    """Skip the calling test cleanly when a client tool is not installed."""
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


def memory(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def grown(pid: int, before: dict[str, int]) -> int:
    """How much a process grew since `before` (memory()), peak or resident."""
    after = memory(pid)
    return max(after["VmHWM"] - before["VmHWM"], after["VmRSS"] - before["VmRSS"])


class Daemon:
    """A running splitd process, with its data directory and sockets."""

    def __init__(self, tmp: Path, extra_args: list[str] | None = None, tcp: bool = True):
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.nbd_socket = tmp / "nbd.sock"
        self.admin_socket = tmp / "admin.sock"
        self.tcp_port = free_tcp_port() if tcp else None
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "splitd.log"

    # -- process ------------------------------------------------------------

    def args(self) -> list[str]:
        a = [str(BIN / "splitd"), "--data-dir", str(self.data_dir),
             "--listen", f"unix:{self.nbd_socket}",
             "--admin-socket", str(self.admin_socket), "--config", "/dev/null"]
        if self.tcp_port:
            a += ["--listen", f"tcp://127.0.0.1:{self.tcp_port}"]
        return a + self.extra_args

    def start(self, timeout: float = 15.0) -> Daemon:
        for p in (self.nbd_socket, self.admin_socket):
            if p.exists():
                p.unlink()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"splitd exited with {self.proc.returncode}:\n{self.log()}")
            if self.admin_socket.exists() and self.nbd_socket.exists():
                try:
                    self.call("status")
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"splitd did not come up:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self._log.close()
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- clients --------------------------------------------------------------

    def uri(self, export: str, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://127.0.0.1:{self.tcp_port}/{export}"
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def call(self, method: str, **params):
        """One admin request over the admin socket; returns the result or raises."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.admin_socket))
            s.sendall(json.dumps({"id": 1, "method": method, "params": params}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("admin socket closed")
                buf += chunk
        reply = json.loads(buf)
        if "error" in reply:
            raise AdminCallError(reply["error"])
        return reply["result"]

    def splitctl(self, *args: str, check: bool = True, input: str | None = None):
        env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(self.admin_socket))
        cp = subprocess.run([str(BIN / "splitctl"), *args], capture_output=True, text=True,
                            env=env, input=input, timeout=60)
        if check and cp.returncode != 0:
            raise AssertionError(f"splitctl {' '.join(args)} exited {cp.returncode}:\n"
                                 f"{cp.stdout}{cp.stderr}")
        return cp

    def create_volume(self, name: str, size: str | int = "64M", **kw):
        return self.call("volume.create", name=name, size=size, **kw)


class AdminCallError(Exception):
    def __init__(self, error: dict):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message")


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


@pytest.fixture
def make_daemon(tmp_path):
    """Factory for a daemon with extra arguments; every one made is stopped."""
    made: list[Daemon] = []

    def make(extra_args=None, tcp=True, start=True, sub="d"):
        d = Daemon(tmp_path / f"{sub}{len(made)}", extra_args, tcp)
        d.tmp.mkdir(parents=True, exist_ok=True)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.stop()
