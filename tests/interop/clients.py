"""Helpers shared by the interop tests: run a client we did not write, and
make source images with known content.

Every helper fails with the client's own output and the tail of the daemon's
log, so a failing interop test says what the client saw and what the server
said about it.
"""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB


def run(args: list[str], daemon=None, *, check: bool = True, timeout: float = 60,
        ok: tuple[int, ...] = (0,), cwd=None) -> subprocess.CompletedProcess:
    """Run a client; with check, any exit status outside `ok` fails the test."""
    try:
        cp = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{args[0]} did not finish in {timeout} s: {args}\n"
                             f"{_log_tail(daemon)}") from e
    if check and cp.returncode not in ok:
        raise AssertionError(f"{' '.join(map(str, args))} exited {cp.returncode}\n"
                             f"--- stdout\n{cp.stdout}--- stderr\n{cp.stderr}"
                             f"{_log_tail(daemon)}")
    return cp


def _log_tail(daemon, lines: int = 30) -> str:
    if daemon is None:
        return ""
    tail = daemon.log().splitlines()[-lines:]
    return "--- splitd log (tail)\n" + "\n".join(tail) + "\n"


def uri(daemon, name: str, transport: str) -> str:
    """NBD URI of a volume through one of the daemon's two listeners."""
    return daemon.uri(name, tcp=(transport == "tcp"))


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_sparse_image(path: Path, size: int, islands: list[tuple[int, int]],
                       seed: int = 1) -> bytes:
    """A sparse raw file of `size` bytes: random data on each (offset, length)
    island, holes elsewhere. Returns the whole content, for comparisons."""
    content = bytearray(size)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in islands:
            data = rng.randbytes(length)
            content[offset:offset + length] = data
            f.seek(offset)
            f.write(data)
    return bytes(content)


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first byte where a and b differ (None if equal)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    step = 4096
    for pos in range(0, n, step):
        if a[pos:pos + step] != b[pos:pos + step]:
            return next(i for i in range(pos, min(pos + step, n)) if a[i] != b[i])
    return n


def files_equal(a: Path, b: Path) -> None:
    """Assert with cmp(1) that two files hold the same bytes."""
    cp = run(["cmp", a, b], check=False)
    assert cp.returncode == 0, f"{a} and {b} differ: {cp.stdout}{cp.stderr}"
