"""What the backup agent's tests share: splitctl backup with --json against
the test daemon, writes through libnbd, and an export's bytes per MiB."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.pairs.helpers import MiB, first_mismatch, image_digests, wait_mirrored

__all__ = ["MiB", "backup", "backup_fails", "check_restores", "feed_fifo", "fifo_chunk",
           "fifo_writer", "file_digests", "first_mismatch", "image_digests", "resplit",
           "splitctl_started", "write_blocks"]


def backup(daemon, *args: str) -> dict:
    """`splitctl backup ARGS --json` (the daemon's admin socket in the
    environment); its JSON answer."""
    cp = daemon.splitctl("backup", *args, "--json")
    return json.loads(cp.stdout)


def backup_fails(daemon, *args: str) -> tuple[int, dict, str]:
    """A `splitctl backup` that must fail: (exit status, its JSON error, stderr)."""
    cp = daemon.splitctl("backup", *args, "--json", check=False)
    assert cp.returncode != 0, f"splitctl backup {' '.join(args)} succeeded: {cp.stdout}"
    return cp.returncode, json.loads(cp.stdout)["error"], cp.stderr


def write_blocks(daemon, volume: str, offsets: list[int], seed: int, length: int = 4096) -> None:
    """Random `length`-byte blocks at `offsets` of `volume`, through libnbd."""
    import nbd
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(daemon.uri(volume))
    try:
        for off in offsets:
            h.pwrite(rnd.randbytes(length), off)
        h.flush()
    finally:
        h.shutdown()


def resplit(daemon, pair: str) -> dict:
    """Resync `pair` until it mirrors, then split it; its pair.show."""
    daemon.call("pair.resync", name=pair)
    wait_mirrored(daemon, pair)
    daemon.call("pair.split", name=pair)
    return daemon.call("pair.show", name=pair)


def file_digests(path: Path) -> list[bytes]:
    import hashlib
    out = []
    with open(path, "rb") as f:
        while data := f.read(MiB):
            out.append(hashlib.sha256(data).digest())
    return out


def check_restores(daemon, store: Path, tmp: Path, expected: dict[str, list[bytes]]) -> None:
    """Every snapshot in `expected` restores (to a file) to exactly its image."""
    for sid, digests in expected.items():
        out = tmp / f"restore-{sid}.img"
        backup(daemon, "restore", sid, "--from", str(store), "--to", str(out))
        mismatch = first_mismatch(digests, file_digests(out))
        assert mismatch is None, f"snapshot {sid} restored wrong: {mismatch}"
        out.unlink()


@contextlib.contextmanager
def splitctl_started(daemon, *args: str) -> Iterator[subprocess.Popen]:
    """splitctl ARGS running in the background (killed if still running at the end)."""
    from tests.conftest import BIN
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(daemon.admin_socket))
    proc = subprocess.Popen([str(BIN / "splitctl"), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- a store object that blocks its reader: a FIFO in place of its file ----------------


def fifo_object(path: Path) -> bytes:
    """The object at `path` replaced by a FIFO, so that whoever reads it
    waits until the test feeds it (feed_fifo); the object's bytes."""
    stored = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return stored


def fifo_chunk(store: Path, sid: str, i: int) -> tuple[Path, bytes]:
    """Chunk `i` of snapshot `sid` made a FIFO (fifo_object); (its path, its bytes)."""
    from agents.store import open_dir
    from agents.store.names import chunk_name
    with open_dir(str(store)) as st:
        path = store / chunk_name(st.index(sid).id_at(i))
    return path, fifo_object(path)


def fifo_writer(path: Path, timeout: float = 30) -> int:
    """A blocking write fd on the FIFO, once a reader has it open (it then
    waits in read() until something is written or the fd is closed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    os.set_blocking(fd, True)
    return fd


def feed_fifo(path: Path, data: bytes, fd: int | None = None, timeout: float = 30) -> None:
    """Write `data` into the FIFO (through `fd` from fifo_writer, else once
    a reader has it open) and close it."""
    if fd is None:
        fd = fifo_writer(path, timeout)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
