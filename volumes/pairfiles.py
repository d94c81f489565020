"""A pair's files in the data directory: its bitmap generations and its
fault record, under pairs/<pair name>/.

    <kind>.<generation>.bm   one bitmap file per kind, per generation
    fault                    the pair's fault reason, NUL-padded, FAULT_SIZE bytes

Crash safety (DESIGN.md "Crash safety"): a pair's bitmaps are replaced as a
whole generation. `write_generation` makes the new files and their directory
entries durable; the caller then commits the row naming the new generation,
and only then removes the old one (`remove_generation`). At start,
`keep_only_generation` removes what a crash left of the other one.

The fault file is allocated when the pair is made, so that recording a fault
needs no new space: on a full disk the SQLite commit fails, the fault file
still takes the reason, and a restart finds the pair in error.

Pair names are validated by the caller (volumes/names.py) before they get here.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping

from volumes.bitmap import Bitmap
from volumes.files import fsync_dir

FAULT_SIZE = 4096   # bytes of a pair's fault record (its reason, NUL-padded)


class PairFiles:
    def __init__(self, root: str, kinds: Iterable[str]):
        self.root = root                # <data dir>/pairs
        self.kinds = tuple(kinds)       # the bitmaps of a generation
        os.makedirs(root, mode=0o750, exist_ok=True)

    def folder(self, pair_name: str) -> str:
        return os.path.join(self.root, pair_name)

    def make_folder(self, pair_name: str) -> None:
        os.makedirs(self.folder(pair_name), mode=0o750, exist_ok=True)

    def remove_all(self, pair_name: str) -> None:
        """Every file of the pair (it is deleted, or was never made)."""
        shutil.rmtree(self.folder(pair_name), ignore_errors=True)

    # -- bitmap generations ---------------------------------------------------

    def path(self, pair_name: str, kind: str, generation: int) -> str:
        return os.path.join(self.root, pair_name, f"{kind}.{generation}.bm")

    def load_generation(self, pair_name: str, nbits: int, generation: int) -> dict[str, Bitmap]:
        """Open every bitmap of a generation. OSError if one is missing or
        unreadable; then none is left open."""
        out: dict[str, Bitmap] = {}
        try:
            for kind in self.kinds:
                out[kind] = Bitmap.load(nbits, self.path(pair_name, kind, generation))
        except BaseException:
            for bm in out.values():
                bm.close()
            raise
        return out

    def write_generation(self, pair_name: str, nbits: int, generation: int,
                         contents: Mapping[str, bytes | None]) -> dict[str, Bitmap]:
        """Make every bitmap of a generation, with `contents` (kind -> bits;
        a kind not given starts clear), durable with its directory entry.
        On any error nothing of the generation is left."""
        self.make_folder(pair_name)
        out: dict[str, Bitmap] = {}
        try:
            for kind in self.kinds:
                bm = Bitmap.create(nbits, self.path(pair_name, kind, generation))
                out[kind] = bm
                data = contents.get(kind)
                if data is not None:
                    bm.replace_with(data)
                bm.sync()
            fsync_dir(self.folder(pair_name))  # the new names are durable too
        except BaseException:
            for bm in out.values():
                bm.close()
            self.remove_generation(pair_name, generation)
            raise
        return out

    def remove_generation(self, pair_name: str, generation: int) -> None:
        for kind in self.kinds:
            try:
                os.unlink(self.path(pair_name, kind, generation))
            except FileNotFoundError:
                pass

    def keep_only_generation(self, pair_name: str, generation: int) -> None:
        folder = self.folder(pair_name)
        for entry in os.listdir(folder):
            if entry.endswith(".bm") and not entry.endswith(f".{generation}.bm"):
                os.unlink(os.path.join(folder, entry))

    # -- the fault record -------------------------------------------------------

    def fault_path(self, pair_name: str) -> str:
        return os.path.join(self.root, pair_name, "fault")

    def has_fault_file(self, pair_name: str) -> bool:
        return os.path.exists(self.fault_path(pair_name))

    def make_fault_file(self, pair_name: str) -> None:
        """Allocate the fault record, empty, durably."""
        fd = os.open(self.fault_path(pair_name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, FAULT_SIZE)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def write_fault(self, pair_name: str, reason: str) -> None:
        """Record (or, with reason "", forget) a pair's fault durably."""
        data = reason.encode("utf-8", "replace")[:FAULT_SIZE - 1]
        fd = os.open(self.fault_path(pair_name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data + bytes(FAULT_SIZE - len(data)), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def read_fault(self, pair_name: str) -> str:
        """The recorded fault reason, "" if none."""
        try:
            with open(self.fault_path(pair_name), "rb") as f:
                data = f.read(FAULT_SIZE)
        except FileNotFoundError:
            return ""
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")
