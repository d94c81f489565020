"""splitctl backup serve: a snapshot exported read-only by the real daemon
straight from its store, read with nbdcopy, nbdinfo, qemu-img and libnbd;
a corrupt chunk, an encrypted store, unserve under a connected client."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time

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
from tests.conftest import need

pytest.importorskip("nbd")

SIZE = 64 * MiB
CHUNK = 1 * MiB


@pytest.fixture
def image(daemon, tmp_path):
    """Volume v (data in MiB 0-2, 4 KiB at 17 MiB + 8 KiB, written zeroes in
    MiB 24-31, data in the last MiB, holes elsewhere) backed up into a store
    of 1 MiB chunks; (store, snapshot id, the volume's bytes in a file)."""
    need("nbdcopy")
    daemon.create_volume("v", SIZE)
    write_blocks(daemon, "v", [0], seed=1, length=3 * MiB)
    write_blocks(daemon, "v", [17 * MiB + 8192], seed=2)
    write_blocks(daemon, "v", [SIZE - MiB], seed=3, length=MiB)
    import nbd
    h = nbd.NBD()
    h.connect_uri(daemon.uri("v"))
    h.pwrite(bytes(8 * MiB), 24 * MiB)
    h.shutdown()
    store = tmp_path / "store"
    backup(daemon, "init", str(store), "--chunk-size", "1M")
    sid = backup(daemon, "run", "--volume", daemon.uri("v"), "--to", str(store))["snapshot"]
    plain = tmp_path / "v.img"
    subprocess.run(["nbdcopy", daemon.uri("v"), str(plain)], check=True)
    return store, sid, plain


def _map(uri: str) -> list[dict]:
    cp = subprocess.run(["nbdinfo", "--map", "--json", uri], check=True, capture_output=True, text=True)
    return json.loads(cp.stdout)


def test_served_snapshot_equals_the_image(daemon, image, tmp_path):
    need("nbdinfo", "cmp", "qemu-img")
    store, sid, plain = image
    r = backup(daemon, "serve", sid, "--from", str(store), "--as", "snap")
    assert r["name"] == "snap" and r["size"] == SIZE and r["read_only"], r
    uri = daemon.uri("snap")
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True,
                                     text=True).stdout)
    assert info["exports"][0]["is_read_only"] is True, info
    # Holes: every zero chunk (never stored), HOLE|ZERO = 3; data chunks 0.
    data = [(e["offset"], e["length"]) for e in _map(uri) if e["type"] == 0]
    assert data == [(0, 3 * MiB), (17 * MiB, MiB), (SIZE - MiB, MiB)], data
    assert all(e["type"] == 3 for e in _map(uri) if e["type"] != 0)
    # Every byte, by nbdcopy and by qemu-img.
    out = tmp_path / "served.img"
    subprocess.run(["nbdcopy", uri, str(out)], check=True)
    subprocess.run(["cmp", str(plain), str(out)], check=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(plain)],
                   check=True, capture_output=True)
    # Random 4 KiB reads (unaligned too), against the image.
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(7)
    with open(plain, "rb") as f:
        for _ in range(300):
            off = rnd.randrange(0, SIZE - 8192)
            length = rnd.choice([4096, 512, 8192, 3 * MiB // 2])
            length = min(length, SIZE - off)
            f.seek(off)
            assert h.pread(length, off) == f.read(length), f"differs at {off}+{length}"
        # A whole chunk (sent as it is cached), and reads across chunks:
        # data then zero chunk, zero then data, data, zero and data.
        for off, length in ((0, 4 * MiB), (16 * MiB, 4 * MiB), (3 * MiB, 2 * MiB),
                            (15 * MiB, 2 * MiB), (3 * MiB, 14 * MiB + 512)):
            f.seek(off)
            assert h.pread(length, off) == f.read(length), f"differs at {off}+{length}"
        # Writes are refused (read-only export).
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
    h.shutdown()
    served = backup(daemon, "served")["served"]
    assert [s["name"] for s in served] == ["snap"] and served[0]["cached"] > 0, served
    # A volume may not take a served snapshot's name, nor the reverse.
    assert backup_fails(daemon, "serve", sid, "--from", str(store), "--as", "v")[1]["code"] == "conflict"
    assert backup(daemon, "unserve", "snap")["unserved"] is True
    assert backup(daemon, "served")["served"] == []


def test_corrupt_chunk_is_eio(daemon, image):
    store, sid, _ = image
    # The chunk of MiB 17: find it through the index the store gives us.
    from agents.store import open_dir
    from agents.store.names import chunk_name
    with open_dir(str(store)) as st:
        cid = st.index(sid).id_at(17)
        path = store / chunk_name(cid)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    backup(daemon, "serve", sid, "--from", str(store), "--as", "snap")
    import nbd
    h = nbd.NBD()
    h.connect_uri(daemon.uri("snap"))
    assert h.pread(4096, 0) == h.pread(4096, 0)        # other chunks still read
    for _ in range(2):                                  # never cached: EIO each time
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 17 * MiB + 8192)
        assert e.value.errno == "EIO", e.value
    assert h.pread(4096, SIZE - 4096)
    h.shutdown()
    assert re.search(r"served snapshot \S+: READ failed with EIO: .*chunk at 17825792\+1048576", daemon.log())
    assert backup(daemon, "served")["served"][0]["read_errors"] == 2


def test_encrypted_store(daemon, tmp_path):
    need("cmp", "nbdcopy")
    daemon.create_volume("e", 8 * MiB)
    write_blocks(daemon, "e", [MiB], seed=4, length=2 * MiB)
    store, key = tmp_path / "enc", tmp_path / "key"
    backup(daemon, "init", str(store), "--encrypt", str(key), "--chunk-size", "1M")
    sid = backup(daemon, "run", "--volume", daemon.uri("e"), "--to", str(store),
                 "--key-file", str(key))["snapshot"]
    code, err, _ = backup_fails(daemon, "serve", sid, "--from", str(store))
    assert "encrypted" in err["message"] and "key file" in err["message"], err
    backup(daemon, "serve", sid, "--from", str(store), "--key-file", str(key), "--as", "es")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    subprocess.run(["nbdcopy", daemon.uri("e"), str(a)], check=True)
    subprocess.run(["nbdcopy", daemon.uri("es"), str(b)], check=True)
    subprocess.run(["cmp", str(a), str(b)], check=True)


def test_unserve_with_a_client_connected(daemon, image):
    store, sid, _ = image
    backup(daemon, "serve", sid, "--from", str(store), "--as", "snap")
    import nbd
    h = nbd.NBD()
    h.connect_uri(daemon.uri("snap"))
    h.pread(4096, 0)
    code, err, _ = backup_fails(daemon, "unserve", "snap")
    assert err["code"] == "conflict" and "in use by 1 NBD connection" in err["message"], err
    assert h.pread(4096, 0)                          # refused unserve: still served
    r = backup(daemon, "unserve", "snap", "--force")
    assert r["connections_closed"] == 1, r
    with pytest.raises(nbd.Error):
        h.pread(4096, MiB)
    del h
    assert backup_fails(daemon, "unserve", "snap")[1]["code"] == "not-found"


# -- files and restore-files: ext4 on a served snapshot ---------------------------------


def _populate(src) -> None:
    """Files with various modes, owners, times; a symlink, hard links, a
    sparse file, an empty directory."""
    (src / "etc").mkdir()
    (src / "etc" / "app.conf").write_text("key = value\n")
    os.chmod(src / "etc" / "app.conf", 0o640)
    os.chown(src / "etc" / "app.conf", 1234, 5678)
    (src / "data").mkdir(mode=0o750)
    big = src / "data" / "blob.bin"
    big.write_bytes(random.Random(9).randbytes(3 * MiB + 123))
    with open(src / "data" / "sparse.img", "wb") as f:
        f.seek(4 * MiB)
        f.write(b"end")
    os.link(big, src / "data" / "blob.link")
    os.symlink("../etc/app.conf", src / "data" / "conf-link")
    os.chmod(src / "data" / "blob.bin", 0o4755)
    (src / "empty").mkdir()
    os.symlink("/etc", src / "escape")
    for p in (src / "etc" / "app.conf", big, src / "data" / "sparse.img"):
        os.utime(p, (1_600_000_000, 1_700_000_000 + len(p.name)))
    os.utime(src / "data", (1_600_000_000, 1_650_000_000))


def _same_tree(a, b) -> None:
    """Every entry under a is under b with the same type, mode, owner, mtime,
    content, link target; hard links stay links."""
    for dirpath, dirnames, filenames in os.walk(a):
        for name in dirnames + filenames:
            pa = os.path.join(dirpath, name)
            pb = os.path.join(b, os.path.relpath(pa, a))
            sa, sb = os.lstat(pa), os.lstat(pb)
            assert (sa.st_mode, sa.st_uid, sa.st_gid) == (sb.st_mode, sb.st_uid, sb.st_gid), pb
            if not os.path.islink(pa):
                assert int(sa.st_mtime) == int(sb.st_mtime), pb
            if os.path.islink(pa):
                assert os.readlink(pa) == os.readlink(pb), pb
            elif os.path.isfile(pa):
                with open(pa, "rb") as fa, open(pb, "rb") as fb:
                    assert fa.read() == fb.read(), pb
                assert sb.st_nlink == sa.st_nlink, pb


def _leftovers() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        mounts = [ln for ln in f if "splitd-files-" in ln]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return mounts + [ln for ln in loops.splitlines() if "splitd-files-" in ln]


@pytest.fixture
def ext4_snapshot(daemon, tmp_path):
    need("mkfs.ext4", "nbdfuse", "unshare", "nbdcopy", "blkid")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    src = tmp_path / "src"
    src.mkdir()
    _populate(src)
    img = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img), "64M"], check=True)
    daemon.create_volume("fs", 64 * MiB)
    subprocess.run(["nbdcopy", str(img), daemon.uri("fs")], check=True)
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    sid = backup(daemon, "run", "--volume", daemon.uri("fs"), "--to", str(store))["snapshot"]
    return store, sid, src


