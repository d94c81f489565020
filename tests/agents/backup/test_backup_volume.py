"""splitctl backup run --volume (an export read as it is) and restore, against
the real daemon: data, written zeroes and holes; only allocated data read,
zero chunks not stored; restored to a sparse file and into a new volume,
byte-exact (cmp, nbdcopy); list / show / verify / check on the result."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.agents.backup.helpers import (
    MiB,
    backup,
    backup_fails,
    first_mismatch,
    image_digests,
    write_blocks,
)
from tests.conftest import need

pytest.importorskip("nbd")

SIZE = 64 * MiB


@pytest.fixture
def volume(daemon):
    """Volume v: data in MiB 0-2, 4 KiB at 17 MiB + 8 KiB (a chunk mostly
    hole), written zeroes in MiB 24-31, data in the last MiB; holes elsewhere."""
    daemon.create_volume("v", SIZE)
    write_blocks(daemon, "v", [0], seed=1, length=3 * MiB)
    write_blocks(daemon, "v", [17 * MiB + 8192], seed=2)
    write_blocks(daemon, "v", [SIZE - MiB], seed=3, length=MiB)
    import nbd
    h = nbd.NBD()
    h.connect_uri(daemon.uri("v"))
    h.pwrite(bytes(8 * MiB), 24 * MiB)      # allocated zeroes: read, found zero, not stored
    h.shutdown()
    return "v"


def test_volume_backup_and_restore(daemon, volume, tmp_path):
    need("nbdcopy", "cmp")
    store = tmp_path / "store"
    made = backup(daemon, "init", str(store))
    assert made["chunk_size"] == 4 * MiB and not made["encrypted"]
    r = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", str(store))
    assert r["mode"] == "full" and "no pair" in r["reason"], r
    # Chunks 0, 4 (17 MiB), 6-7 (24-31 MiB, allocated zeroes) and 15 are read;
    # the rest are holes: never read.
    assert r["chunks_read"] == 5 and r["bytes_read"] == 5 * 4 * MiB, r
    assert r["chunks_zero"] == 16 - 3, r          # holes, and the written zeroes
    assert r["new_bytes"] == 3 * 4 * MiB, r       # chunks 0, 4, 15: stored
    assert r["connections"] > 1, "splitd allows multi-conn: several connections expected"

    listed = backup(daemon, "list", "--store", str(store))["snapshots"]
    assert [m["id"] for m in listed] == [r["snapshot"]]
    shown = backup(daemon, "show", r["snapshot"], "--store", str(store))
    assert shown["sizes"]["logical"] == SIZE and shown["sizes"]["new_data"] == 12 * MiB, shown
    assert shown["sizes"]["stored_new"] <= shown["sizes"]["new_data"], shown
    assert backup(daemon, "verify", r["snapshot"], "--store", str(store))["ok"]
    assert backup(daemon, "check", "--store", str(store))["ok"]

    # To a sparse file: byte-exact, holes kept.
    original = tmp_path / "original.img"
    subprocess.run(["nbdcopy", daemon.uri(volume), str(original)], check=True, timeout=60)
    out = tmp_path / "restored.img"
    res = backup(daemon, "restore", r["snapshot"], "--from", str(store), "--to", str(out))
    assert res["digest_checked"] and res["check"] == "written" and res["bytes_written"] == 12 * MiB, res
    subprocess.run(["cmp", str(original), str(out)], check=True)
    assert os.stat(out).st_blocks * 512 <= 16 * MiB, "the restored file is not sparse"

    # Into a new volume, made by the restore.
    res = backup(daemon, "restore", r["snapshot"], "--from", str(store), "--to-volume", "r",
                 "--create")
    assert res["volume_created"] and res["digest_checked"] and res["connections"] > 1, res
    assert daemon.call("volume.show", name="r")["size"] == SIZE
    assert first_mismatch(image_digests(daemon.uri(volume)), image_digests(daemon.uri("r"))) is None

    # Over an existing volume full of other data: zero runs are zeroed.
    write_blocks(daemon, "r", list(range(0, SIZE, 2 * MiB)), seed=9, length=MiB)
    res = backup(daemon, "restore", r["snapshot"], "--from", str(store), "--to", daemon.uri("r"),
                 "--verify-readback")
    assert res["check"] == "read-back" and res["bytes_written"] == 12 * MiB, res
    assert first_mismatch(image_digests(daemon.uri(volume)), image_digests(daemon.uri("r"))) is None


def test_second_backup_dedups(daemon, volume, tmp_path):
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    first = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", str(store))
    again = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", str(store))
    assert again["mode"] == "full" and again["new_bytes"] == 0 and again["stored_bytes"] == 0, again
    assert first["snapshot"] != again["snapshot"]


def test_encrypted_store_and_errors(daemon, volume, tmp_path):
    store, key = tmp_path / "store", tmp_path / "key"
    made = backup(daemon, "init", str(store), "--encrypt", str(key))
    assert made["encrypted"] and made["key_made"] and key.exists()
    status, err, _ = backup_fails(daemon, "run", "--volume", daemon.uri(volume), "--to", str(store))
    assert status == 1 and "encrypted" in err["message"], err
    r = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", str(store), "--key-file", str(key))
    other = tmp_path / "other.key"
    from agents.store import new_key_file
    new_key_file(str(other))
    out = tmp_path / "x.img"
    status, err, _ = backup_fails(daemon, "restore", r["snapshot"], "--from", str(store), "--to", str(out),
                                  "--key-file", str(other))
    assert status == 1 and "wrong key" in err["message"] and not out.exists(), err
    # Bad command lines: exit 2, nothing done.
    status, err, _ = backup_fails(daemon, "run", "--volume", daemon.uri(volume), "--pair", "s",
                                  "--to", str(store))
    assert status == 2 and "one of" in err["message"], err
    status, err, _ = backup_fails(daemon, "restore", r["snapshot"], "--from", str(store))
    assert status == 2, err
    status, err, _ = backup_fails(daemon, "list", "--store", str(tmp_path / "nothing"))
    assert status == 1 and "no backup store" in err["message"], err
    status, err, _ = backup_fails(daemon, "run", "--volume", daemon.uri("nope"), "--to", str(store),
                                  "--key-file", str(key))
    assert status == 1 and "cannot read" in err["message"], err


def test_corrupt_chunk_named_and_restore_refused(daemon, volume, tmp_path):
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    r = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", str(store))
    chunk = sorted((store / "chunks").rglob("*"))
    victim = [p for p in chunk if p.is_file()][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    cp = daemon.splitctl("backup", "verify", r["snapshot"], "--store", str(store), check=False)
    assert cp.returncode == 1 and victim.name in cp.stdout and r["snapshot"] in cp.stdout, cp
    # The restore writes every other chunk, then refuses naming the chunk and
    # each byte range of the image it held (offset+length), into a file and
    # into a volume.
    from agents.store import open_dir
    index = open_dir(str(store)).index(r["snapshot"])
    held = [i * 4 * MiB for i in range(index.count) if index.id_at(i).hex() == victim.name]
    assert held, "the corrupted chunk is not in the snapshot"
    ranges = ", ".join(f"{off}+{4 * MiB}" for off in held)
    out = tmp_path / "x.img"
    status, err, _ = backup_fails(daemon, "restore", r["snapshot"], "--from", str(store),
                                  "--to", str(out))
    assert status == 1 and victim.name in err["message"], err
    assert err["message"].startswith(f"snapshot {r['snapshot']} is damaged: image bytes {ranges} "
                                     f"(offset+length) were not restored to {out}"), err
    original = tmp_path / "original.img"
    subprocess.run(["nbdcopy", daemon.uri(volume), str(original)], check=True, timeout=60)
    for off in range(0, SIZE, 4 * MiB):
        with open(original, "rb") as a, open(out, "rb") as b:
            a.seek(off)
            b.seek(off)
            want = a.read(4 * MiB)
            assert (b.read(4 * MiB) == want) != (off in held), f"chunk at {off}"
    status, err, _ = backup_fails(daemon, "restore", r["snapshot"], "--from", str(store),
                                  "--to-volume", "r", "--create")
    assert status == 1 and err["message"].startswith(
        f"snapshot {r['snapshot']} is damaged: image bytes {ranges} (offset+length)"), err


def test_human_output(daemon, volume, tmp_path):
    """Every command's text output, once: the facts people look for."""
    store = str(tmp_path / "store")

    def text(*args: str) -> str:
        return daemon.splitctl("backup", *args).stdout

    assert "created backup store" in text("init", store)
    out = text("run", "--volume", daemon.uri(volume), "--to", store)
    sid = out.splitlines()[0]
    assert "mode:" in out and "full" in out and "after dedup and compression" in out, out
    text("run", "--volume", daemon.uri(volume), "--to", store)
    listed = text("list", "--store", store)
    assert listed.startswith("ID") and sid in listed and "full" in listed, listed
    shown = text("show", sid, "--store", store)
    assert "logical:    64 MiB" in shown and "stored new:" in shown, shown
    assert text("verify", sid, "--store", store, "--sample", "50").startswith("ok: 1 snapshots")
    assert text("check", "--store", store).startswith("ok: 2 snapshots")
    pruned = text("prune", "--keep-last", "1", "--store", store, "--dry-run")
    assert "would remove 1 snapshots, kept 1" in pruned, pruned
    assert "gc:" in text("gc", "--store", store, "--dry-run")
    assert f"forgot 1 snapshots: {sid}" in text("forget", sid, "--store", store)
    sid2 = text("list", "--store", store).splitlines()[1].split()[0]
    restored = text("restore", sid2, "--from", store, "--to", str(tmp_path / "r.img"))
    assert "image digest of what was written matched" in restored, restored
    restored = text("restore", sid2, "--from", store, "--to", str(tmp_path / "r.img"),
                    "--verify-readback")
    assert "image digest of what was written and read back matched" in restored, restored
    restored = text("restore", sid2, "--from", store, "--to", str(tmp_path / "r.img"), "--no-check")
    assert "image digest not checked (--no-check)" in restored, restored
    cp = daemon.splitctl("backup", "restore", sid2, "--from", store, "--to", str(tmp_path / "r.img"),
                         "--no-check", "--verify-readback", check=False)
    assert cp.returncode == 2 and "--no-check and --verify-readback: give one" in cp.stderr, cp
