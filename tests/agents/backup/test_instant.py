"""splitctl backup restore --instant: a snapshot restored into a new volume
that the real daemon serves read-write at once, while the rest is restored
in the background (controller/instant.py); read and written with libnbd,
nbdcopy and ext4 over nbdfuse + loop, across kill -9 and restarts, and its
failures: a wrong key, a taken name, the store gone, a corrupt chunk."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.agents.backup.helpers import (
    MiB,
    backup,
    backup_fails,
    feed_fifo,
    fifo_chunk,
    fifo_object,
    fifo_writer,
    splitctl_started,
    write_blocks,
)
from tests.agents.backup.test_served import ext4_snapshot  # noqa: F401  (the fixture)
from tests.conftest import need

nbd = pytest.importorskip("nbd")

SIZE = 32 * MiB
CHUNK = MiB
REGION = 64 * 1024


@pytest.fixture
def image(daemon, tmp_path):
    """Volume src (data in MiB 0-4, 4 KiB at 20 MiB + 12 KiB, data in the
    last MiB, holes elsewhere) backed up into a store of 1 MiB chunks;
    (store, snapshot id, the image's bytes)."""
    need("nbdcopy")
    daemon.create_volume("src", SIZE)
    write_blocks(daemon, "src", [0], seed=1, length=5 * MiB)
    write_blocks(daemon, "src", [20 * MiB + 12288], seed=2)
    write_blocks(daemon, "src", [SIZE - MiB], seed=3, length=MiB)
    store = tmp_path / "store"
    backup(daemon, "init", str(store), "--chunk-size", "1M")
    sid = backup(daemon, "run", "--volume", daemon.uri("src"), "--to", str(store))["snapshot"]
    return store, sid, _read_all(daemon, "src")


def _read_all(daemon, export: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(daemon.uri(export))
    try:
        size = h.get_size()
        return b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))
    finally:
        h.shutdown()


def _instant(daemon, store, sid, name, *extra: str) -> dict:
    return backup(daemon, "restore", sid, "--from", str(store), "--to-volume", name, "--instant",
                  *extra)


def _status(daemon, name: str) -> dict:
    return daemon.call("backup.restore_status", volume=name)


def _unthrottle(daemon, name: str) -> None:
    """The restore at full speed, unless reads and writes restored it all already."""
    from splitctl.client import AdminError
    try:
        daemon.call("pair.set", name=name, rate=0)
    except AdminError:
        assert _status(daemon, name)["state"] == "restored"


def _opened(daemon, name: str, timeout: float = 30) -> dict:
    """pair.show of an instant restore once its store is open again after
    a start (it is opened in a thread, or the pair is in error)."""
    deadline = time.monotonic() + timeout
    while (show := daemon.call("pair.show", name=name))["source"]["opening"]:
        assert time.monotonic() < deadline, show
        time.sleep(0.05)
    return show


