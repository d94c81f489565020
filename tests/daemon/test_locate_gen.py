"""`locate` against the real daemon: the primary side (role "primary",
`splitctl locate --primary`) opened with libnbd through the URI it gives,
and the split generations it reports (split_gen, delta_base, group), kept
across a clean restart and a kill -9, and matching the x-splitd:delta that
nbdinfo reads."""
from __future__ import annotations

import json
import subprocess

import pytest

from splitctl.client import AdminError
from tests.conftest import need
from tests.daemon.test_ports import locate, read_through, split_pair

nbd = pytest.importorskip("nbd")

MiB = 1 << 20


def test_locate_primary_gives_the_primary_volume(make_daemon):
    d = make_daemon()
    split_pair(d)       # db -> snap, split; db then got "after" at 0
    now = read_through(d.uri("db"), MiB)
    assert now.startswith(b"after")
    for name in ("snap", "db"):     # the pair, or the primary itself
        for port, uri in (("unix", f"nbd+unix:///db?socket={d.nbd_socket}"),
                          ("tcp", f"nbd://127.0.0.1:{d.tcp_port}/db")):
            got = locate(d, name, "--port", port, "--primary")
            assert (got["uri"], got["uris"]) == (uri, [uri])
            assert (got["role"], got["volume"], got["pair"]) == ("primary", "db", "snap")
            assert (got["primary"], got["secondary"], got["state"]) == ("db", "snap", "split")
            # It reads the primary as it is now, not the split image.
            assert read_through(got["uri"], MiB) == now
    # The default role is unchanged: the secondary.
    got = locate(d, "db", "--port", "unix")
    assert (got["role"], got["volume"], got["uri"]) == (
        "secondary", "snap", f"nbd+unix:///snap?socket={d.nbd_socket}")
    assert d.call("locate", name="db", port="unix", role="secondary") == got


def test_locate_primary_of_a_plain_volume_or_of_several_pairs(make_daemon):
    d = make_daemon()
    d.create_volume("plain", "1M")
    cp = d.splitctl("locate", "plain", "--port", "tcp", "--primary")
    uri = f"nbd://127.0.0.1:{d.tcp_port}/plain"
    assert cp.stdout.splitlines()[0] == uri
    assert "volume: plain (the primary side)" in " ".join(cp.stdout.split())
    got = d.call("locate", name="plain", port="tcp", role="primary")
    assert got["uri"] == uri and got["volume"] == "plain"
    assert all(got[k] is None for k in ("pair", "primary", "secondary", "state", "group",
                                        "generation", "split_gen", "delta_base", "split_at",
                                        "created"))
    assert read_through(uri, 4096) == bytes(4096)
    # A primary of two pairs is one volume: its URI, no one pair. Without
    # --primary it stays refused (which secondary?).
    d.call("pair.create", primary="plain", secondary="s1", create_secondary=True)
    d.call("pair.create", primary="plain", secondary="s2", create_secondary=True)
    got = d.call("locate", name="plain", port="unix", role="primary")
    assert got["volume"] == "plain" and got["pair"] is None
    with pytest.raises(AdminError) as e:
        d.call("locate", name="plain", port="unix")
    assert e.value.code == "bad-input" and "name the pair" in e.value.message
    # A pair name means its primary.
    assert d.call("locate", name="s2", port="unix", role="primary")["volume"] == "plain"


def test_locate_primary_refusals(make_daemon):
    d = make_daemon()
    d.create_volume("db", "1M")
    for params, code, words in [
        ({"role": "backup"}, "bad-input", "role must be one of secondary, primary"),
        ({"role": 1}, "bad-input", "role must be"),
        ({"name": "nothing"}, "not-found", "no volume or pair named 'nothing'"),
        ({"port": "nowhere"}, "not-found", "no port named 'nowhere'"),
    ]:
        call = {"name": "db", "port": "unix", "role": "primary", **params}
        with pytest.raises(AdminError) as e:
            d.call("locate", **call)
        assert e.value.code == code and words in e.value.message, e.value.message


