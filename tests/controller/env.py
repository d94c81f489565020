"""An in-process splitd controller on a temporary data directory, for tests.

`Env` holds what the daemon holds (VolumeManager, ConnectionRegistry,
PairManager, Controller) without any socket, and can "kill -9" itself:
`crash()` opens new managers on the same directory without any clean stop
(no bitmap sync, no flush, no engine stop), then closes the old fds. The page
cache outlives a killed process, so this is what a restart after kill -9 sees.
"""
from __future__ import annotations

import os

from controller.pairs import PairManager
from controller.service import Controller
from daemon.connections import ConnectionRegistry
from volumes.manager import VolumeManager


class FakeConnection:
    """What the registry needs of an NBD connection."""

    def __init__(self) -> None:
        self.closed: str | None = None
        self.read_requests = self.read_bytes = 0

    def close_now(self, reason: str) -> None:
        self.closed = reason


class Env:
    def __init__(self, data_dir: str, global_rate: int = 0):
        self.data_dir = str(data_dir)
        self.global_rate = global_rate
        self._open()

    def _open(self) -> None:
        self.volumes = VolumeManager(self.data_dir)
        self.registry = ConnectionRegistry()
        try:
            self.pairs = PairManager(self.volumes, self.registry, self.global_rate)
        except BaseException:
            self.volumes.close()
            raise
        self.controller = Controller(self.volumes, self.registry, lambda: {}, self.pairs)

    @property
    def engine(self):
        return self.pairs.engine

    def layer(self, name: str):
        return self.pairs.layer(name)

    def crash(self) -> None:
        """kill -9 and restart: nothing is synced or stopped cleanly."""
        old_volumes, old_pairs = self.volumes, self.pairs
        # The flock dies with the process; everything else is left as it is.
        os.close(old_volumes._lock_fd)
        old_volumes._lock_fd = -1
        self._open()
        # The dead process's fds go away only now (closing an fd syncs nothing).
        old_pairs.close()
        old_volumes.close()

    def close(self) -> None:
        self.pairs.close()
        self.volumes.close()