def _wait_restored(daemon, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _status(daemon, name)
        assert st["state"] != "error", st
        if st["state"] == "restored":
            return st
        time.sleep(0.1)
    raise AssertionError(f"restore of {name} not done in {timeout} s: {_status(daemon, name)}")


def test_every_byte_equals_the_snapshot(daemon, image, tmp_path):
    need("nbdcopy", "cmp", "nbdinfo")
    store, sid, plain = image
    started = time.monotonic()
    r = _instant(daemon, store, sid, "r", "--rate", "1M")
    assert r["name"] == "r" and r["state"] == "restore" and r["kind"] == "instant-restore", r
    # Every region of a non-zero chunk is to restore; zero chunks are not.
    assert r["remaining"] == (5 + 1 + 1) * CHUNK // REGION, r
    # Usable at once, whatever is left: its size, and a read of the last MiB.
    h = nbd.NBD()
    h.connect_uri(daemon.uri("r"))
    assert h.get_size() == SIZE and not h.is_read_only()
    assert h.pread(4096, SIZE - 4096) == plain[-4096:]
    assert time.monotonic() - started < 5
    # Zero chunks read as zeroes; a partial read across data and holes.
    assert h.pread(MiB, 10 * MiB) == bytes(MiB)
    assert h.pread(2 * MiB, 19 * MiB + 4096) == plain[19 * MiB + 4096:21 * MiB + 4096]
    h.shutdown()
    # Allocation: the snapshot's where not yet restored (holes are holes).
    cp = subprocess.run(["nbdinfo", "--map", "--json", daemon.uri("r")], check=True,
                        capture_output=True, text=True)
    holes = [(e["offset"], e["length"]) for e in json.loads(cp.stdout) if e["type"] & 1]
    assert (5 * MiB, 15 * MiB) in holes, holes
    show = daemon.call("pair.show", name="r")
    assert show["source"]["snapshot"] == sid and show["copy_on_read"] > 0, show
    assert "restore" in daemon.splitctl("pair", "show", "r").stdout
    assert "r" in daemon.splitctl("pair", "list").stdout
    assert "restoring from snapshot" in daemon.splitctl("backup", "restore-status", "r").stdout
    # Every byte while restoring (copy-on-read: that restores what it reads), by nbdcopy.
    out = tmp_path / "r.img"
    subprocess.run(["nbdcopy", daemon.uri("r"), str(out)], check=True)
    subprocess.run(["cmp", str(out), "-"], input=plain, check=True)
    # Done: the pair is dissolved, the volume stands alone and equal.
    st = json.loads(daemon.splitctl("backup", "restore-status", "r", "--wait", "--interval", "0.2",
                                    "--json").stdout)
    assert st["state"] == "restored", st
    assert "r" not in daemon.call("status")["pairs"]
    err = daemon.splitctl("pair", "show", "r", "--json", check=False)
    assert err.returncode == 1 and "dissolved" in err.stdout, err.stdout
    assert _read_all(daemon, "r") == plain
    # Sparse: the zero chunks were never written.
    assert daemon.call("volume.show", name="r")["allocated"] <= 8 * MiB


def test_writes_and_kill9_mid_restore(daemon, image):
    """Reads and writes (partial regions, zero chunks, across regions) while
    the restore runs slowly; kill -9; more after the restart; at the end the
    volume is the snapshot plus exactly those writes."""
    store, sid, plain = image
    _instant(daemon, store, sid, "w", "--rate", "256K")
    expected = bytearray(plain)
    rnd = random.Random(11)

    def write_some(n: int) -> None:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("w"))
        for _ in range(n):
            off = rnd.choice([rnd.randrange(0, 6 * MiB), rnd.randrange(0, SIZE - 70000),
                              20 * MiB + rnd.randrange(-70000, 70000)])
            data = rnd.randbytes(rnd.choice([1, 512, 4096, 70000]))
            h.pwrite(data, off)
            expected[off:off + len(data)] = data
        h.flush()
        h.shutdown()

    def check_some(n: int) -> None:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("w"))
        for _ in range(n):
            off = rnd.randrange(0, SIZE - 200000)
            length = rnd.choice([1, 4096, 65536, 200000])
            assert h.pread(length, off) == expected[off:off + length], f"at {off}+{length}"
        h.shutdown()

    write_some(40)
    check_some(40)
    before = daemon.call("pair.show", name="w")
    assert before["state"] == "restore" and before["remaining"] > 0, before
    daemon.kill9()
    daemon.start()
    after = daemon.call("pair.show", name="w")
    # (Copies whose clears were not yet durable are made again.)
    assert after["state"] == "restore" and after["remaining"] > 0, after
    check_some(40)
    write_some(40)
    daemon.stop()               # a clean stop too
    daemon.start()
    check_some(20)
    _unthrottle(daemon, "w")
    _wait_restored(daemon, "w")
    assert _read_all(daemon, "w") == bytes(expected)
    daemon.restart()
    assert _read_all(daemon, "w") == bytes(expected)
    assert _status(daemon, "w")["state"] == "restored"


