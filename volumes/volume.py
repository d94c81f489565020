"""A volume's data: one sparse file, and the plain operations on it.

This is the bottom of the stack. Everything above it (the NBD server, and the
pair layers that add dirty tracking, copy-on-write and read policies) talks to
this small interface:

    read(offset, length) -> bytes      write(offset, data)
    zero(offset, length, punch)        trim(offset, length)
    flush()  (blocking: run it off the event loop)
    extents(offset, length, limit) -> [(length, flags)]  (flags: HOLE | ZERO)

Rules kept here:
- Creation never writes zeroes: the file is made with ftruncate, so a new
  volume is one hole.
- Bounds are the caller's job (the NBD server validates every request before
  it gets here); a short read past the end of file reads as zeroes.
- Errors are OSError with the errno the storage gave; the server maps them.
"""
from __future__ import annotations

import errno
import os

# Flags of an extent, as NBD's base:allocation context defines them.
EXTENT_HOLE = 1
EXTENT_ZERO = 2

_PUNCH = getattr(os, "FALLOC_FL_PUNCH_HOLE", 0x02)
_KEEP_SIZE = getattr(os, "FALLOC_FL_KEEP_SIZE", 0x01)
_ZERO_RANGE = getattr(os, "FALLOC_FL_ZERO_RANGE", 0x10)

_ZERO_CHUNK = bytes(1 << 20)


def pread_padded(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset`: pread may return short on a
    large read, and past the file's end reads as zeroes (a sparse volume's
    file may be shorter than the volume, e.g. a read-only one)."""
    parts = []
    while length:
        data = os.pread(fd, length, offset)
        if not data:
            parts.append(bytes(length))
            break
        parts.append(data)
        offset += len(data)
        length -= len(data)
    return b"".join(parts)


class Volume:
    """The data of one volume, kept in a sparse file."""

    __slots__ = ("name", "path", "size", "region_size", "read_only", "fd",
                 "_can_punch", "_can_zero_range")

    def __init__(self, name: str, path: str, size: int, region_size: int = 65536,
                 read_only: bool = False):
        self.name = name
        self.path = path
        self.size = size
        self.region_size = region_size
        self.read_only = read_only
        self.fd = -1
        self._can_punch = True
        self._can_zero_range = True

    # -- life cycle -------------------------------------------------------

    @staticmethod
    def create_file(path: str, size: int) -> None:
        """Make the sparse backing file; refuses to overwrite an existing one."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def open(self) -> Volume:
        if self.fd < 0:
            flags = os.O_RDONLY if self.read_only else os.O_RDWR
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
            # A file shorter than the recorded size (cut short outside of us)
            # reads as zeroes past its end; grow it so writes land in place.
            if not self.read_only and os.fstat(self.fd).st_size < self.size:
                os.ftruncate(self.fd, self.size)
        return self

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def resize(self, new_size: int) -> None:
        """Grow the volume (the file stays sparse)."""
        if new_size < self.size:
            raise ValueError("volumes only grow")
        fd = self.fd if self.fd >= 0 and not self.read_only else os.open(self.path, os.O_RDWR)
        try:
            os.ftruncate(fd, new_size)
            os.fsync(fd)
        finally:
            if fd != self.fd:
                os.close(fd)
        self.size = new_size

    # -- data -------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += pread_padded(self.fd, offset + len(data), length - len(data))
        return data

    def read_fd(self, offset: int, length: int) -> tuple[int, int] | None:
        """Where [offset, offset+length) can be read straight from a file:
        (fd, file offset), for sendfile(2). Layers answer None where the bytes
        must come through read() (not yet copied, say)."""
        return (self.fd, offset)

    def write(self, offset: int, data) -> None:
        n = os.pwrite(self.fd, data, offset)
        if n == len(data):
            return
        view = memoryview(data)[n:]
        offset += n
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def refuse_slow_zero(self, punch: bool) -> None:
        """Raise OSError ENOTSUP unless zero(punch=punch) is, as far as known
        yet, a metadata operation rather than writing zeroes
        (NBD_CMD_FLAG_FAST_ZERO)."""
        if not ((punch and self._can_punch) or self._can_zero_range):
            raise OSError(errno.ENOTSUP, "this file system can only zero by writing zeroes")

    def zero(self, offset: int, length: int, punch: bool = True, fast_only: bool = False) -> None:
        """Make [offset, offset+length) read as zeroes.

        punch=True lets the range become a hole (NBD_CMD_WRITE_ZEROES without
        NO_HOLE); punch=False keeps it allocated. fast_only: raise OSError
        ENOTSUP, changing nothing, rather than write zeroes.
        """
        if not length:
            return  # nothing to do (and fallocate() would say EINVAL)
        if punch and self._can_punch:
            if self._try_fallocate(_PUNCH | _KEEP_SIZE, offset, length):
                return
            self._can_punch = False
        if self._can_zero_range:
            if self._try_fallocate(_ZERO_RANGE | _KEEP_SIZE, offset, length):
                return
            self._can_zero_range = False
        if fast_only:
            self.refuse_slow_zero(punch)  # the modes tried have just been found missing
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.write(offset, memoryview(_ZERO_CHUNK)[:n])
            offset += n

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate(2); False if this file system does not do that mode.

        Only EOPNOTSUPP says so (ENOSYS: no fallocate at all), and the caller
        remembers it for good. Anything else, EINVAL for a range fallocate
        does not take say, is about this one request: raised, nothing learnt.
        """
        try:
            _fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return False
        return True

    def trim(self, offset: int, length: int) -> None:
        """Discard a range: it reads as zeroes afterwards (we always punch)."""
        self.zero(offset, length, punch=True)

    def flush(self) -> None:
        """Make every write so far durable. Blocking: call it from a thread."""
        os.fdatasync(self.fd)

    def extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        """Allocation of [offset, offset+length): a list of (length, flags).

        Holes (found with SEEK_HOLE/SEEK_DATA) read as zeroes and are reported
        HOLE|ZERO; data is reported 0. The lengths add up to `length`; with a
        `limit`, the scan stops after that many extents, which then describe
        the start of the range only (each one is whole: data and holes
        alternate, so none is cut short by the next).
        """
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        fd = self.fd
        while pos < end and not (limit and len(out) >= limit):
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # no data from pos to the end of file
            if data > pos:
                stop = min(data, end)
                _append(out, stop - pos, EXTENT_HOLE | EXTENT_ZERO)
                pos = stop
                continue
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                hole = end
            stop = min(hole, end)
            _append(out, stop - pos, 0)
            pos = stop
        return out


def _append(out: list[tuple[int, int]], length: int, flags: int) -> None:
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + length, flags)
    else:
        out.append((length, flags))


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _libc_fallocate(fd, mode, offset, length)


def _load_fallocate():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> None:
        if fn(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


_libc_fallocate = _load_fallocate()
