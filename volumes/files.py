"""Small durable-file helpers shared by volumes and pairs.

A file made or renamed is not crash-safe until its directory entry is: the
data's fdatasync does not cover the name. `fsync_dir` is that second step.
"""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` (names created, renamed or
    removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """pwrite all of `data` at `offset` (a pwrite may be short); returns its length."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done