def test_restore_status_after_restarts(daemon, image):
    """How an instant restore ended is recorded: restore-status says it
    after kill -9 and restarts; of a volume never restored it says it
    knows of none; the record goes with the volume."""
    store, sid, plain = image
    _instant(daemon, store, sid, "rd")
    done = _wait_restored(daemon, "rd")
    assert done["finished"] and done["source"]["snapshot"] == sid, done
    for restart in (daemon.kill9, daemon.stop):
        restart()
        daemon.start()
        st = _status(daemon, "rd")
        assert st["state"] == "restored" and st["finished"] == done["finished"], st
    cp = daemon.splitctl("pair", "wait", "rd", "--until", "synced", "--timeout", "5")
    assert "volume rd is restored" in cp.stdout, cp.stdout
    for name in ("src", "nothing"):
        code, err, _ = backup_fails(daemon, "restore-status", name)
        assert code == 1 and err["code"] == "not-found", err
    assert "no instant restore known for volume 'src'" in \
        backup_fails(daemon, "restore-status", "src")[1]["message"]
    cp = daemon.splitctl("pair", "wait", "src", "--until", "synced", "--timeout", "5", check=False)
    assert cp.returncode == 1 and "no pair named 'src'" in cp.stderr, cp.stderr
    daemon.call("volume.delete", name="rd")
    daemon.create_volume("rd", 4 * MiB)
    assert backup_fails(daemon, "restore-status", "rd")[1]["code"] == "not-found"


# -- the pair commands on an instant restore ------------------------------------------


def test_pair_wait_on_an_instant_restore(daemon, image):
    """`pair wait` ends when the restore is done (the pair never reaches
    state pair: it is dissolved), exit 0, whichever target."""
    store, sid, plain = image
    _instant(daemon, store, sid, "pw", "--rate", "64K")
    with splitctl_started(daemon, "pair", "wait", "pw", "--until", "synced", "--interval", "0.1",
                           "--json") as waiter:
        time.sleep(0.5)
        assert waiter.poll() is None, waiter.communicate()
        _unthrottle(daemon, "pw")
        out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, (out, err)
    assert json.loads(out)["state"] == "restored", out
    # Waited on once done: answered at once, for either target.
    for until in ("synced", "copied"):
        cp = daemon.splitctl("pair", "wait", "pw", "--until", until, "--timeout", "5")
        assert "volume pw is restored" in cp.stdout, cp.stdout
    assert _read_all(daemon, "pw") == plain


def test_pair_commands_on_an_instant_restore(daemon, image):
    """`pair show` says what the pair is; split, resync, restore and a read
    policy are refused naming the instant restore and what to do instead."""
    store, sid, plain = image
    _instant(daemon, store, sid, "pc", "--rate", "64K")
    shown = daemon.splitctl("pair", "show", "pc").stdout
    assert re.search(rf"instant restore from snapshot {sid} of {re.escape(str(store))}", shown), shown
    assert "pc" in daemon.splitctl("pair", "list").stdout
    for verb in ("split", "resync", "restore"):
        cp = daemon.splitctl("pair", verb, "pc", "--json", check=False)
        err = json.loads(cp.stdout)["error"]
        assert cp.returncode == 1 and err["code"] == "refused", (verb, cp.stdout)
        assert err["message"].startswith("pair 'pc' is the instant restore of volume 'pc'"), err
        assert "backup restore-status pc" in err["message"], err
    cp = daemon.splitctl("pair", "set", "pc", "--read-policy", "wait", "--json", check=False)
    assert cp.returncode == 1 and "copy-on-read" in cp.stdout, cp.stdout
    assert daemon.call("pair.show", name="pc")["read_policy"] == "copy-on-read"


def test_pair_wait_on_a_failed_instant_restore(daemon, image):
    store, sid, _ = image
    _corrupt_chunk(store, sid, 3)
    _instant(daemon, store, sid, "pf", "--rate", "64K")
    with splitctl_started(daemon, "pair", "wait", "pf", "--until", "copied",
                           "--interval", "0.1") as waiter:
        daemon.call("pair.set", name="pf", rate=0)      # the engine meets the bad chunk
        out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 1, (out, err)
    assert "went to state error" in err and "chunk at 3145728+1048576" in err, err


# -- the store is opened off the event loop --------------------------------------------


