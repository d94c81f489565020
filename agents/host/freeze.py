"""FIFREEZE and FITHAW, and frozen(): the window in which a filesystem holds
still, always closed.

    with frozen("/srv/db", watchdog, timeout=10) as window:
        admin.call("pair.split", name="db-snap")
    window.freeze_ms, window.window_ms

FIFREEZE (linux/fs.h: _IOWR('X', 119, int)) makes the filesystem write out
everything dirty, commit its journal, and block every new write until FITHAW
(_IOWR('X', 120, int)); the block device then holds a clean image of it. The
ioctls go to any open file of the filesystem; we open its mount point
O_RDONLY. A syncfs() first writes back what is dirty while the application
still runs, so the frozen window holds only what came in since.

The order in frozen(): arm the watchdog (its journal is on disk before the
freeze), freeze, run the caller's block, thaw (whatever the block raised),
disarm. If the watchdog's deadline passed first, it thawed: our thaw finds
the filesystem not frozen, and window.watchdog_fired says so; the caller must
not trust what it did inside as done while frozen.

With `expedite` (the agent's state directory), RCU grace periods are
expedited for the FIFREEZE call only (agents/host/rcu.py: most of a FIFREEZE
is three grace periods, not I/O); window.expedited says whether they were.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from agents.host.rcu import expedited

__all__ = ["FIFREEZE", "FITHAW", "FreezeError", "Window", "freeze_fd", "thaw_fd",
           "open_mountpoint", "syncfs", "frozen"]


def _iowr(kind: str, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr, with
    # _IOC_READ|_IOC_WRITE = 3. (alpha, mips, powerpc and sparc encode the
    # direction differently; splitd-host runs on x86 and arm.)
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


FIFREEZE = _iowr("X", 119, 4)     # 0xC0045877
FITHAW = _iowr("X", 120, 4)       # 0xC0045878


class FreezeError(Exception):
    """code: "cannot-freeze" (the filesystem has no freeze), "already-frozen",
    "freeze-failed" (anything else)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Window:
    freeze_ms: float = 0.0      # the FIFREEZE call: writing out what was dirty
    window_ms: float = 0.0      # FIFREEZE start -> FITHAW end: writes blocked
    frozen_at: float = 0.0      # wall clock (time.time()) at FIFREEZE start
    frozen: bool = False        # our FIFREEZE succeeded
    thawed: bool = False        # and our FITHAW after it (or it was thawed already)
    watchdog_fired: dict | None = None
    expedited: bool = False     # RCU grace periods were expedited during FIFREEZE


def open_mountpoint(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2): write back the whole filesystem of `fd` (os has no syncfs)."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def freeze_fd(fd: int, mountpoint: str) -> None:
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            raise FreezeError("cannot-freeze", f"{mountpoint} cannot be frozen: its filesystem "
                                               "does not support FIFREEZE") from None
        if e.errno == errno.EBUSY:
            raise FreezeError("already-frozen", f"{mountpoint} is already frozen (by someone "
                                                "else: fsfreeze -u to thaw it)") from None
        if e.errno == errno.EPERM:
            raise FreezeError("freeze-failed", f"cannot freeze {mountpoint}: permission denied "
                                               "(needs CAP_SYS_ADMIN)") from None
        raise FreezeError("freeze-failed", f"cannot freeze {mountpoint}: "
                                           f"{e.strerror or e}") from None


def thaw_fd(fd: int) -> bool:
    """FITHAW; False if the filesystem was not frozen (EINVAL)."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


@contextlib.contextmanager
def frozen(mountpoint: str, watchdog, timeout: float,
           expedite: str | os.PathLike | None = None) -> Iterator[Window]:
    """Freeze `mountpoint` for the block; thawed on the way out whatever
    happens, and by `watchdog` after `timeout` seconds if we are stuck.
    `expedite`: the state directory, to expedite RCU grace periods during
    the FIFREEZE call (see the module); None: leave them alone."""
    window = Window()
    fd = open_mountpoint(mountpoint)
    try:
        syncfs(fd)
        watchdog.arm(mountpoint, timeout)
        # Between our FIFREEZE and a successful FITHAW, disarm asks the
        # watchdog to thaw (it tries, and keeps the journal for thaw-all if
        # it fails too). A FIFREEZE that failed froze nothing of ours: a
        # filesystem someone else froze (EBUSY) is left as it is.
        need_thaw = False
        try:
            rcu = expedited(expedite) if expedite is not None else contextlib.nullcontext(False)
            with rcu as window.expedited:
                window.frozen_at = time.time()
                started = time.perf_counter()
                freeze_fd(fd, mountpoint)
            need_thaw = window.frozen = True
            window.freeze_ms = (time.perf_counter() - started) * 1000
            try:
                yield window
            finally:
                with contextlib.suppress(OSError):
                    thaw_fd(fd)     # False: the watchdog thawed first (see disarm)
                    need_thaw = False
                    window.thawed = True
                window.window_ms = (time.perf_counter() - started) * 1000
        finally:
            window.watchdog_fired = watchdog.disarm(mountpoint, thaw=need_thaw)
    finally:
        os.close(fd)
