"""Shared fixtures: the real splitd daemon on a temporary directory and sockets
(harness/splitd.py starts and stops it; admin calls raise splitctl's AdminError)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from harness.splitd import BIN, Splitd, free_tcp_port

# The suite runs beside daemons, QEMU guests and fio on two cores: how fast
# Hypothesis draws its inputs says nothing about the code under test, and a
# draw slowed by a busy machine must not fail a test. Coverage is unchanged.
settings.register_profile("splitd", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("splitd")

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["BIN", "ROOT", "Daemon", "free_tcp_port", "grown", "memory", "need"]


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


class Daemon(Splitd):
    """splitd on `tmp` (also listening on TCP unless tcp=False), with splitctl beside it."""

    def __init__(self, tmp: Path, extra_args: list[str] | None = None, tcp: bool = True):
        super().__init__(tmp, extra_args, tcp=tcp)
        self.tmp = tmp

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