def test_files_and_restore_files(daemon, ext4_snapshot, tmp_path):
    store, sid, src = ext4_snapshot
    listed = backup(daemon, "files", sid, "--from", str(store))["files"]
    by_path = {f["path"]: f for f in listed}
    assert by_path["etc/app.conf"]["mode"] == "0640" and by_path["etc/app.conf"]["uid"] == 1234
    assert by_path["data/conf-link"] == dict(by_path["data/conf-link"], type="symlink",
                                             target="../etc/app.conf")
    assert by_path["data/blob.bin"]["size"] == 3 * MiB + 123 and by_path["data/blob.bin"]["nlink"] == 2
    assert by_path["data/sparse.img"]["allocated"] < MiB
    assert {"empty", "data", "etc", "lost+found"} <= set(by_path)
    sub = backup(daemon, "files", sid, "etc", "--from", str(store))["files"]
    assert [f["path"] for f in sub] == ["etc", "etc/app.conf"]

    # A few files: each at its path under --to.
    few = tmp_path / "few"
    backup(daemon, "restore-files", sid, "etc/app.conf", "data/conf-link", "--from", str(store),
           "--to", str(few))
    assert sorted(str(p.relative_to(few)) for p in few.rglob("*")) == \
        ["data", "data/conf-link", "etc", "etc/app.conf"]
    st = os.lstat(few / "etc" / "app.conf")
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, int(st.st_mtime)) == \
        (oct(0o640), 1234, 5678, 1_700_000_000 + len("app.conf"))
    assert os.readlink(few / "data" / "conf-link") == "../etc/app.conf"

    # The whole directory: same tree, hard links kept, the sparse file sparse.
    whole = tmp_path / "whole"
    backup(daemon, "restore-files", sid, ".", "--from", str(store), "--to", str(whole))
    (whole / "lost+found").rmdir()
    _same_tree(src, whole)
    _same_tree(whole, src)
    assert os.stat(whole / "data" / "blob.bin").st_ino == os.stat(whole / "data" / "blob.link").st_ino
    assert os.stat(whole / "data" / "sparse.img").st_blocks * 512 < MiB
    assert _leftovers() == [] and backup(daemon, "served")["served"] == []


