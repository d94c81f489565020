"""Storage that stalls: the data directory on a disk that stops answering
on demand, so a FLUSH stays in flight for as long as a test wants.

The disk is nbdkit's memory plugin behind its pause filter; nbdfuse shows it
as a file, a loop device makes it a block device, and ext4 on that holds
splitd's data directory (as in test_storage_faults.py). While the disk is
paused, an fdatasync of a volume waits, and with it the NBD request that asked
for it.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import grown, memory
from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import Closed, RawClient
from tests.interop.clients import MiB, random_bytes
from tests.interop.fusedisk import ext4_over_nbdkit

pytestmark = pytest.mark.root

DISK = "256M"
VOL_SIZE = 16 * MiB


class StalledDisk:
    def __init__(self, root: Path, control: Path):
        self.root = root
        self.control = control

    def _command(self, cmd: bytes) -> None:
        # The pause filter echoes the command in upper case once it holds:
        # for a pause, once the requests already running are done.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall(cmd)
            assert s.recv(1) == cmd.upper()

    def pause(self) -> None:
        self._command(b"p")

    def resume(self) -> None:
        self._command(b"r")


@pytest.fixture
def stalled_disk(tmp_path):
    control = tmp_path / "pause.sock"
    with ext4_over_nbdkit(tmp_path, "pause", ["memory", DISK, f"pause-control={control}"],
                          ready=control) as root:
        disk = StalledDisk(root, control)
        try:
            yield disk
        finally:
            try:
                disk.resume()        # never leave the kernel waiting on a paused disk
            except (OSError, AssertionError):
                pass


def test_bytes_after_disc_are_not_read_while_a_flush_waits(stalled_disk, make_daemon):
    # NBD_CMD_DISC: the server finishes the outstanding requests, then
    # closes; "the client MUST NOT send any further requests". A client that
    # goes on sending anyway must not be read into memory while the FLUSH
    # before its DISC waits for the disk.
    d = make_daemon(["--data-dir", str(stalled_disk.root / "data")], tcp=False)
    d.create_volume("v", VOL_SIZE)
    data = random_bytes(MiB, 3)
    pid = d.proc.pid
    with RawClient.unix(d.nbd_socket, timeout=30).open("v") as cl:
        assert cl.write(0, data, cookie=1) == 0
        before = memory(pid)
        stalled_disk.pause()
        cl.send(r.request(r.CMD_FLUSH, 0, 0, 2) + r.request(r.CMD_DISC, 0, 0, 3))
        junk = b"\x55" * (4 * MiB)

        def send() -> None:
            try:
                for _ in range(256):                 # 1 GiB nobody should read
                    cl.send(junk)
            except (Closed, OSError):
                pass                                 # the server closed: what we expect

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(3)
        # Other clients are served meanwhile (from the page cache).
        with RawClient.unix(d.nbd_socket, timeout=10).open("v") as other:
            assert other.read(0, 4096) == data[:4096]
        grew = grown(pid, before)
        stalled_disk.resume()
        rep = cl.reply()
        assert (rep.cookie, rep.error) == (2, 0)
        cl.wait_closed(30)
        sender.join(30)
    assert grew < 24 * MiB, f"bytes sent after DISC made the daemon grow by {grew / MiB:.0f} MiB"


