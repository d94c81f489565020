"""What the host agent tests share: splitd-host run as its own process (the
CLI, as an operator or the netns test runs it), a volume attached through it
with ext4 mounted, and a finalizer that leaves nothing frozen, mounted,
attached or running whatever the test did.

Root and /dev/fuse are needed (loop devices, mount, FIFREEZE); without them
the tests skip.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents.host.attach import Attachments, is_nbdfuse
from agents.host.mounts import mounted_at
from agents.host.watchdog import thaw_leftovers
from tests.conftest import ROOT, need

SIZE = "64M"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount, FIFREEZE)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    need("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount")


class Host:
    """splitd-host on its own state directory."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.env.pop("SPLITD_HOST_STATE_DIR", None)

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agents.host.cli", "--state-dir", str(self.state_dir),
                *map(str, args)]

    def run(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        cp = subprocess.run(self.args(*args), capture_output=True, text=True, env=self.env,
                            timeout=timeout, stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"splitd-host {' '.join(map(str, args))} exited "
                                 f"{cp.returncode}:\n{cp.stdout}{cp.stderr}")
        return cp

    def json(self, *args: str, check: bool = True, timeout: float = 60) -> tuple[int, dict, str]:
        cp = self.run(*args, "--json", check=check, timeout=timeout)
        return cp.returncode, json.loads(cp.stdout), cp.stderr

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.args(*args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kw)

    def cleanup(self) -> None:
        """Whatever the test left: thaw, unmount, detach, stop nbdfuse."""
        thaw_leftovers(self.state_dir, include_live=True)
        for att in Attachments(self.state_dir).list():
            if self.run("detach", att.device, check=False).returncode == 0:
                continue
            for point in mounted_at((att.devno[0], att.devno[1])):
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
            subprocess.run(["losetup", "-d", att.device], capture_output=True, timeout=30)
            if att.fuse_dir:
                subprocess.run(["fusermount3", "-u", "-z", att.fuse_dir], capture_output=True,
                               timeout=30)
            if att.nbdfuse_pid and is_nbdfuse(att.nbdfuse_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(att.nbdfuse_pid, signal.SIGTERM)
            Attachments(self.state_dir).remove(att)


@pytest.fixture
def host(tmp_path):
    _need_root()
    h = Host(tmp_path / "host-state")
    yield h
    h.cleanup()


@pytest.fixture
def paired(host, daemon, tmp_path):
    """Volume p (64 MiB) paired with s and mirrored, attached through the
    agent (--port unix: locate) with ext4 mounted at tmp_path/mnt."""
    daemon.create_volume("p", SIZE)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _, att, _ = host.json("attach", "p", "--daemon", daemon.admin_socket, "--port", "unix")
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    host.run("detach", "p")
    host.run("attach", "p", "--daemon", daemon.admin_socket, "--port", "unix", "--mount", mnt)
    yield mnt


def writable(mnt: Path, timeout: float = 5.0) -> bool:
    """A file can be created and fsynced on `mnt` within `timeout` s (a
    frozen filesystem blocks the writer: it is then left to finish later)."""
    name = mnt / f".probe-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(["dd", "if=/dev/zero", f"of={name}", "bs=4k", "count=1",
                             "conv=fsync", "status=none"], stdin=subprocess.DEVNULL)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _LATE.append(proc)
        return False
    return proc.returncode == 0


_LATE: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap_probes():
    yield
    while _LATE:
        p = _LATE.pop()
        p.kill()
        p.wait()


def wait_writable(mnt: Path, within: float) -> float:
    """Seconds until `mnt` takes writes again; fails after `within`."""
    started = time.monotonic()
    while not writable(mnt, timeout=0.2):
        assert time.monotonic() - started < within, f"{mnt} is still frozen after {within} s"
    return time.monotonic() - started


def journal(host: Host) -> list[dict]:
    folder = host.state_dir / "frozen"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def wait_frozen(host: Host, proc: subprocess.Popen, mnt: Path, within: float = 15.0) -> dict:
    """Wait until the agent `proc` has armed its watchdog and frozen `mnt`."""
    deadline = time.monotonic() + within
    while not journal(host):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the agent never froze {mnt}: exit {proc.poll()}\n"
                                 + "".join(proc.communicate(timeout=10)))
        time.sleep(0.02)
    while writable(mnt, timeout=0.3):
        assert time.monotonic() < deadline, f"{mnt} never froze"
    return journal(host)[0]


def hook_script(tmp_path: Path, body: str) -> Path:
    """An executable hook: `body` runs with $1 = freeze|thaw, $2 = mount point."""
    path = tmp_path / f"hook-{time.monotonic_ns()}.sh"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class StallingAdmin:
    """A Unix socket in front of the daemon's admin socket that passes every
    request through, except that while `stall` is set it holds pair.split
    and group.split: a daemon that stops answering inside the frozen window
    while its data path keeps serving (stopping the daemon itself would
    stall the filesystem's own I/O, and with it syncfs and FIFREEZE)."""

    def __init__(self, target: Path, path: Path):
        self.target, self.path = str(target), str(path)
        self.stall = threading.Event()
        self.closed = threading.Event()
        self.held = threading.Event()       # a split is being held now
        # Set: a held split is passed on then, after all (a request a
        # partition delivers late, whatever the agent did to its socket).
        self.deliver = threading.Event()
        self.delivered = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.target)
            self.conns += [conn, up]
            threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()
            threading.Thread(target=self._requests, args=(conn, up), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _requests(self, conn: socket.socket, up: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    method = json.loads(line).get("method", "")
                    if method in ("pair.split", "group.split") and self.stall.is_set():
                        self.held.set()
                        while not self.closed.is_set():
                            if self.deliver.wait(0.05):
                                up.sendall(line + b"\n")
                                self.delivered.set()
                                break
                        else:
                            return
                        continue
                    up.sendall(line + b"\n")
        with contextlib.suppress(OSError):
            up.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


@pytest.fixture
def stalling(host, daemon, tmp_path):
    """Like `paired`, but attached through a StallingAdmin (yields (mnt, proxy))."""
    daemon.create_volume("p", SIZE)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True)
    proxy = StallingAdmin(daemon.admin_socket, tmp_path / "stalling.sock")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _, att, _ = host.json("attach", "p", "--daemon", proxy.path, "--port", "unix")
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    host.run("detach", "p")
    host.run("attach", "p", "--daemon", proxy.path, "--port", "unix", "--mount", mnt)
    yield mnt, proxy
    proxy.close()
