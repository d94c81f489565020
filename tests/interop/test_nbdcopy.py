"""nbdcopy (libnbd) into and out of splitd volumes: file -> volume -> file,
sparse sources over old data, and several connections at once (CAN_MULTI_CONN).
"""
from __future__ import annotations

import os
import re

import pytest

from tests.conftest import need
from tests.interop.clients import KiB, MiB, files_equal, run, uri, write_sparse_image


@pytest.fixture(autouse=True)
def nbdcopy():
    need("nbdcopy")


def opened(daemon, name: str) -> int:
    """How many NBD connections opened `name` so far, from the daemon's log."""
    return len(re.findall(rf"opened export {re.escape(name)} ", daemon.log()))


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_random_file_in_and_out(daemon, tmp_path, transport):
    size = 24 * MiB
    daemon.create_volume("vol", size)
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(os.urandom(size))
    target = uri(daemon, "vol", transport)
    run(["nbdcopy", "--flush", src, target], daemon)
    run(["nbdcopy", target, out], daemon)
    assert out.stat().st_size == size
    files_equal(src, out)


def test_sparse_source_over_old_data(daemon, tmp_path):
    # The volume holds random bytes first; copying a mostly-empty image over
    # it must leave zeroes in the holes (nbdcopy zeroes them with WRITE_ZEROES).
    size = 16 * MiB
    daemon.create_volume("vol", size)
    noise, sparse, out = tmp_path / "noise.img", tmp_path / "sparse.img", tmp_path / "out.img"
    noise.write_bytes(os.urandom(size))
    write_sparse_image(sparse, size, [(640 * KiB, 192 * KiB), (5 * MiB + 4 * KiB, 4 * KiB),
                                      (size - 64 * KiB, 64 * KiB)])
    run(["nbdcopy", noise, daemon.uri("vol")], daemon)
    run(["nbdcopy", sparse, daemon.uri("vol")], daemon)
    run(["nbdcopy", daemon.uri("vol"), out], daemon)
    files_equal(sparse, out)


def test_four_connections(daemon, tmp_path):
    size = 32 * MiB
    daemon.create_volume("vol", size)
    daemon.create_volume("copy", size)
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(os.urandom(size))

    before = opened(daemon, "vol")
    run(["nbdcopy", "--connections", "4", "--threads", "4", "--requests", "16",
         "--request-size", str(MiB), "--flush", src, daemon.uri("vol")], daemon)
    # nbdcopy opens several connections only when the server sets CAN_MULTI_CONN,
    # and no more than --threads (which defaults to the number of cores).
    assert opened(daemon, "vol") - before == 4, daemon.log()[-2000:]

    # Volume to volume, both ends over four connections (one Unix, one TCP).
    run(["nbdcopy", "-C", "4", "-T", "4", daemon.uri("vol"), daemon.uri("copy", tcp=True)], daemon)
    run(["nbdcopy", "-C", "4", "-T", "4", daemon.uri("copy"), out], daemon)
    files_equal(src, out)
