"""The filesystem holding a directory: its mount point, type, source device
and the device number (major, minor) that names it.

The device number comes from os.stat(directory).st_dev, and the mount from
/proc/self/mountinfo (proc(5)): of the mounts whose mount point is the
directory or one of its parents, the longest, latest one (a later mount on
the same point hides the earlier ones). A bind mount shows the same device
number with its own mount point and a `root` inside the filesystem; it
freezes and splits as the filesystem it shows, so it is found like any other.

mountinfo line (proc(5)), fields separated by spaces, the optional fields
ended by a lone "-":
    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    id parent maj:min root mountpoint options [optional...] - fstype source superoptions
Paths escape space, tab, newline and backslash as octal (\\040 ...).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["Filesystem", "Mount", "NotFound", "find_filesystem", "read_mountinfo",
           "mounted_at", "device_number"]

MOUNTINFO = "/proc/self/mountinfo"


class NotFound(Exception):
    """The directory does not exist, or no mount holds it."""


@dataclass(frozen=True)
class Mount:
    mount_id: int
    devno: tuple[int, int]
    root: str           # the directory of the filesystem this mount shows
    mountpoint: str
    options: str
    fstype: str
    source: str


@dataclass(frozen=True)
class Filesystem:
    directory: str      # as asked, resolved (symlinks followed)
    mountpoint: str
    fstype: str
    source: str         # e.g. /dev/loop3
    devno: tuple[int, int]
    root: str           # "/" unless a bind mount of a subdirectory

    def describe(self) -> str:
        return f"{self.source} ({self.fstype}, mounted at {self.mountpoint})"


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: str = MOUNTINFO) -> list[Mount]:
    mounts = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                major, minor = fields[2].split(":")
                mounts.append(Mount(int(fields[0]), (int(major), int(minor)),
                                    _unescape(fields[3]), _unescape(fields[4]), fields[5],
                                    fields[sep + 1], _unescape(fields[sep + 2])))
            except (ValueError, IndexError):
                continue    # a line we do not understand names no mount of ours
    return mounts


def device_number(st_dev: int) -> tuple[int, int]:
    return os.major(st_dev), os.minor(st_dev)


def _under(path: str, mountpoint: str) -> bool:
    return (path == mountpoint or mountpoint == "/"
            or path.startswith(mountpoint.rstrip("/") + "/"))


def find_filesystem(directory: str, mountinfo: str = MOUNTINFO) -> Filesystem:
    """The filesystem holding `directory`; NotFound if it does not exist."""
    real = os.path.realpath(directory)
    try:
        st = os.stat(real)
    except OSError as e:
        raise NotFound(f"{directory}: {e.strerror}") from None
    devno = device_number(st.st_dev)
    mounts = read_mountinfo(mountinfo)
    covering = [m for m in mounts if _under(real, m.mountpoint)]
    best = None
    if covering:
        longest = max(len(m.mountpoint) for m in covering)
        best = [m for m in covering if len(m.mountpoint) == longest][-1]
    if best is None or best.devno != devno:
        # The path and the mount table disagree (a mount namespace we only
        # half see, a filesystem reporting another st_dev): trust st_dev.
        same = [m for m in mounts if m.devno == devno]
        if not same:
            raise NotFound(f"{directory}: no mount in {mountinfo} has device "
                           f"{devno[0]}:{devno[1]}")
        best = same[-1]
    return Filesystem(real, best.mountpoint, best.fstype, best.source, devno, best.root)


def mounted_at(devno: tuple[int, int], mountinfo: str = MOUNTINFO) -> list[str]:
    """Every mount point of the filesystem on device `devno` (bind mounts too)."""
    return [m.mountpoint for m in read_mountinfo(mountinfo) if m.devno == devno]
