"""splitctl for split generations, the primary side and read counters:
`pair show`, `pair split`, `group split`, `locate [--primary]` and
`status --connections`, as text and --json, against the real daemon."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import BIN

nbd = pytest.importorskip("nbd")

MiB = 1 << 20


def words(cp: subprocess.CompletedProcess) -> str:
    return " ".join(cp.stdout.split())


def synced_pair(daemon, primary: str = "db", secondary: str = "snap", group: str | None = None):
    daemon.create_volume(primary, "2M")
    args = ["pair", "create", primary, secondary, "--create-secondary"]
    daemon.splitctl(*args, *(["--group", group] if group else []))
    daemon.splitctl("pair", "wait", secondary, "--until", "synced", "--timeout", "60")


def test_pair_show_split_and_resync_text_and_json(daemon):
    synced_pair(daemon)
    shown = json.loads(daemon.splitctl("pair", "show", "snap", "--json").stdout)
    assert (shown["split_gen"], shown["delta_base"], shown["split_at"]) == (0, None, None)
    assert "split gen: 0 (delta: every region, no base)" in words(daemon.splitctl(
        "pair", "show", "snap"))
    cp = daemon.splitctl("pair", "split", "snap")
    assert words(cp).endswith("; split gen 1 (delta: every region, no base)")
    daemon.splitctl("pair", "resync", "snap")
    daemon.splitctl("pair", "wait", "snap", "--until", "synced", "--timeout", "60")
    split = json.loads(daemon.splitctl("pair", "split", "snap", "--json").stdout)
    assert (split["split_gen"], split["delta_base"]) == (2, 1) and split["split_at"]
    assert "split gen: 2 (delta since split 1)" in words(daemon.splitctl("pair", "show", "snap"))
    listed = json.loads(daemon.splitctl("pair", "list", "--json").stdout)["pairs"]
    assert [(p["split_gen"], p["delta_base"]) for p in listed] == [(2, 1)]


def test_group_split_shows_each_members_generation(daemon):
    synced_pair(daemon, "p1", "s1", group="g")
    synced_pair(daemon, "p2", "s2", group="g")
    daemon.splitctl("pair", "split", "s1")
    daemon.splitctl("pair", "resync", "s1")
    daemon.splitctl("pair", "wait", "s1", "--until", "synced", "--timeout", "60")
    lines = daemon.splitctl("group", "split", "g").stdout.splitlines()
    assert lines[1].split() == ["NAME", "PRIMARY", "SECONDARY", "TO", "COPY", "SPLIT", "GEN",
                                "DELTA", "BASE"]
    assert lines[2].split()[-2:] == ["2", "1"] and lines[2].split()[0] == "s1"
    assert lines[3].split()[-2:] == ["1", "-"] and lines[3].split()[0] == "s2"
    for name in ("s1", "s2"):
        daemon.splitctl("pair", "resync", name)
        daemon.splitctl("pair", "wait", name, "--until", "synced", "--timeout", "60")
    again = json.loads(daemon.splitctl("group", "split", "g", "--json").stdout)
    assert [(p["name"], p["split_gen"], p["delta_base"]) for p in again["pairs"]] == [
        ("s1", 3, 2), ("s2", 2, 1)]


def test_locate_text_and_json(daemon):
    synced_pair(daemon, group="g")
    daemon.splitctl("pair", "split", "snap")
    cp = daemon.splitctl("locate", "snap", "--port", "unix")
    lines = cp.stdout.splitlines()
    assert lines[0] == f"nbd+unix:///snap?socket={daemon.nbd_socket}"
    text = words(cp)
    for part in ("pair: snap (db -> snap)", "state: split", "group: g",
                 "split gen: 1 (delta: every region, no base)",
                 "generation: 1 (of the bitmap files)", "port: unix (TLS off)"):
        assert part in text, (part, cp.stdout)
    got = json.loads(daemon.splitctl("locate", "snap", "--port", "unix", "--json").stdout)
    assert {k: got[k] for k in ("role", "volume", "group", "split_gen", "delta_base")} == {
        "role": "secondary", "volume": "snap", "group": "g", "split_gen": 1, "delta_base": None}
    # --primary: the primary's URI first, then what it is.
    cp = daemon.splitctl("locate", "snap", "--port", "unix", "--primary")
    assert cp.stdout.splitlines()[0] == f"nbd+unix:///db?socket={daemon.nbd_socket}"
    text = words(cp)
    assert "volume: db (the primary side)" in text and "pair: snap (db -> snap)" in text
    # The state needs no note for the primary: it is served in every state.
    assert "state: split volume" not in text and "served only" not in text
    got = json.loads(daemon.splitctl("locate", "db", "--port", "unix", "--primary",
                                     "--json").stdout)
    assert (got["role"], got["volume"], got["pair"], got["split_gen"]) == ("primary", "db",
                                                                            "snap", 1)


def test_status_connections_text_and_json(daemon):
    daemon.create_volume("db", "2M")
    cp = daemon.splitctl("status", "--connections")
    assert cp.stdout.strip() == "no NBD connections"
    assert json.loads(daemon.splitctl("status", "--connections", "--json").stdout) == {
        "connections": [], "closed": []}
    h = nbd.NBD()
    h.connect_uri(daemon.uri("db"))
    try:
        h.pread(MiB, 0)
        h.pread(MiB, MiB)
        got = json.loads(daemon.splitctl("status", "--connections", "--json").stdout)
        [c] = got["connections"]
        assert (c["id"], c["export"], c["listener"], c["read_requests"], c["read_bytes"]) == (
            1, "db", "unix", 2, 2 * MiB)
        assert "uid" in c["peer"] and c["since"] > 0
        lines = daemon.splitctl("status", "--connections").stdout.splitlines()
        assert lines[0].split()[:5] == ["ID", "EXPORT", "PEER", "PORT", "FOR"]
        assert lines[1].split()[:2] == ["1", "db"] and str(2 * MiB) in lines[1].split()
    finally:
        h.shutdown()


@pytest.mark.parametrize("command, parts", [
    (["locate"], ["--primary", "split gen", "delta base", "generation", "role", "volume",
                  "group", "split_gen", "delta_base"]),
    (["status"], ["--connections", "READS", "BYTES READ", "read_requests", "read_bytes",
                  "closed", "last 64"]),
])
def test_help(command, parts):
    cp = subprocess.run([str(BIN / "splitctl"), *command, "--help"], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0
    for part in parts:
        assert part in cp.stdout, part


def test_bad_command_lines_exit_2(daemon):
    for args, reason in [(["locate", "db", "--primary"], "--port"),
                         (["status", "--connections=yes"], "--connections")]:
        cp = daemon.splitctl(*args, check=False)
        assert cp.returncode == 2, cp
        assert reason in cp.stderr and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
