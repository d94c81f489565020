"""A filesystem on a disk that can lose power: the splitd data directory on
ext4, on a loop device, on nbdfuse's file, on a cutdisk (cutdisk.py) whose
durable image is a sparse file in tmpfs.

    disk = PowerDisk(workdir).create()     # image, cutdisk, nbdfuse, loop, mkfs, mount
    ... splitd --data-dir disk.mnt/data ...
    disk.cut()                             # the power goes: unflushed writes are lost
    ... kill -9 splitd ...
    disk.down()                            # umount, detach (later writes are ignored)
    disk.up()                              # a fresh cutdisk on the durable image:
                                           # mount (journal replay), umount, fsck, mount
    disk.destroy()

The chain keeps the kernel's ordering promises end to end: ext4 (default
mount options: barriers on, data=ordered) sends REQ_PREFLUSH / REQ_FUA to the
loop device; loop (direct-io off) turns a flush into fsync() of nbdfuse's
file; nbdfuse turns fsync into NBD_CMD_FLUSH. The detection test in
tests/powerloss/test_powerloss.py shows that the chain loses an unflushed write and keeps a
flushed one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harness.powerloss.cutdisk import CutDisk
from harness.procs import stop_process

MiB = 1 << 20
TOOLS = ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount",
         "blockdev")


def missing_requirements() -> str | None:
    """Why this machine cannot build the stack (None if it can)."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for t in TOOLS:
        if shutil.which(t) is None:
            return f"{t} is not installed"
    return None


class StackError(RuntimeError):
    """The disk stack itself failed (not the daemon under test)."""


def run(args, timeout: float = 120, ok=(0,)) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise StackError(f"{' '.join(map(str, args))}: no answer in {timeout} s") from e
    if cp.returncode not in ok:
        raise StackError(f"{' '.join(map(str, args))} exited {cp.returncode}: "
                         f"{cp.stdout.strip()} {cp.stderr.strip()}")
    return cp


