"""A full disk reaches the client as ENOSPC, and the daemon keeps serving."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.conftest import Daemon

nbd = pytest.importorskip("nbd")


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_full_disk_is_enospc_and_the_daemon_keeps_serving(tmp_path, small_fs):
    d = Daemon(tmp_path / "run", tcp=False)
    d.tmp.mkdir()
    d.data_dir = small_fs / "data"
    d.start()
    try:
        # Sparse: a 64 MiB volume fits on a 6 MiB filesystem until written.
        d.create_volume("big", "64M")
        h = nbd.NBD()
        h.connect_uri(d.uri("big"))
        block = os.urandom(1 << 20)
        written = []
        with pytest.raises(nbd.Error) as exc:
            for i in range(64):
                h.pwrite(block, i << 20)
                written.append(i)
        # libnbd gives the errno by name.
        assert exc.value.errno == errno.errorcode[errno.ENOSPC]
        assert 1 <= len(written) < 8
        # The same connection still serves reads of what was written.
        assert h.pread(1 << 20, 0) == block
        # A new client is served too, and the admin socket answers.
        h2 = nbd.NBD()
        h2.connect_uri(d.uri("big"))
        assert h2.pread(4096, 0) == block[:4096]
        assert d.call("status")["volumes"] == 1
        # Freeing space (trim) makes writes work again.
        h.trim(32 << 20, 0)
        h.pwrite(block[:4096], 0)
        h.flush()
        h2.shutdown()
        h.shutdown()
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log()
