"""Storage that fails: the data directory on a disk whose reads or writes
return EIO on demand, and what NBD clients see.

The disk is nbdkit's memory plugin behind its error filter, which fails every
read (or write) while a trigger file exists; nbdfuse shows it as a file, a
loop device makes it a block device, and ext4 on that holds splitd's data
directory. DESIGN.md "NBD": storage faults reach the client as EIO, "never a
crash, never a hang"; a READ whose reply has begun can only end in a hard
disconnect (proto.md "Simple reply message", "Structured reply chunk
message"); a flush that fails at stop is not a clean stop.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import Closed, RawClient
from tests.interop.clients import MiB, random_bytes
from tests.interop.fusedisk import ext4_over_nbdkit

pytestmark = pytest.mark.root

DISK = "256M"
VOL_SIZE = 16 * MiB
DATA = random_bytes(VOL_SIZE, 7)


class FaultyDisk:
    def __init__(self, root: Path, trigger_dir: Path):
        self.root = root
        self.read_fault = trigger_dir / "read-fault"
        self.write_fault = trigger_dir / "write-fault"


@pytest.fixture
def faulty_disk(tmp_path):
    triggers = tmp_path / "triggers"
    triggers.mkdir()
    read_fault, write_fault = triggers / "read-fault", triggers / "write-fault"
    with ext4_over_nbdkit(tmp_path, "error", [
            "memory", DISK, "error=EIO",
            "error-pread-rate=100%", f"error-pread-file={read_fault}",
            "error-pwrite-rate=100%", f"error-pwrite-file={write_fault}"]) as root:
        yield FaultyDisk(root, triggers)


def start(make_daemon, disk: FaultyDisk):
    """splitd with its data directory on the faulty disk and one volume of
    known data, durable on the disk and out of every cache."""
    d = make_daemon(["--data-dir", str(disk.root / "data")], tcp=False)
    d.create_volume("v", VOL_SIZE)
    with RawClient.unix(d.nbd_socket).open("v") as cl:
        for off in range(0, VOL_SIZE, MiB):
            assert cl.write(off, DATA[off:off + MiB], cookie=off) == 0
        assert cl.call(r.CMD_FLUSH, cookie=1)[0] == 0
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return d


def test_read_errors_reach_the_client(faulty_disk, make_daemon):
    d = start(make_daemon, faulty_disk)
    faulty_disk.read_fault.touch()
    try:
        for structured in (False, True):
            with RawClient.unix(d.nbd_socket).open("v", structured=structured) as cl:
                # A small read is read before its reply: an EIO reply, and the
                # connection goes on.
                error, _ = cl.call(r.CMD_READ, 3 * 4096, 4096, cookie=5)
                assert error == r.EIO
                error, _ = cl.call(r.CMD_READ, 5 * 4096, 4096, cookie=6)
                assert error == r.EIO
            with RawClient.unix(d.nbd_socket).open("v", structured=structured) as cl:
                # A large read goes out with sendfile, its header first: the
                # error comes after a header that said success, so the only
                # honest end is a hard disconnect, never a reply within the data.
                cl.send_request(r.CMD_READ, 8 * MiB, MiB, cookie=7)
                with pytest.raises(Closed):
                    cl.full_reply(MiB)
    finally:
        faulty_disk.read_fault.unlink()
    # The daemon served on and the data is intact.
    with RawClient.unix(d.nbd_socket).open("v", structured=True) as cl:
        assert cl.read(8 * MiB, MiB) == DATA[8 * MiB:9 * MiB]
        assert cl.read(3 * 4096, 4096) == DATA[3 * 4096:4 * 4096]
    assert "Traceback" not in d.log()


def test_write_errors_fail_flush_and_fua(faulty_disk, make_daemon):
    d = start(make_daemon, faulty_disk)
    with RawClient.unix(d.nbd_socket).open("v", structured=True) as cl:
        faulty_disk.write_fault.touch()
        try:
            # The write lands in the page cache; the flush that would make it
            # durable cannot, and says so.
            assert cl.write(0, b"x" * 65536, cookie=2) == 0
            assert cl.call(r.CMD_FLUSH, cookie=3)[0] == r.EIO
            assert cl.write(MiB, b"y" * 4096, cookie=4, flags=r.CMD_FLAG_FUA) == r.EIO
        finally:
            faulty_disk.write_fault.unlink()
        assert cl.read(MiB + 4096, 4096) == DATA[MiB + 4096:MiB + 8192]
    assert "Traceback" not in d.log()


def test_a_flush_that_fails_at_stop_is_not_a_clean_stop(faulty_disk, make_daemon):
    d = start(make_daemon, faulty_disk)
    with RawClient.unix(d.nbd_socket).open("v") as cl:
        assert cl.write(2 * MiB, b"z" * 65536, cookie=2) == 0
    faulty_disk.write_fault.touch()
    try:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 1, d.log()
    finally:
        faulty_disk.write_fault.unlink()
    assert "these volumes could not be flushed: v" in d.log()