def _quietly(args, timeout: float = 60) -> bool:
    try:
        return subprocess.run([str(a) for a in args], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class PowerDisk:
    def __init__(self, workdir: Path, size: int = 320 * MiB, image_dir: Path | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # The durable image lives in tmpfs: fast, and nothing of it is cached
        # anywhere but in the cutdisk's own overlay.
        base = image_dir or (Path("/dev/shm") if os.path.isdir("/dev/shm") else self.dir)
        self.image_dir = Path(tempfile.mkdtemp(prefix="splitd-power-", dir=base))
        self.image = self.image_dir / "disk.img"
        self.size = size
        self.fuse_dir = self.dir / "fuse"
        self.mnt = self.dir / "mnt"
        self.cutdisk = CutDisk(self.image, self.dir)
        self.nbdfuse: subprocess.Popen | None = None
        self.loop: str | None = None
        self.mounted = False
        self.cuts = 0
        self.fsck_reports: list[str] = []

    # -- up ---------------------------------------------------------------------------

    def create(self) -> PowerDisk:
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        self.up(mkfs=True)
        return self

    def up(self, mkfs: bool = False) -> None:
        """Everything from the cutdisk to the mount. After a cut, ext4's
        journal is replayed by a first mount, then fsck -fn must find the
        filesystem clean before the real mount."""
        try:
            self.cutdisk.start()
            self._start_nbdfuse()
            self._attach_loop()
            if mkfs:
                # -b 4096: mke2fs would pick 1 KiB blocks for a filesystem
                # this small; then a 4 KiB write of a client could be torn
                # by the cut (unflushed sectors kept in part), which no real
                # deployment (4 KiB blocks) sees. nodiscard: the image is a
                # fresh sparse file already. The inode tables and journal are
                # written now, not by a background thread while rounds run.
                run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
                     "nodiscard,lazy_itable_init=0,lazy_journal_init=0", self.loop])
                run(["blockdev", "--flushbufs", self.loop])
            else:
                self._mount()
                self._umount()
                cp = run(["e2fsck", "-f", "-n", self.loop], ok=(0, 1, 2, 4, 8, 12))
                if cp.returncode != 0:
                    self.fsck_reports.append(cp.stdout + cp.stderr)
                    raise StackError(f"ext4 did not survive the power cut: e2fsck -fn exited "
                                     f"{cp.returncode}:\n{cp.stdout[-3000:]}{cp.stderr[-1000:]}")
            self._mount()
            if mkfs:
                (self.mnt / "data").mkdir()
                run(["sync", "-f", self.mnt])
        except BaseException:
            self.down()
            raise

    def _start_nbdfuse(self) -> None:
        self.fuse_dir.mkdir(exist_ok=True)
        pidfile = self.dir / "nbdfuse.pid"
        if pidfile.exists():
            pidfile.unlink()
        with open(self.dir / "nbdfuse.log", "ab") as log:
            self.nbdfuse = subprocess.Popen(
                ["nbdfuse", "-P", str(pidfile), str(self.fuse_dir), self.cutdisk.uri],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not pidfile.exists():
            if self.nbdfuse.poll() is not None or time.monotonic() > deadline:
                raise StackError("nbdfuse did not come up: "
                                 + (self.dir / "nbdfuse.log").read_text(errors="replace"))
            time.sleep(0.02)
        st = (self.fuse_dir / "nbd").stat()
        if st.st_size != self.size:
            raise StackError(f"nbdfuse shows {st.st_size} bytes, the image has {self.size}")

    def _attach_loop(self) -> None:
        cp = run(["losetup", "--find", "--show", "--direct-io=off", self.fuse_dir / "nbd"])
        self.loop = cp.stdout.strip()
        # Nothing read before through a loop device of the same number may
        # be served from the block device's cache.
        run(["blockdev", "--flushbufs", self.loop])

    def _mount(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        # ext4's defaults: barrier (flushes and FUA) on, data=ordered.
        run(["mount", "-t", "ext4", self.loop, self.mnt])
        self.mounted = True

    def _umount(self) -> None:
        if not self.mounted:
            return
        if not _quietly(["umount", self.mnt]):
            # Busy: it goes away lazily. After a cut nothing it writes lands.
            run(["umount", "-l", self.mnt])
        self.mounted = False

    # -- the power cut ------------------------------------------------------------------

    def cut(self, keep: float = 0.0, seed: int | None = None) -> tuple[int, int]:
        """From now on nothing reaches the durable image; what was not flushed
        is lost (but a random `keep` part of it). Returns (dropped, kept)."""
        self.cuts += 1
        return self.cutdisk.cut(keep, seed)

    def stats(self) -> dict:
        return self.cutdisk.stats()

    def hold_flushes(self) -> None:
        """Every flush from now until the cut waits (the disk never makes
        anything durable again before the power goes)."""
        self.cutdisk.hold()

    # -- down -----------------------------------------------------------------------------

    def down(self) -> None:
        """Unmount and take the stack apart (after a cut, or to finish: the
        caller unmounts cleanly first if it wants everything kept)."""
        self._umount()
        if self.loop:
            _quietly(["losetup", "-d", self.loop])
            # A detach of a busy device is deferred; wait until it is gone
            # so that nbdfuse can be unmounted.
            name = os.path.basename(self.loop)
            deadline = time.monotonic() + 10
            while (os.path.exists(f"/sys/block/{name}/loop/backing_file")
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            self.loop = None
        if self.nbdfuse is not None:
            if not _quietly(["fusermount3", "-u", self.fuse_dir]):
                time.sleep(0.5)
                if not _quietly(["fusermount3", "-u", self.fuse_dir]):
                    _quietly(["fusermount3", "-u", "-z", self.fuse_dir])
            stop_process(self.nbdfuse, 10, sig=None)   # fusermount3 -u ended it
            self.nbdfuse = None
        self.cutdisk.stop()

    def destroy(self, keep_image_in: Path | None = None) -> None:
        """down(), and remove the image (or first copy it, sparse, into a
        directory, to look at after a failure)."""
        self.down()
        if keep_image_in is not None and self.image.exists():
            run(["cp", "--sparse=always", self.image, Path(keep_image_in) / "disk.img"])
        shutil.rmtree(self.image_dir, ignore_errors=True)