def test_instant_restore_opens_the_store_off_the_event_loop(daemon, image):
    """backup restore --instant whose index read blocks (a FIFO): meanwhile
    a 4 KiB read of another volume and the admin API are answered; once the
    index comes, the volume is made and restored."""
    from agents.store.names import index_name
    from tests.daemon.rawnbd import RawClient
    store, sid, plain = image
    path = store / index_name(sid)
    stored = fifo_object(path)
    with splitctl_started(daemon, "backup", "restore", sid, "--from", str(store), "--to-volume",
                          "ol", "--instant", "--json") as restoring:
        fd = fifo_writer(path)          # the daemon is reading the index now
        try:
            with RawClient.unix(daemon.nbd_socket, timeout=5) as c:
                c.open("src")
                assert c.read(SIZE - 4096, 4096) == plain[-4096:]
            assert "ol" not in [v["name"] for v in daemon.call("volume.list")["volumes"]]
            assert restoring.poll() is None, restoring.communicate()
        finally:
            feed_fifo(path, stored, fd)
        out, err = restoring.communicate(timeout=30)
    assert restoring.returncode == 0, (out, err)
    _wait_restored(daemon, "ol")
    assert _read_all(daemon, "ol") == plain


def test_store_reopened_at_start_off_the_event_loop(daemon, image):
    """At start, an instant restore's store is opened again in a thread,
    after the listeners are up: other volumes are served meanwhile, and so
    are the restore's regions already restored; a read of a region not yet
    restored waits for the store, then gets the snapshot's bytes."""
    from agents.store.names import index_name
    from tests.daemon.rawnbd import CMD_READ, RawClient
    store, sid, plain = image
    _instant(daemon, store, sid, "rs", "--rate", "64K")
    h = nbd.NBD()
    h.connect_uri(daemon.uri("rs"))
    assert h.pread(4096, SIZE - 4096) == plain[-4096:]   # restored by this read
    h.shutdown()
    daemon.stop()
    path = store / index_name(sid)
    stored = fifo_object(path)
    fd = None
    try:
        daemon.start()
        fd = fifo_writer(path)          # the daemon is reading the index now
        show = daemon.call("pair.show", name="rs")
        assert show["state"] == "restore" and show["source"]["opening"], show
        with RawClient.unix(daemon.nbd_socket, timeout=5) as other:
            other.open("src")
            assert other.read(0, 4096) == plain[:4096]
        with RawClient.unix(daemon.nbd_socket, timeout=5) as c:
            c.open("rs")
            assert c.read(SIZE - 4096, 4096) == plain[-4096:]    # restored already
            c.send_request(CMD_READ, 2 * MiB, 4096, cookie=7)    # not restored: waits
            c.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                c.recv_exact(1)
            feed_fifo(path, stored, fd)
            fd = None
            c.sock.settimeout(10)
            reply = c.reply(4096)
            assert reply.cookie == 7 and reply.error == 0 and reply.payload == plain[2 * MiB:2 * MiB + 4096]
    finally:
        if fd is not None:
            feed_fifo(path, stored, fd)
    show = daemon.call("pair.show", name="rs")
    assert show["state"] == "restore" and show["source"]["open"], show
    _unthrottle(daemon, "rs")
    _wait_restored(daemon, "rs")
    assert _read_all(daemon, "rs") == plain


# -- failures: nothing made, or error with the reason, never wrong bytes ----------------


def test_encrypted_store_and_wrong_key(daemon, tmp_path):
    need("nbdcopy")
    daemon.create_volume("e", 8 * MiB)
    write_blocks(daemon, "e", [MiB], seed=4, length=2 * MiB)
    store, key, other = tmp_path / "enc", tmp_path / "key", tmp_path / "other.key"
    backup(daemon, "init", str(store), "--encrypt", str(key), "--chunk-size", "1M")
    backup(daemon, "init", str(tmp_path / "other"), "--encrypt", str(other))
    sid = backup(daemon, "run", "--volume", daemon.uri("e"), "--to", str(store),
                 "--key-file", str(key))["snapshot"]
    for args in ([], ["--key-file", str(other)]):
        _, err, _ = backup_fails(daemon, "restore", sid, "--from", str(store), "--to-volume", "e2",
                                 "--instant", *args)
        assert "key" in err["message"], err
        # Nothing made: no volume, no pair, no pair files.
        assert "e2" not in [v["name"] for v in daemon.call("volume.list")["volumes"]]
        assert "e2" not in daemon.call("status")["pairs"]
        assert not (daemon.tmp / "data" / "pairs" / "e2").exists()
    r = _instant(daemon, store, sid, "e2", "--key-file", str(key))
    assert r["source"]["key_file"] == str(key), r
    _wait_restored(daemon, "e2")
    assert _read_all(daemon, "e2") == _read_all(daemon, "e")