def test_files_failures_clean_up(daemon, ext4_snapshot, tmp_path):
    store, sid, _ = ext4_snapshot
    code, err, _ = backup_fails(daemon, "restore-files", sid, "etc/nope", "--from", str(store),
                                "--to", str(tmp_path / "out"))
    assert "etc/nope" in err["message"] and "no such file" in err["message"], err
    code, err, _ = backup_fails(daemon, "files", sid, "../x", "--from", str(store))
    assert "leaves the backed-up directory" in err["message"], err
    # A link in the image pointing out of it is not followed.
    code, err, _ = backup_fails(daemon, "files", sid, "escape/passwd", "--from", str(store))
    assert err["code"] == "bad-input" and "symbolic link" in err["message"], err
    assert _leftovers() == [] and backup(daemon, "served")["served"] == []
    assert not [d for d in os.listdir("/tmp") if d.startswith("splitd-files-")]


def test_directory_in_image():
    from agents.backup.files import directory_in_image
    assert directory_in_image({"directory": "/srv/db/main", "mountpoint": "/srv/db"}) == "main"
    assert directory_in_image({"directory": "/srv/db", "mountpoint": "/srv/db"}) == "."
    assert directory_in_image({"directory": None}) == "."


def test_restore_files_killed_leaves_nothing(daemon, ext4_snapshot, tmp_path):
    """kill -9 of the process holding the mounts, mid-copy: its namespace,
    nbdfuse and the loop device go with it; splitctl reports the failure and
    unserves."""
    import time
    store, sid, _ = ext4_snapshot
    from tests.conftest import BIN
    proc = subprocess.Popen([str(BIN / "splitctl"), "backup", "restore-files", sid, ".", "--from",
                             str(store), "--to", str(tmp_path / "out"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, SPLITD_ADMIN_SOCKET=str(daemon.admin_socket)))
    child = None
    deadline = time.monotonic() + 30
    while child is None and time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if cmd[:1] == [b"nbdfuse"] and any(b"splitd-files-" in a for a in cmd):
                with open(f"/proc/{pid}/stat") as f:
                    child = int(f.read().rpartition(")")[2].split()[1])   # nbdfuse's parent
                break
        time.sleep(0.02)
    assert child is not None, "nbdfuse never started"
    os.kill(child, 9)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    deadline = time.monotonic() + 10
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers() == []
    assert backup(daemon, "served")["served"] == []
    assert not [d for d in os.listdir("/tmp") if d.startswith("splitd-files-")]
    assert not subprocess.run(["pgrep", "-f", "nbdfuse.*splitd-files-"], capture_output=True).stdout


def test_daemon_answers_while_a_chunk_loads(daemon, image):
    """A chunk whose fetch blocks (its file replaced by a FIFO nobody writes
    yet) holds only the reads that need it: other chunks of the snapshot,
    another export and the admin API answer meanwhile; then the read gets
    the right bytes."""
    import threading

    import nbd
    store, sid, plain = image
    path, stored = fifo_chunk(store, sid, 17)
    backup(daemon, "serve", sid, "--from", str(store), "--as", "snap")
    slow = nbd.NBD()
    slow.connect_uri(daemon.uri("snap"))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(slow.pread(4096, 17 * MiB + 8192)))
    reader.start()
    try:
        other = nbd.NBD()
        other.connect_uri(daemon.uri("snap"))
        vol = nbd.NBD()
        vol.connect_uri(daemon.uri("v"))
        with open(plain, "rb") as f:
            f.seek(SIZE - MiB)
            assert other.pread(MiB, SIZE - MiB) == f.read(MiB)
            f.seek(0)
            assert vol.pread(MiB, 0) == f.read(MiB)
        assert daemon.call("status")["volumes"] == 1
        assert reader.is_alive() and not got, "the read of the blocked chunk was answered"
    finally:
        feed_fifo(path, stored)              # release the fetch
        reader.join(30)
    with open(plain, "rb") as f:
        f.seek(17 * MiB + 8192)
        assert got == [f.read(4096)]


