"""Every volume of one data directory: its backing file, its row, its open fd.

Layout of a data directory:
    splitd.db           the metadata store (volumes.store)
    splitd.lock         held (flock) by the one daemon that owns the directory
    volumes/<name>.img  the sparse backing file of volume <name>

Rules kept here:
- Nothing is written until every argument has been checked.
- The database row is the last thing written on create and the first thing
  removed on delete, so after a crash a volume is either fully there or
  leaves at most an unrecorded file behind, which create refuses to reuse
  (it names the file) rather than silently adopting its old data.
- Listing never reads volume data: sizes come from the store, allocation
  from fstat. A thousand idle terabyte volumes cost a thousand fds.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os

from volumes.errors import BadInput, Conflict, NotFound
from volumes.files import fsync_dir
from volumes.names import DEFAULT_REGION_SIZE, format_size, parse_region_size, parse_size, validate_name
from volumes.store import MetadataStore, PairRecord
from volumes.volume import Volume

log = logging.getLogger(__name__)

DB_NAME = "splitd.db"
LOCK_NAME = "splitd.lock"
VOLUMES_DIR = "volumes"


class VolumeManager:
    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)
        self.volumes_dir = os.path.join(self.data_dir, VOLUMES_DIR)
        _make_private_dir(self.data_dir)
        _make_private_dir(self.volumes_dir)
        self._lock_fd = _lock_data_dir(os.path.join(self.data_dir, LOCK_NAME))
        self._volumes: dict[str, Volume] = {}
        # Volumes recorded in the store whose file could not be opened at start:
        # name -> reason. Not served; `delete` still removes their row.
        self.unavailable: dict[str, str] = {}
        self._store: MetadataStore | None = None
        try:
            self._store = MetadataStore(os.path.join(self.data_dir, DB_NAME))
            for rec in self._store.list_volumes():
                self._load(rec.name, rec.size, rec.region_size, rec.read_only)
        except BaseException:
            self.close()
            raise

    @property
    def store(self) -> MetadataStore:
        """The metadata store (until close())."""
        if self._store is None:
            raise RuntimeError("the volume manager is closed")
        return self._store

    def __enter__(self) -> VolumeManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for vol in self._volumes.values():
            vol.close()
        self._volumes.clear()
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _load(self, name: str, size: int, region_size: int, read_only: bool) -> None:
        # One broken volume must not keep the others from being served.
        try:
            path = self.path_of(name)
        except BadInput as e:
            self.unavailable[name] = f"recorded under an invalid name ({e})"
        else:
            try:
                self._volumes[name] = Volume(name, path, size, region_size, read_only).open()
            except OSError as e:
                self.unavailable[name] = f"cannot open {path}: {e.strerror or e}"
        if name in self.unavailable:
            log.error("volume %r is unavailable: %s", name, self.unavailable[name])

    # -- lookup -----------------------------------------------------------

    def path_of(self, name: str) -> str:
        """The backing file of volume `name`; the name is checked first."""
        return os.path.join(self.volumes_dir, f"{validate_name(name)}.img")

    def find(self, name: str) -> Volume | None:
        """The open volume called `name`, or None (any string is safe here)."""
        return self._volumes.get(name)

    def get(self, name: str) -> Volume:
        vol = self._volumes.get(name)
        if vol is None:
            if name in self.unavailable:
                raise NotFound(f"volume {name!r} is unavailable: {self.unavailable[name]}")
            raise NotFound(f"no volume named {name!r}")
        return vol

    def list(self) -> list[Volume]:
        return sorted(self._volumes.values(), key=lambda v: v.name)

    def allocated_bytes(self, name: str) -> int:
        """Bytes the backing file really uses on disk (holes cost nothing)."""
        vol = self.get(name)
        st = os.fstat(vol.fd) if vol.fd >= 0 else os.stat(vol.path)
        return st.st_blocks * 512

    # -- changes ----------------------------------------------------------

    def create(self, name: str, size, region_size=DEFAULT_REGION_SIZE,
               read_only: bool = False, pair: PairRecord | None = None) -> Volume:
        """A new volume, sparse. With `pair`, that pair's row is committed
        with the volume's (one transaction): a volume born in a pair (an
        instant restore) never exists without it, even after a crash."""
        name = validate_name(name)
        size = parse_size(size)
        region_size = parse_region_size(region_size)
        if not isinstance(read_only, bool):
            raise BadInput("read_only must be true or false")
        if name in self._volumes or self.store.get_volume(name) is not None:
            raise Conflict(f"volume {name!r} already exists")
        path = self.path_of(name)
        stray = (f"cannot create volume {name!r}: {path} already exists but no such volume "
                 "is recorded (left over from a crash or put there by hand); "
                 "move it away or remove it first")
        if os.path.lexists(path):
            raise Conflict(stray)

        try:
            Volume.create_file(path, size)
        except FileExistsError:
            raise Conflict(stray) from None
        except OSError as e:
            _remove_file(path)
            if e.errno == errno.EFBIG:
                raise BadInput(f"size {format_size(size)} is larger than the filesystem of "
                               f"{self.volumes_dir} allows") from None
            raise
        vol = Volume(name, path, size, region_size, read_only)
        try:
            vol.open()
            fsync_dir(self.volumes_dir)  # the new file's name survives a crash
            self.store.add_volume(name, size, region_size, read_only, pair=pair)
        except BaseException:
            vol.close()
            _remove_file(path)
            raise
        self._volumes[name] = vol
        self.unavailable.pop(name, None)
        log.info("created volume %s (%s, region %s%s)", name, format_size(size),
                 format_size(region_size), ", read-only" if read_only else "")
        return vol

    def resize(self, name: str, size) -> Volume:
        """Grow a volume. Clients see the new size when they next connect."""
        vol = self.get(name)
        new_size = parse_size(size)
        if new_size < vol.size:
            raise BadInput(f"volume {name!r} is {format_size(vol.size)}; volumes only grow, "
                           f"so {format_size(new_size)} is refused")
        if new_size == vol.size:
            return vol
        old_size = vol.size
        try:
            vol.resize(new_size)  # the file first: a longer file than recorded is harmless
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise BadInput(f"size {format_size(new_size)} is larger than the filesystem "
                               f"of {self.volumes_dir} allows") from None
            raise
        try:
            self.store.set_volume_size(name, new_size)
        except BaseException:
            # Nobody can have written past old_size yet: no client was told the
            # new size (this code never yields to the event loop).
            os.truncate(vol.path, old_size)
            vol.size = old_size
            raise
        log.info("resized volume %s from %s to %s", name, format_size(old_size),
                 format_size(new_size))
        return vol

    def delete(self, name: str) -> None:
        """Forget a volume and remove its file. Its connections are the caller's job."""
        vol = self._volumes.get(name)
        if vol is None and name not in self.unavailable:
            raise NotFound(f"no volume named {name!r}")
        self.store.remove_volume(name)
        if vol is not None:
            vol.close()
            del self._volumes[name]
        self.unavailable.pop(name, None)
        try:
            path = self.path_of(name)
        except BadInput:
            path = None  # a row splitd did not write: never turn its name into a path
        if path is not None:
            _remove_file(path)
            fsync_dir(self.volumes_dir)
        log.info("deleted volume %s", name)


def _make_private_dir(path: str) -> None:
    """Make a directory 0750 (umask aside); an existing one keeps its mode.
    Its parent must exist: a mistyped path must not grow a tree of directories."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
        raise FileNotFoundError(errno.ENOENT, "its parent directory does not exist", parent)
    try:
        os.mkdir(path, 0o750)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
        return
    os.chmod(path, 0o750)


def _lock_data_dir(path: str) -> int:
    """Hold an exclusive flock so two daemons never share one data directory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Conflict(f"data directory {os.path.dirname(path)} is in use by another "
                       f"splitd (pid {holder})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