def test_name_taken_is_refused(daemon, image):
    store, sid, plain = image
    daemon.create_volume("taken", 4 * MiB)
    write_blocks(daemon, "taken", [0], seed=5, length=MiB)
    before = _read_all(daemon, "taken")
    code, err, _ = backup_fails(daemon, "restore", sid, "--from", str(store), "--to-volume",
                                "taken", "--instant")
    assert code == 1 and err["code"] == "conflict" and "already exists" in err["message"], err
    assert _read_all(daemon, "taken") == before
    assert daemon.call("volume.show", name="taken")["size"] == 4 * MiB
    assert daemon.call("status")["pairs"] == {}
    # A served snapshot's export name is taken too.
    backup(daemon, "serve", sid, "--from", str(store), "--as", "snap")
    assert backup_fails(daemon, "restore", sid, "--from", str(store), "--to-volume", "snap",
                        "--instant")[1]["code"] == "conflict"
    # Bad command lines.
    for args in (["--to", "x.img", "--instant"], ["--to-volume", "n", "--wait"],
                 ["--to-volume", "n", "--instant", "--no-check"]):
        cp = daemon.splitctl("backup", "restore", sid, "--from", str(store), *args, check=False)
        assert cp.returncode == 2, (args, cp.stdout, cp.stderr)


def test_store_gone_at_restart(daemon, image):
    store, sid, plain = image
    _instant(daemon, store, sid, "g", "--rate", "64K")
    h = nbd.NBD()
    h.connect_uri(daemon.uri("g"))
    assert h.pread(4096, SIZE - 4096) == plain[-4096:]   # restored by this read
    h.shutdown()
    time.sleep(1)           # a durability round: that region's clear on disk
    daemon.kill9()
    moved = store.with_name("moved")
    store.rename(moved)
    daemon.start()
    show = _opened(daemon, "g")
    assert show["state"] == "error" and "cannot reopen snapshot" in show["reason"], show
    assert "delete the pair" in show["reason"], show
    h = nbd.NBD()
    h.connect_uri(daemon.uri("g"))
    assert h.pread(4096, SIZE - 4096) == plain[-4096:]   # restored: readable
    assert h.pread(4096, 10 * MiB) == bytes(4096)        # a zero chunk: nothing to restore
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 2 * MiB)                           # not restored: EIO, never zeroes
    assert e.value.errno == "EIO", e.value
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 2 * MiB)
    assert e.value.errno == "EIO", e.value
    h.shutdown()
    assert "not restored" in daemon.log()
    # A resync cannot repair it, and says what can.
    err = daemon.splitctl("pair", "resync", "g", "--json", check=False)
    assert err.returncode == 1 and "delete the pair and the volume" in err.stdout, err.stdout
    st = daemon.splitctl("backup", "restore-status", "g", "--wait", "--json", check=False)
    assert st.returncode == 1 and "cannot reopen" in st.stdout, st.stdout
    # Deleting the pair would leave zeroes where nothing was restored, with
    # nothing to say so: only with --force.
    err = daemon.splitctl("pair", "delete", "g", "--json", check=False)
    assert err.returncode == 1 and "never restored" in err.stdout, err.stdout
    daemon.call("pair.delete", name="g", force=True)
    daemon.call("volume.delete", name="g")
    moved.rename(store)
    _instant(daemon, store, sid, "g")
    _wait_restored(daemon, "g")
    assert _read_all(daemon, "g") == plain


def _corrupt_chunk(store: Path, sid: str, i: int) -> None:
    from agents.store import open_dir
    from agents.store.names import chunk_name
    with open_dir(str(store)) as st:
        path = store / chunk_name(st.index(sid).id_at(i))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))


