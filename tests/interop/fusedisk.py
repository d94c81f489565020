"""A real disk whose faults a test controls: ext4 on a loop device over
nbdfuse over `nbdkit -s` with a filter (error, pause, ...).

Root and /dev/fuse are needed (loop devices, mount); without them, or
without the filter, the calling test is skipped.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.interop.test_filesystem import Stack, attach_loop, mount


@contextlib.contextmanager
def ext4_over_nbdkit(tmp_path: Path, nbdkit_filter: str, nbdkit_args: list[str],
                     ready: Path | None = None) -> Iterator[Path]:
    """Mount ext4 over `nbdkit -s --filter=NBDKIT_FILTER NBDKIT_ARGS...` and
    yield the mount point; `ready` is a file (a control socket, say) that
    must exist before the disk is used. Everything is undone afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    need("nbdkit", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount")
    if subprocess.run(["nbdkit", f"--filter={nbdkit_filter}", "null", "--dump-plugin"],
                      capture_output=True, timeout=30).returncode != 0:
        pytest.skip(f"nbdkit's {nbdkit_filter} filter is missing")
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    root = tmp_path / "mnt"
    root.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    log_path = tmp_path / "nbdfuse.log"
    stack = Stack()
    try:
        with open(log_path, "wb") as log:
            stack.procs.append(subprocess.Popen(
                ["nbdfuse", "-P", str(pidfile), str(fuse_dir), "--command",
                 "nbdkit", "-s", f"--filter={nbdkit_filter}", *nbdkit_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        stack.push("fuse", ["fusermount3", "-u", str(fuse_dir)])
        deadline = time.monotonic() + 15
        while not pidfile.exists() or (ready is not None and not ready.exists()):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        dev = attach_loop(stack, fuse_dir / "nbd")
        subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True, timeout=60)
        mount(stack, dev, root)
        yield root
    finally:
        stack.close()
