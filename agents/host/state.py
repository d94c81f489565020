"""HostState: everything prepare() needs, built once by the CLI or the service.

    state = HostState.open("/var/lib/splitd-host", hook=HookConfig("/etc/splitd-host/hook"))
    state.thawed_at_start     # what a previous agent left frozen, now thawed
    ...
    state.close()             # stops the watchdog

The state directory holds the attachment records (attachments/), the FUSE
mount points of nbdfuse (fuse/), the freeze journal (frozen/, written by the
watchdog) and one lock file per filesystem being prepared (locks/). Every
record is written whole to a temporary name, fsynced, renamed and its
directory fsynced (write_json), so a crash leaves the old record or the new
one, never half of one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volumes.files import fsync_dir

__all__ = ["DEFAULT_STATE_DIR", "ENV_STATE_DIR", "DEFAULT_FREEZE_TIMEOUT", "HookConfig",
           "HostState", "Busy", "default_state_dir", "read_json", "write_json"]

ENV_STATE_DIR = "SPLITD_HOST_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/splitd-host"
DEFAULT_FREEZE_TIMEOUT = 10.0
DEFAULT_HOOK_TIMEOUT = 30.0


def default_state_dir() -> str:
    return os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR


def write_json(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON, durably and atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(str(path.parent))


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None if it is missing or unreadable (a record
    half-written by something else than write_json is not trusted)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_durably(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(str(path.parent))


@dataclass(frozen=True)
class HookConfig:
    """The pre-freeze / post-thaw hook: an executable run as `PATH freeze
    MOUNTPOINT` before the freeze and `PATH thaw MOUNTPOINT` after the thaw
    (as qemu-ga's fsfreeze-hook). None: no hook."""
    path: str | None = None
    timeout: float = DEFAULT_HOOK_TIMEOUT


class Busy(Exception):
    """Another prepare holds this filesystem."""


@dataclass
class HostState:
    state_dir: Path
    watchdog: Any = None            # agents.host.watchdog.Watchdog once started
    hook: HookConfig = field(default_factory=HookConfig)
    freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT
    thawed_at_start: list[dict] = field(default_factory=list)
    # Expedite RCU grace periods during FIFREEZE (agents/host/rcu.py).
    expedite: bool = True
    # What was done about the RCU knob a dead agent left set (or None).
    rcu_restored: str | None = None
    _locks: dict[tuple[int, int], threading.Lock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, state_dir: str | os.PathLike | None = None, *, hook: HookConfig | None = None,
             freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT, start_watchdog: bool = True,
             expedite: bool = True) -> HostState:
        """Make the state directory, thaw what a previous agent left frozen
        (thawed_at_start says what) and put back the RCU knob it left set
        (rcu_restored), and start the watchdog."""
        from agents.host.rcu import restore_leftover
        from agents.host.watchdog import Watchdog, thaw_leftovers

        state = cls(Path(state_dir or default_state_dir()), hook=hook or HookConfig(),
                    freeze_timeout=freeze_timeout, expedite=expedite)
        state.ensure_dirs()
        state.thawed_at_start = thaw_leftovers(state.state_dir)
        state.rcu_restored = restore_leftover(state.state_dir)
        if start_watchdog:
            state.watchdog = Watchdog(state.state_dir)
            state.watchdog.start()
        return state

    def ensure_dirs(self) -> None:
        for sub in ("", "attachments", "fuse", "frozen", "locks"):
            (self.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def __enter__(self) -> HostState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def filesystem_lock(self, devno: tuple[int, int]) -> Iterator[None]:
        """One prepare per filesystem at a time, in this process (a thread
        lock) and across processes on the same state directory (flock):
        a second one raises Busy at once instead of queueing behind a freeze."""
        with self._locks_guard:
            lock = self._locks.setdefault(devno, threading.Lock())
        if not lock.acquire(blocking=False):
            raise Busy(f"{devno[0]}:{devno[1]}")
        try:
            path = self.state_dir / "locks" / f"{devno[0]}-{devno[1]}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise Busy(f"{devno[0]}:{devno[1]}") from None
                yield
            finally:
                os.close(fd)    # releases the flock
        finally:
            lock.release()