def test_corrupt_chunk_is_eio_and_error(daemon, image):
    store, sid, plain = image
    _corrupt_chunk(store, sid, 20)
    _instant(daemon, store, sid, "c", "--rate", "64K")
    h = nbd.NBD()
    h.connect_uri(daemon.uri("c"))
    assert h.pread(65536, 0) == plain[:65536]
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 20 * MiB + 8192)
    assert e.value.errno == "EIO", e.value
    show = daemon.call("pair.show", name="c")
    assert show["state"] == "error" and re.search(r"chunk at 20971520\+1048576", show["reason"]), show
    # Restored regions still read; the others fail, every time, never zeroes.
    assert h.pread(65536, 0) == plain[:65536]
    for off in (20 * MiB, 3 * MiB):
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, off)
        assert e.value.errno == "EIO", e.value
    h.shutdown()
    daemon.restart()
    assert daemon.call("pair.show", name="c")["state"] == "error"
    with pytest.raises(nbd.Error):
        _read_all(daemon, "c")


def test_corrupt_chunk_met_by_the_background_copy(daemon, image):
    store, sid, plain = image
    _corrupt_chunk(store, sid, 3)
    _instant(daemon, store, sid, "b")         # unthrottled: the engine meets it first
    deadline = time.monotonic() + 60
    while (st := _status(daemon, "b"))["state"] == "restore" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st["state"] == "error" and "chunk at 3145728+1048576" in st["reason"], st
    assert "corrupt object" in st["reason"], st
    h = nbd.NBD()
    h.connect_uri(daemon.uri("b"))
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 3 * MiB + 4096)
    assert e.value.errno == "EIO", e.value
    assert h.pread(4096, 10 * MiB) == bytes(4096)     # a zero chunk
    h.shutdown()


def test_client_gone_while_its_read_waits(daemon, image):
    """A client that disconnects while its READ of P waits for a chunk
    fetch, which then fails: the pair goes to error, and asyncio has no
    "exception was never retrieved" to report."""
    from tests.daemon.rawnbd import CMD_READ, RawClient
    store, sid, _ = image
    path, _ = fifo_chunk(store, sid, 3)
    _instant(daemon, store, sid, "cg", "--rate", "64K")
    with RawClient.unix(daemon.nbd_socket) as c:
        c.open("cg")
        c.send_request(CMD_READ, 3 * MiB + 8192, 4096)
        deadline = time.monotonic() + 10
        while not daemon.export_read_bytes("cg"):
            assert time.monotonic() < deadline, "the READ did not arrive"
            time.sleep(0.02)
    while daemon.call("connections")["connections"]:
        assert time.monotonic() < deadline + 10, "the daemon did not see the client go"
        time.sleep(0.02)
    feed_fifo(path, b"not a chunk")          # the fetch fails: a corrupt object
    while _status(daemon, "cg")["state"] != "error":
        assert time.monotonic() < deadline + 20, daemon.log_tail()
        time.sleep(0.05)
    time.sleep(0.5)                          # anything logged once the future is freed
    assert "never retrieved" not in daemon.log(), daemon.log_tail()


def test_wrong_key_at_restart(daemon, tmp_path):
    daemon.create_volume("k", 4 * MiB)
    write_blocks(daemon, "k", [0], seed=6, length=4 * MiB)
    store, key, other = tmp_path / "enc", tmp_path / "key", tmp_path / "other.key"
    backup(daemon, "init", str(store), "--encrypt", str(key), "--chunk-size", "1M")
    backup(daemon, "init", str(tmp_path / "other"), "--encrypt", str(other))
    sid = backup(daemon, "run", "--volume", daemon.uri("k"), "--to", str(store),
                 "--key-file", str(key))["snapshot"]
    _instant(daemon, store, sid, "k2", "--key-file", str(key), "--rate", "64K")
    daemon.kill9()
    key.write_bytes(other.read_bytes())
    daemon.start()
    show = _opened(daemon, "k2")
    assert show["state"] == "error" and "cannot reopen snapshot" in show["reason"], show
    assert "key" in show["reason"], show
    # Paths kept for restarts must be absolute (splitctl makes them so).
    with pytest.raises(Exception, match="absolute"):
        daemon.call("backup.instant_restore", store="enc", snapshot=sid, volume="k3")
    with pytest.raises(Exception, match="absolute"):
        daemon.call("backup.instant_restore", store=str(store), snapshot=sid, volume="k3",
                    key_file="key")


