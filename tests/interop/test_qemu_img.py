"""qemu-img (QEMU's NBD client) against splitd: convert into an export and out
of it, compare, and map through base:allocation, with both ways QEMU names an
NBD export (the legacy `nbd:unix:PATH:exportname=NAME` and URIs).
"""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import need
from tests.interop.clients import KiB, MiB, files_equal, run, write_sparse_image

SIZE = 16 * MiB
# Data islands of the source image; everything else is a hole.
ISLANDS = [(192 * KiB, 128 * KiB), (3 * MiB + 4 * KiB, 4 * KiB), (10 * MiB, 1 * MiB),
           (SIZE - 64 * KiB, 64 * KiB)]


@pytest.fixture(autouse=True)
def qemu_img():
    need("qemu-img")


def target(daemon, name: str, form: str) -> str:
    if form == "legacy":
        return f"nbd:unix:{daemon.nbd_socket}:exportname={name}"
    if form == "legacy-tcp":
        return f"nbd:127.0.0.1:{daemon.tcp_port}:exportname={name}"
    return daemon.uri(name, tcp=(form == "uri-tcp"))


FORMS = ["legacy", "uri", "legacy-tcp", "uri-tcp"]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.img"
    write_sparse_image(path, SIZE, ISLANDS, seed=7)
    return path


@pytest.mark.parametrize("form", FORMS)
def test_convert_in_compare_and_out(daemon, tmp_path, source, form):
    daemon.create_volume("vol", SIZE)
    nbd = target(daemon, "vol", form)
    # Old data first, so the holes of the source must be written as zeroes.
    noise = tmp_path / "noise.img"
    noise.write_bytes(os.urandom(SIZE))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", noise, nbd], daemon)

    # -m 8 -W: eight coroutines, writes out of order.
    run(["qemu-img", "convert", "-n", "-m", "8", "-W", "-f", "raw", "-O", "raw", source, nbd],
        daemon)
    cp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, nbd], daemon)
    assert "Images are identical." in cp.stdout
    # compare does see a difference when there is one.
    cp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", noise, nbd], daemon, ok=(1,))
    assert "Content mismatch" in cp.stdout

    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", nbd, out], daemon)
    files_equal(source, out)


@pytest.mark.parametrize("form", FORMS[:2])
def test_map_shows_holes_and_data(daemon, source, form):
    daemon.create_volume("vol", SIZE)
    nbd = target(daemon, "vol", form)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, nbd], daemon)

    cp = run(["qemu-img", "map", "--output=json", "-f", "raw", nbd], daemon)
    entries = json.loads(cp.stdout)
    # The map covers the whole export, in order, without gaps.
    pos = 0
    for e in entries:
        assert e["start"] == pos, entries
        pos += e["length"]
    assert pos == SIZE
    data = [(e["start"], e["length"]) for e in entries if e["data"]]
    assert data == ISLANDS, entries
    for e in entries:
        # Holes read as zeroes; data is not claimed to be zero.
        assert e["zero"] is (not e["data"]), e
        assert e["present"] is True, e
