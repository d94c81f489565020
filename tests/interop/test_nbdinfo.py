"""nbdinfo (libnbd) against splitd: what a client learns in the handshake
(sizes, block sizes, flags, the export list) and what base:allocation says.

Checks DESIGN.md "NBD": BLOCK_SIZE info with a 32 MiB payload limit, the
transmission flags a writable volume advertises, read-only volumes, LIST, and
holes reported through base:allocation.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import need
from tests.interop.clients import KiB, MiB, run, uri


@pytest.fixture(autouse=True)
def nbdinfo():
    need("nbdinfo")


def info_json(daemon, name: str, transport: str = "unix") -> dict:
    cp = run(["nbdinfo", "--json", uri(daemon, name, transport)], daemon)
    reply = json.loads(cp.stdout)
    exports = reply["exports"]
    assert len(exports) == 1, exports
    return reply


def map_json(daemon, name: str) -> list[dict]:
    cp = run(["nbdinfo", "--map", "--json", daemon.uri(name)], daemon)
    return json.loads(cp.stdout)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_json_describes_a_writable_volume(daemon, transport):
    daemon.create_volume("disk", 64 * MiB)
    reply = info_json(daemon, "disk", transport)
    assert reply["protocol"] == "newstyle-fixed"
    assert reply["structured"] is True
    e = reply["exports"][0]
    assert e["export-name"] == "disk"
    assert e["export-size"] == 64 * MiB
    # BLOCK_SIZE info: 512-byte I/O must be accepted (the kernel client's
    # sector), 4 KiB is the page size of the backing file, 32 MiB the payload cap.
    assert "block_size_minimum" in e, "server sent no NBD_INFO_BLOCK_SIZE"
    assert 1 <= e["block_size_minimum"] <= 512
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 * MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn",
                 "can_fast_zero", "can_df", "can_cache"):
        assert e[flag] is True, (flag, e)
    assert e["is_read_only"] is False
    assert "base:allocation" in e["contexts"]


def test_json_shows_a_read_only_volume(daemon):
    daemon.call("volume.create", name="golden", size=16 * MiB, read_only=True)
    daemon.create_volume("scratch", 16 * MiB)
    ro = info_json(daemon, "golden")["exports"][0]
    rw = info_json(daemon, "scratch")["exports"][0]
    assert ro["export-size"] == 16 * MiB
    assert ro["is_read_only"] is True
    assert rw["is_read_only"] is False
    # Reading and flushing a read-only export stays possible.
    assert ro["can_flush"] is True


def test_list_shows_every_volume(daemon):
    sizes = {"alpha": 4 * MiB, "beta.2": 12 * MiB, "gamma_3": 1024 * MiB, "delta-4": 4 * KiB}
    for name, size in sizes.items():
        daemon.create_volume(name, size)
    daemon.call("volume.create", name="ro", size=8 * MiB, read_only=True)
    sizes["ro"] = 8 * MiB

    cp = run(["nbdinfo", "--list", "--json", daemon.uri("alpha")], daemon)
    listed = {e["export-name"]: e for e in json.loads(cp.stdout)["exports"]}
    assert set(listed) == set(sizes)
    for name, size in sizes.items():
        assert listed[name]["export-size"] == size, name
        assert listed[name]["is_read_only"] is (name == "ro"), name

    # The plain listing names each export too (same LIST reply, other printer).
    text = run(["nbdinfo", "--list", daemon.uri("alpha", tcp=True)], daemon).stdout
    for name in sizes:
        assert f'export="{name}":' in text, text


def test_map_of_a_fresh_volume_is_one_hole(daemon):
    daemon.create_volume("fresh", 256 * MiB)
    assert map_json(daemon, "fresh") == [
        {"offset": 0, "length": 256 * MiB, "type": 3, "description": "hole,zero"}]
    totals = run(["nbdinfo", "--map", "--totals", daemon.uri("fresh")], daemon).stdout.split()
    assert totals[:3] == [str(256 * MiB), "100.0%", "3"], totals


def test_map_shows_data_exactly_where_it_was_written(daemon):
    nbd = pytest.importorskip("nbd")
    size = 32 * MiB
    daemon.create_volume("mapped", size)
    written = [(1 * MiB, 4 * KiB), (8 * MiB, 64 * KiB), (20 * MiB + 12 * KiB, 4 * KiB),
               (size - 4 * KiB, 4 * KiB)]
    h = nbd.NBD()
    h.connect_uri(daemon.uri("mapped"))
    for offset, length in written:
        h.pwrite(b"\xa5" * length, offset)
    h.flush()

    def expected(data: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
        out, pos = [], 0
        for offset, length in data:
            if offset > pos:
                out.append((pos, offset - pos, False))
            out.append((offset, length, True))
            pos = offset + length
        if pos < size:
            out.append((pos, size - pos, False))
        return out

    def observed() -> list[tuple[int, int, bool]]:
        entries = map_json(daemon, "mapped")
        # Data has the HOLE bit (1) clear; holes read as zeroes (type 3).
        for e in entries:
            assert e["type"] in (0, 2, 3), e
        return [(e["offset"], e["length"], not e["type"] & 1) for e in entries]

    assert observed() == expected(written)

    # Trimming the 64 KiB extent turns it back into a hole.
    h.trim(64 * KiB, 8 * MiB)
    h.flush()
    h.shutdown()
    assert observed() == expected([w for w in written if w[0] != 8 * MiB])


def test_can_and_is_answer_per_volume(daemon):
    daemon.create_volume("rw", 8 * MiB)
    daemon.call("volume.create", name="ro", size=8 * MiB, read_only=True)

    def answer(what: str, name: str, option: str = "--can") -> bool:
        # nbdinfo --can/--is exits 0 for true, 2 for false, anything else is an error.
        cp = run(["nbdinfo", option, what, daemon.uri(name)], daemon, ok=(0, 2))
        return cp.returncode == 0

    for what in ("connect", "read", "write", "trim", "zero", "flush", "fua",
                 "multi-conn", "cache", "df", "structured-reply"):
        assert answer(what, "rw"), what
    for what in ("connect", "read", "flush"):
        assert answer(what, "ro"), what
    assert not answer("write", "ro")
    assert not answer("tls", "rw")
    assert answer("read-only", "ro", "--is")
    assert not answer("read-only", "rw", "--is")
    assert not answer("rotational", "rw", "--is")
    cp = run(["nbdinfo", "--size", daemon.uri("ro")], daemon)
    assert cp.stdout.strip() == str(8 * MiB)