def test_client_gone_while_its_read_waits(daemon, image):
    """A client that disconnects while its READ waits for a chunk fetch,
    which then fails: the failure is logged once, as a failed READ, and
    asyncio has no "exception was never retrieved" to report."""
    from tests.daemon.rawnbd import CMD_READ, RawClient
    store, sid, _ = image
    path, _ = fifo_chunk(store, sid, 17)
    backup(daemon, "serve", sid, "--from", str(store), "--as", "snap")
    with RawClient.unix(daemon.nbd_socket) as c:
        c.open("snap")
        c.send_request(CMD_READ, 17 * MiB + 8192, 4096)
        deadline = time.monotonic() + 10
        while not daemon.export_read_bytes("snap"):
            assert time.monotonic() < deadline, "the READ did not arrive"
            time.sleep(0.02)
    while daemon.call("backup.served")["served"][0]["connections"]:
        assert time.monotonic() < deadline + 10, "the daemon did not see the client go"
        time.sleep(0.02)
    feed_fifo(path, b"not a chunk")          # the fetch fails: a corrupt object
    while "READ failed with EIO" not in daemon.log():
        assert time.monotonic() < deadline + 20, daemon.log_tail()
        time.sleep(0.05)
    time.sleep(0.5)                          # anything logged once the future is freed
    assert daemon.call("status")
    assert "never retrieved" not in daemon.log(), daemon.log_tail()


