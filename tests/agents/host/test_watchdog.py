"""The pieces under prepare, on a real ext4 over splitd: FIFREEZE/FITHAW,
frozen(), the watchdog process and its journal, and finding a directory's
filesystem through bind mounts and escaped mount points."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from agents.host.freeze import FIFREEZE, FITHAW, FreezeError, freeze_fd, frozen, open_mountpoint
from agents.host.mounts import find_filesystem
from agents.host.watchdog import Watchdog
from tests.agents.host.conftest import journal, wait_writable, writable

pytestmark = pytest.mark.root


def test_ioctl_numbers_match_linux_fs_h():
    # linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int)
    assert (FIFREEZE, FITHAW) == (0xC0045877, 0xC0045878)


@pytest.fixture
def watchdog(host):
    w = Watchdog(host.state_dir)
    w.start()
    yield w
    w.stop()


def test_the_watchdog_thaws_at_its_deadline(host, paired, watchdog):
    """The agent froze and then does nothing: thawed at the deadline."""
    fd = open_mountpoint(str(paired))
    try:
        watchdog.arm(str(paired), 1.0)
        [entry] = journal(host)
        assert entry["watchdog_pid"] == watchdog.pid and entry["agent_pid"] == os.getpid()
        started = time.monotonic()
        freeze_fd(fd, str(paired))
        assert not writable(paired, timeout=0.3)
        took = wait_writable(paired, 5) + 0.3
        assert 0.6 < time.monotonic() - started < 3, took
        assert not journal(host)
        fired = watchdog.disarm(str(paired))
        assert fired["result"] == "thawed" and fired["why"] == "deadline passed", fired
    finally:
        os.close(fd)


def test_frozen_thaws_on_an_exception_and_measures(paired, watchdog):
    with pytest.raises(RuntimeError), frozen(str(paired), watchdog, 5.0) as window:
        assert not writable(paired, timeout=0.3)
        raise RuntimeError("the split failed")
    assert writable(paired)
    assert 0 < window.freeze_ms <= window.window_ms and window.watchdog_fired is None
    with frozen(str(paired), watchdog, 5.0) as window:
        pass
    assert window.window_ms < 1000 and window.frozen_at > 0, window
    assert writable(paired)


def test_stopping_the_watchdog_thaws(host, paired, watchdog):
    """Its agent closing the socket with something armed: thawed at once."""
    fd = open_mountpoint(str(paired))
    try:
        watchdog.arm(str(paired), 30.0)
        freeze_fd(fd, str(paired))
        watchdog.stop()
        assert wait_writable(paired, 2) < 2
        assert not journal(host)
    finally:
        os.close(fd)


def test_a_filesystem_without_freeze(tmp_path):
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where], check=True,
                   timeout=30)
    try:
        fd = open_mountpoint(str(where))
        try:
            with pytest.raises(FreezeError) as e:
                freeze_fd(fd, str(where))
        finally:
            os.close(fd)
        assert e.value.code == "cannot-freeze" and f"{where} cannot be frozen" in e.value.message
    finally:
        subprocess.run(["umount", where], check=True, timeout=30)


def test_find_filesystem_through_bind_mounts_and_escapes(paired, tmp_path):
    (paired / "sub dir").mkdir()
    bind = tmp_path / "a bind\tmount"
    bind.mkdir()
    subprocess.run(["mount", "--bind", paired / "sub dir", bind], check=True, timeout=30)
    try:
        fs = find_filesystem(str(bind))
        base = find_filesystem(str(paired / "sub dir"))
        assert fs.devno == base.devno and fs.fstype == "ext4" == base.fstype
        assert fs.mountpoint == str(bind) and fs.root == "/sub dir", fs
        assert base.mountpoint == str(paired) and base.source.startswith("/dev/loop"), base
        link = tmp_path / "link"
        link.symlink_to(bind)
        assert find_filesystem(str(link)).mountpoint == str(bind)
    finally:
        subprocess.run(["umount", bind], check=True, timeout=30)