def test_locate_and_pair_show_report_split_generations_across_restarts(make_daemon):
    d = make_daemon()
    d.create_volume("db", "4M")
    d.call("pair.create", primary="db", secondary="snap", create_secondary=True, group="g")
    with d.admin() as a:
        a.wait_pair("snap", "synced", timeout=50, interval=0.1)
    split = d.call("pair.split", name="snap")
    assert (split["split_gen"], split["delta_base"]) == (1, None) and split["split_at"]
    d.call("pair.resync", name="snap")
    with d.admin() as a:
        a.wait_pair("snap", "synced", timeout=50, interval=0.1)
    split = d.call("group.split", name="g")["pairs"][0]
    assert (split["name"], split["split_gen"], split["delta_base"]) == ("snap", 2, 1)
    got = locate(d, "snap", "--port", "unix")
    assert (got["split_gen"], got["delta_base"], got["group"]) == (2, 1, "g")
    assert got["split_at"] == split["split_at"] and got["created"] == split["created"] > 0
    # generation is the bitmap generation, not a split count (one resync: 2).
    assert got["generation"] == split["generation"] == 2
    text = " ".join(d.splitctl("locate", "snap", "--port", "unix").stdout.split())
    assert "split gen: 2 (delta since split 1)" in text and "group: g" in text
    assert "generation: 2 (of the bitmap files)" in text
    d.restart()
    assert (locate(d, "snap", "--port", "unix")["split_gen"],
            d.call("pair.show", name="snap")["delta_base"]) == (2, 1)
    d.kill9()
    d.start()
    show = json.loads(d.splitctl("pair", "show", "snap", "--json").stdout)
    assert (show["split_gen"], show["delta_base"], show["split_at"]) == (2, 1, split["split_at"])
    text = " ".join(d.splitctl("pair", "show", "snap").stdout.split())
    assert "split gen: 2 (delta since split 1)" in text


def delta_map(d, export: str) -> list[tuple[int, int]]:
    """(offset, length) of every x-splitd:delta extent flagged changed, as
    nbdinfo --map sees it."""
    cp = subprocess.run(["nbdinfo", "--json", "--map=x-splitd:delta", d.uri(export)],
                        check=True, capture_output=True, text=True, timeout=60)
    return [(e["offset"], e["length"]) for e in json.loads(cp.stdout) if e["type"] & 1]


def test_the_delta_served_is_what_delta_base_says(make_daemon):
    """Over NBD, as a backup agent sees it: after split 2 (delta_base 1),
    x-splitd:delta is exactly the regions changed since split 1."""
    need("nbdinfo")
    d = make_daemon()
    d.create_volume("db", "4M", region_size="64K")
    d.call("pair.create", primary="db", secondary="snap", create_secondary=True)
    with d.admin() as a:
        a.wait_pair("snap", "synced", timeout=50, interval=0.1)
    assert d.call("pair.split", name="snap")["delta_base"] is None
    assert delta_map(d, "snap") == [(0, 4 * MiB)]        # the first split: everything

    def write(export: str, offset: int, data: bytes) -> None:
        h = nbd.NBD()
        h.connect_uri(d.uri(export))
        h.pwrite(data, offset)
        h.shutdown()

    write("db", MiB, b"p" * 4096)             # P while split
    write("snap", 2 * MiB + 100, b"s" * 10)   # S while split
    d.call("pair.resync", name="snap")
    with d.admin() as a:
        a.wait_pair("snap", "synced", timeout=50, interval=0.1)
    write("db", 3 * MiB, b"q" * (128 << 10))  # P while mirroring: two regions
    split = d.call("pair.split", name="snap")
    assert (split["split_gen"], split["delta_base"]) == (2, 1)
    assert delta_map(d, "snap") == [(MiB, 64 << 10), (2 * MiB, 64 << 10), (3 * MiB, 128 << 10)]