def test_serve_opens_the_store_off_the_event_loop(daemon, image):
    """backup serve whose index read blocks (its object a FIFO): meanwhile
    a 4 KiB read of a volume and the admin API are answered; once the index
    comes, the snapshot is served."""
    from agents.store.names import index_name
    from tests.daemon.rawnbd import RawClient
    store, sid, plain = image
    path = store / index_name(sid)
    stored = fifo_object(path)
    with splitctl_started(daemon, "backup", "serve", sid, "--from", str(store), "--as", "snap",
                          "--json") as serving:
        fd = fifo_writer(path)          # the daemon is reading the index now
        try:
            with RawClient.unix(daemon.nbd_socket, timeout=5) as c:
                c.open("v")
                assert c.read(SIZE - 4096, 4096) == plain.read_bytes()[-4096:]
            assert daemon.call("status")["volumes"] == 1
            assert serving.poll() is None, serving.communicate()
            assert "snap" not in [s["name"] for s in daemon.call("backup.served")["served"]]
        finally:
            feed_fifo(path, stored, fd)
        out, err = serving.communicate(timeout=30)
    assert serving.returncode == 0, (out, err)
    assert json.loads(out)["name"] == "snap"
    import nbd
    h = nbd.NBD()
    h.connect_uri(daemon.uri("snap"))
    assert h.pread(4096, SIZE - 4096) == plain.read_bytes()[-4096:]
    h.shutdown()


def _served_again(daemon, name: str, timeout: float = 30) -> dict:
    """`name` in backup.served once its store is no longer being opened
    (after a start)."""
    deadline = time.monotonic() + timeout
    while True:
        [entry] = [s for s in daemon.call("backup.served")["served"] if s["name"] == name]
        if not entry.get("opening"):
            return entry
        assert time.monotonic() < deadline, entry
        time.sleep(0.05)