# -- ext4 on it, mounted at once (nbdfuse + loop), across kill -9 -----------------------


class Mount:
    """Volume `name` as ext4 mounted at DIR/mnt through nbdfuse + a loop
    device; umount() undoes everything (also in the fixture's finalizer)."""

    def __init__(self, daemon, name: str, base: Path) -> None:
        from agents.tools import start_nbdfuse
        self.fuse = base / f"fuse-{uuid.uuid4().hex[:8]}"
        self.mnt = base / "mnt"
        self.fuse.mkdir()
        self.mnt.mkdir(exist_ok=True)
        uri = daemon.uri(name)
        self.proc = start_nbdfuse(str(self.fuse), [uri], uri, read_only=False,
                                  pidfile=str(base / "nbdfuse.pid"), log_path=str(base / "nbdfuse.log"))
        self.loop = subprocess.run(["losetup", "--find", "--show", str(self.fuse / "nbd")],
                                   check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-t", "ext4", self.loop, str(self.mnt)], check=True)
        self.mounted = True

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
            self.mounted = False
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = ""
        if self.proc is not None:
            subprocess.run(["fusermount3", "-u", str(self.fuse)], capture_output=True)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            os.unlink(self.fuse.parent / "nbdfuse.pid")


@pytest.fixture
def mounts():
    made: list[Mount] = []
    yield made
    for m in made:
        m.umount()


def test_ext4_mounted_at_once_across_kill9(daemon, ext4_snapshot, tmp_path, mounts):  # noqa: F811
    from tests.agents.backup.test_served import _same_tree
    need("losetup", "e2fsck")
    store, sid, src = ext4_snapshot
    _instant(daemon, store, sid, "fs2", "--rate", "128K")
    m = Mount(daemon, "fs2", tmp_path)
    mounts.append(m)
    _same_tree(src, m.mnt)                      # read through copy-on-read
    new1 = random.Random(21).randbytes(MiB + 17)
    (m.mnt / "new1.bin").write_bytes(new1)
    (m.mnt / "etc" / "app.conf").write_text("key = changed\n")
    subprocess.run(["sync", "-f", str(m.mnt)], check=True)
    m.umount()
    assert daemon.call("pair.show", name="fs2")["remaining"] > 0   # still restoring
    daemon.kill9()
    daemon.start()
    m = Mount(daemon, "fs2", tmp_path)
    mounts.append(m)
    assert (m.mnt / "new1.bin").read_bytes() == new1
    assert (m.mnt / "etc" / "app.conf").read_text() == "key = changed\n"
    assert (m.mnt / "data" / "blob.bin").read_bytes() == (src / "data" / "blob.bin").read_bytes()
    new2 = random.Random(22).randbytes(3 * MiB)
    (m.mnt / "data" / "new2.bin").write_bytes(new2)
    m.umount()
    _unthrottle(daemon, "fs2")
    _wait_restored(daemon, "fs2")
    image = tmp_path / "fs2.img"
    subprocess.run(["nbdcopy", daemon.uri("fs2"), str(image)], check=True)
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    m = Mount(daemon, "fs2", tmp_path)
    mounts.append(m)
    assert (m.mnt / "new1.bin").read_bytes() == new1
    assert (m.mnt / "data" / "new2.bin").read_bytes() == new2
    assert (m.mnt / "etc" / "app.conf").read_text() == "key = changed\n"
    # Every other file of the snapshot as it was.
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            if rel != "etc/app.conf" and not os.path.islink(src / rel):
                assert (m.mnt / rel).read_bytes() == (src / rel).read_bytes(), rel
                assert os.stat(m.mnt / rel).st_mode == os.stat(src / rel).st_mode, rel
    m.umount()
