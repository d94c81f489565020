"""Pairs on a full disk (issue 9, "A full disk"): a pair that fails must say
so after a restart, a bit must not live in memory only, admin calls say the
disk is full, and a split secondary still serves what P holds.

The data directory is on a small tmpfs that a filler file fills up; freeing
the filler gives the space back. Every test fails on the code before the
write-intent and fault-record changes.
"""
from __future__ import annotations

import errno
import os
import signal

import pytest

from splitctl.client import AdminError
from tests.conftest import Daemon
from tests.daemon.test_enospc import small_fs  # noqa: F401  (the fixture)
from tests.pairs.helpers import first_mismatch, image_digests, show, wait_until

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.root

MiB = 1 << 20
DATA = os.urandom(2 * MiB)


def fill(fs) -> None:
    """Fill the filesystem until a write fails with ENOSPC."""
    with open(fs / "filler", "wb", buffering=0) as f:
        block = bytes(64 * 1024)
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def unfill(fs) -> None:
    os.unlink(fs / "filler")


@pytest.fixture
def d(tmp_path, small_fs):  # noqa: F811
    d = Daemon(tmp_path / "run", tcp=False)
    d.tmp.mkdir()
    d.data_dir = small_fs / "data"
    d.start()
    d.fs = small_fs
    yield d
    if (small_fs / "filler").exists():
        unfill(small_fs)
    d.stop()


def connect(d, name: str):
    h = nbd.NBD()
    h.connect_uri(d.uri(name))
    return h


def primary_with_data(d, pending: bool) -> None:
    """p (16 MiB, 2 MiB of data) paired with s; split. pending: the copy
    has not started (rate 1 B/s), else it has finished before the split."""
    d.create_volume("p", "16M")
    h = connect(d, "p")
    h.pwrite(DATA, 0)
    h.flush()
    h.shutdown()
    d.call("pair.create", primary="p", secondary="s", create_secondary=True,
           rate=1 if pending else 0)
    if not pending:
        wait_until(d, "s", "state pair", lambda i: i["state"] == "pair")
    d.call("pair.split", name="s")
    assert (show(d, "s")["pending"] > 0) == pending


def restart(d) -> None:
    d.stop(signal.SIGTERM)
    d.start()


def test_a_failed_copy_on_write_is_still_an_error_after_a_restart(d):
    """Copy-on-write cannot write S: the pair goes to error, and a restart
    (after space is freed) finds it in error, not split with the region
    pending (whose next copy would put P's post-split data into S)."""
    primary_with_data(d, pending=True)
    fill(d.fs)
    h = connect(d, "p")
    h.pwrite(b"x" * 4096, 0)        # P's region is allocated: written in place
    h.shutdown()
    info = show(d, "s")
    assert info["state"] == "error" and "copy-on-write" in info["reason"], info
    unfill(d.fs)
    restart(d)
    info = show(d, "s")
    assert info["state"] == "error", f"the error was not kept over the restart: {info}"
    assert "copy-on-write" in info["reason"], info


def test_a_changed_bit_is_never_lost_on_a_full_disk(d):
    """A P write after the split on a full disk: its changed-P bit is on disk
    (the bitmap files are allocated in full), so the resync after a restart
    copies it. Before, the first write failed after setting the bit in memory,
    the retry wrote the data without the bit, and S stayed wrong."""
    primary_with_data(d, pending=False)
    fill(d.fs)
    h = connect(d, "p")
    new = os.urandom(4096)
    try:
        h.pwrite(new, MiB)          # region 16: allocated, written in place
    except nbd.Error:
        h.pwrite(new, MiB)          # what a client does: try again
    h.flush()
    h.shutdown()
    unfill(d.fs)
    restart(d)
    d.call("pair.resync", name="s")
    wait_until(d, "s", "state pair", lambda i: i["state"] == "pair")
    d.call("pair.split", name="s")
    wait_until(d, "s", "copied", lambda i: i["pending"] == 0)
    p, s = image_digests(d.uri("p")), image_digests(d.uri("s"))
    assert first_mismatch(p, s) is None, first_mismatch(p, s)


def test_admin_calls_say_the_disk_is_full(d):
    fill(d.fs)
    with pytest.raises(AdminError) as e:
        d.create_volume("x", "16M")
    assert e.value.code == "no-space", e.value
    assert e.value.message.startswith("no space left in the data directory"), e.value
    cp = d.splitctl("volume", "create", "y", "16M", check=False)
    assert cp.returncode == 1 and "no space left" in cp.stderr, cp


def test_copy_on_read_on_a_full_disk_serves_the_image_from_p(d):
    """S's disk is full: a read of a pending region is served from P (the
    split image is still there) and the region stays pending."""
    primary_with_data(d, pending=True)
    pending = show(d, "s")["pending"]
    fill(d.fs)
    h = connect(d, "s")
    assert h.pread(65536, 0) == DATA[:65536]
    h.shutdown()
    info = show(d, "s")
    assert info["state"] == "split" and info["pending"] == pending, info
