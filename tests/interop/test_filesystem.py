"""An ext4 filesystem on a splitd volume, through clients we did not write:
nbdfuse shows the export as a file, a loop device turns that file into a block
device, and the kernel's ext4 does the I/O (no nbd module on this kernel).

mkfs, mount, write files, sync, umount, fsck, mount again and read them back;
then copy the volume out with nbdcopy and check the image offline (fsck and
debugfs), so what is checked is what the server stored.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need
from tests.interop.clients import MiB, random_bytes, run

pytestmark = pytest.mark.root

SIZE = 64 * MiB
FILES = {
    "empty": b"",
    "one-byte": b"\x7f",
    "page-minus-one": random_bytes(4095, 1),
    "a/b/c/deep.bin": random_bytes(1 * MiB + 7, 2),
    "large.bin": random_bytes(5 * MiB, 3),
    "text.txt": b"splitd interop\n" * 1000,
}


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    need("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "debugfs",
         "mount", "umount", "nbdcopy")


class Stack:
    """Mounted things, undone in reverse order even when a step fails."""

    def __init__(self):
        self.undo: list[tuple[str, list[str]]] = []
        self.procs: list[subprocess.Popen] = []

    def push(self, what: str, args: list[str]) -> None:
        self.undo.append((what, args))

    def pop(self, what: str) -> None:
        """Undo one step now (it must succeed), and forget it."""
        for i in range(len(self.undo) - 1, -1, -1):
            if self.undo[i][0] == what:
                run(self.undo[i][1])    # on failure, close() tries again
                del self.undo[i]
                return
        raise KeyError(what)

    def close(self) -> None:
        while self.undo:
            what, args = self.undo.pop()
            if not _quietly(args) and what == "mount":
                # A busy mount still goes away lazily; the loop device follows.
                _quietly(["umount", "-l", args[-1]])
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _quietly(args: list[str]) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def stack(daemon):
    # Depends on daemon so that it is undone while the daemon still serves.
    s = Stack()
    try:
        yield s
    finally:
        s.close()


def start_nbdfuse(stack: Stack, daemon, fuse_dir: Path, name: str) -> Path:
    """nbdfuse in the foreground of its own process; returns the file it shows."""
    fuse_dir.mkdir()
    pidfile = fuse_dir.parent / "nbdfuse.pid"
    log = open(fuse_dir.parent / "nbdfuse.log", "wb")
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(fuse_dir), daemon.uri(name)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    stack.procs.append(proc)
    stack.push("fuse", ["fusermount3", "-u", str(fuse_dir)])
    # nbdfuse writes its pid file once the mount is ready to serve.
    deadline = time.monotonic() + 15
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("nbdfuse did not come up:\n"
                                 + (fuse_dir.parent / "nbdfuse.log").read_text()
                                 + daemon.log()[-2000:])
        time.sleep(0.05)
    image = fuse_dir / "nbd"
    assert image.stat().st_size == SIZE
    return image


def attach_loop(stack: Stack, image: Path) -> str:
    cp = subprocess.run(["losetup", "--find", "--show", "--direct-io=off", str(image)],
                        capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        pytest.skip(f"no loop device available: {cp.stderr.strip()}")
    dev = cp.stdout.strip()
    stack.push("loop", ["losetup", "-d", dev])
    return dev


def mount(stack: Stack, dev: str, where: Path) -> None:
    run(["mount", "-t", "ext4", dev, where])
    stack.push("mount", ["umount", str(where)])


def check_files(root: Path) -> None:
    for rel, content in FILES.items():
        got = (root / rel).read_bytes()
        assert got == content, f"{rel}: {len(got)} bytes read back, {len(content)} written"


def test_ext4_on_nbdfuse_and_loop(daemon, tmp_path, stack):
    _need_root_tools()
    daemon.create_volume("fs", SIZE)
    image = start_nbdfuse(stack, daemon, tmp_path / "fuse", "fs")
    dev = attach_loop(stack, image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    run(["mkfs.ext4", "-q", "-F", dev], daemon)
    mount(stack, dev, mnt)
    for rel, content in FILES.items():
        path = mnt / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    run(["sync"])
    stack.pop("mount")

    # -n: check only; exit 0 means no errors found.
    run(["fsck.ext4", "-n", "-f", dev], daemon)

    mount(stack, dev, mnt)
    check_files(mnt)
    stack.pop("mount")
    stack.pop("loop")
    stack.pop("fuse")

    # Offline: the bytes the server holds are a clean filesystem with the files.
    copy = tmp_path / "copy.img"
    run(["nbdcopy", daemon.uri("fs"), copy], daemon)
    run(["fsck.ext4", "-n", "-f", copy], daemon)
    for rel, content in FILES.items():
        dumped = tmp_path / "dumped"
        run(["debugfs", "-R", f"dump /{rel} {dumped}", copy])
        assert dumped.read_bytes() == content, rel
        dumped.unlink()
