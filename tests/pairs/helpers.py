"""What the pair tests share: whole-image digests read through real NBD
clients, polling pair.show, the x-splitd:pending map, and fio in the background.

Digests are per MiB, so a mismatch names the first MiB that differs instead
of only saying "the checksums differ".
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

from harness.procs import stop_process

MiB = 1 << 20
CHUNK = MiB


def image_digests(uri: str, daemon=None, timeout: float = 120) -> list[bytes]:
    """Read a whole export with `nbdcopy URI -`; one sha256 per MiB."""
    proc = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    digests = []
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            data = proc.stdout.read(CHUNK)
            if not data:
                break
            buf += data
            while len(buf) >= CHUNK:
                digests.append(hashlib.sha256(buf[:CHUNK]).digest())
                buf = buf[CHUNK:]
            if time.monotonic() > deadline:
                raise AssertionError(f"nbdcopy {uri} took more than {timeout} s")
        if buf:
            digests.append(hashlib.sha256(buf).digest())
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    if rc != 0:
        raise AssertionError(f"nbdcopy {uri} - exited {rc}: {err}{log_tail(daemon)}")
    return digests


def first_mismatch(expected: list[bytes], got: list[bytes]) -> str | None:
    """None if equal; else which MiB differ (the first few and how many)."""
    if len(expected) != len(got):
        return f"sizes differ: {len(expected)} MiB expected, {len(got)} MiB read"
    bad = [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
    if not bad:
        return None
    return f"{len(bad)} MiB differ, first at MiB {bad[:8]}"


def log_tail(daemon, lines: int = 40) -> str:
    if daemon is None:
        return ""
    return "\n--- splitd log (tail)\n" + "\n".join(daemon.log().splitlines()[-lines:])


def show(daemon, name: str) -> dict:
    return daemon.call("pair.show", name=name)


def wait_until(daemon, name: str, what: str, cond, timeout: float = 60.0,
               interval: float = 0.05) -> dict:
    """Poll pair.show until cond(info) holds; fail with the last info and the log."""
    deadline = time.monotonic() + timeout
    info = show(daemon, name)
    while not cond(info):
        if time.monotonic() > deadline:
            raise AssertionError(f"pair {name}: {what} not reached in {timeout} s; last "
                                 f"pair.show: {info}{log_tail(daemon)}")
        time.sleep(interval)
        info = show(daemon, name)
    return info


def wait_drained(daemon, name: str, timeout: float = 60.0) -> dict:
    """A split pair with pending = 0."""
    return wait_until(daemon, name, "pending = 0",
                      lambda i: i["state"] == "split" and i["pending"] == 0, timeout)


def wait_mirrored(daemon, name: str, timeout: float = 60.0) -> dict:
    """A pair in state `pair` with nothing left to copy."""
    return wait_until(daemon, name, "state pair with remaining = 0",
                      lambda i: i["state"] == "pair" and i["remaining"] == 0, timeout)


def pending_map(uri: str) -> list[tuple[int, int, int]]:
    """`nbdinfo --map=x-splitd:pending URI` as (offset, length, flags)."""
    cp = subprocess.run(["nbdinfo", "--map=x-splitd:pending", uri], capture_output=True,
                        text=True, timeout=60, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise AssertionError(f"nbdinfo --map=x-splitd:pending exited {cp.returncode}: "
                             f"{cp.stdout}{cp.stderr}")
    out = []
    for line in cp.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return out


def pending_bytes(extents: list[tuple[int, int, int]]) -> int:
    return sum(length for _, length, flags in extents if flags == 1)


def pending_regions(extents, region_size: int, size: int) -> int:
    """Regions the map calls pending (a short last region counts as one)."""
    total = pending_bytes(extents)
    tail = size % region_size
    if tail and any(flags == 1 and off + length == size for off, length, flags in extents):
        total += region_size - tail
    assert total % region_size == 0, f"pending extents not region aligned: {extents}"
    return total // region_size


class BackgroundFio:
    """fio --ioengine=nbd random writes to one export, paused and resumed with
    SIGSTOP / SIGCONT. --thread: the job runs in fio's own process (not a
    forked child), so one signal stops all of its I/O."""

    def __init__(self, uri: str, cwd: Path, size: str = "256m", runtime: int = 300):
        self.args = ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}",
                     "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={size}", "--thread",
                     "--time_based", f"--runtime={runtime}", "--refill_buffers",
                     "--output-format=json", f"--output={cwd / 'fio.json'}"]
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> BackgroundFio:
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self, settle: float = 0.5) -> None:
        """SIGSTOP, then give requests already on the wire time to land."""
        assert self.alive(), self.stderr()
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(settle)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)    # a stopped process cannot take SIGTERM
        stop_process(self.proc, 15)

    def stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")