def test_served_again_after_restarts(daemon, image):
    """A served snapshot is recorded and served again after kill -9 and
    after a clean restart; one whose store is gone at start is listed
    unavailable with the reason (the daemon serves the rest), its export
    refused naming it, until unserved."""
    import nbd
    store, sid, plain = image
    data = plain.read_bytes()
    backup(daemon, "serve", sid, "--from", str(store), "--as", "snap", "--cache-size", "32M")
    for restart in (daemon.kill9, daemon.stop):
        restart()
        daemon.start()
        entry = _served_again(daemon, "snap")
        assert entry["available"] and entry["snapshot"] == sid, entry
        assert entry["cache_size"] == 32 * MiB and entry["store"] == str(store), entry
        h = nbd.NBD()
        h.connect_uri(daemon.uri("snap"))
        assert h.pread(4096, SIZE - 4096) == data[-4096:]
        h.shutdown()
    daemon.stop()
    moved = store.with_name("moved")
    store.rename(moved)
    daemon.start()
    entry = _served_again(daemon, "snap")
    assert not entry["available"] and "cannot open snapshot" in entry["reason"], entry
    assert "no backup store" in entry["reason"], entry
    assert "snap: unavailable: cannot open snapshot" in daemon.splitctl("backup", "served").stdout
    from tests.daemon.rawnbd import OPT_GO, RawClient, info_data
    with RawClient.unix(daemon.nbd_socket) as c:
        c.start()
        [refused] = c.option(OPT_GO, info_data("snap"))
        assert refused.type & 2**31 and b"'snap' is not available: cannot open" in refused.data
    assert daemon.call("volume.show", name="v")["size"] == SIZE      # the rest is served
    err = backup_fails(daemon, "serve", sid, "--from", str(moved), "--as", "snap")[1]
    assert err["code"] == "conflict" and "unavailable" in err["message"], err
    assert backup(daemon, "unserve", "snap")["unserved"] is True
    assert backup(daemon, "served")["served"] == []
    moved.rename(store)
    daemon.restart()
    assert backup(daemon, "served")["served"] == []


def test_cache_is_bounded(daemon, image, tmp_path):
    need("nbdcopy")
    store, sid, _ = image
    backup(daemon, "serve", sid, "--from", str(store), "--as", "small", "--cache-size", "16M")
    subprocess.run(["nbdcopy", daemon.uri("small"), "null:"], check=True)
    shown = backup(daemon, "served")["served"][0]
    assert 0 < shown["cached"] <= 16 * MiB and shown["cache_size"] == 16 * MiB, shown
    code, err, _ = backup_fails(daemon, "serve", sid, "--from", str(store), "--as", "tiny",
                                "--cache-size", "1M")
    assert err["code"] == "bad-input" and "cache_size" in err["message"], err


def test_scopes():
    """Serving opens files on the daemon's host: admin only; the list is read."""
    from common.scopes import Scope
    from controller.access import required_scope
    assert required_scope("backup.serve") == Scope.ADMIN
    assert required_scope("backup.unserve") == Scope.ADMIN
    assert required_scope("backup.served") == Scope.READ


def test_last_chunk_shorter(daemon, tmp_path):
    """An image that is not a whole number of chunks: the last, short chunk
    reads and maps right."""
    need("nbdcopy", "cmp", "nbdinfo")
    size = 9 * MiB + 4096
    daemon.create_volume("odd", size)
    write_blocks(daemon, "odd", [size - 8192], seed=5, length=8192)
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    sid = backup(daemon, "run", "--volume", daemon.uri("odd"), "--to", str(store))["snapshot"]
    backup(daemon, "serve", sid, "--from", str(store), "--as", "odd-snap")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    subprocess.run(["nbdcopy", daemon.uri("odd"), str(a)], check=True)
    subprocess.run(["nbdcopy", daemon.uri("odd-snap"), str(b)], check=True)
    subprocess.run(["cmp", str(a), str(b)], check=True)
    assert [(e["offset"], e["length"], e["type"]) for e in _map(daemon.uri("odd-snap"))] == \
        [(0, 8 * MiB, 3), (8 * MiB, MiB + 4096, 0)]
