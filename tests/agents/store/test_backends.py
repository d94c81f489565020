"""The store's contract on each backend, a directory and S3 (a real SeaweedFS
server, tests/agents/conftest.py): roundtrip, dedup, zeroes, encryption,
verify of corrupt and missing objects, prune and gc (also racing writers),
catalog rebuild; then what only S3 has: conditional PUTs, its errors, the
server killed mid-backup."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from agents.store import (
    ConcurrentSweep,
    CorruptObject,
    KeyRefused,
    RetentionPolicy,
    StoreBadInput,
    StoreError,
    init_dir,
    new_key_file,
    open_dir,
)
from agents.store.names import chunk_name, index_name, manifest_name
from agents.store.s3 import S3Backend

from .conftest import age_everything, backup, image_of

CS = 65536


class Where:
    """A store location on one backend, and the test's hands on its objects."""

    def __init__(self, kind: str, location: str, seaweed=None, bucket: str = "", prefix: str = ""):
        self.kind, self.location = kind, location
        self.seaweed, self.bucket, self.prefix = seaweed, bucket, prefix

    def sub(self, name: str) -> str:
        return f"{self.location}-{name}"

    def age(self, store) -> None:
        """Make what is stored old enough for gc(margin=0)."""
        if self.kind == "dir":
            age_everything(store.backend.root)
        else:       # S3 times cannot be set: let them pass (1 s granularity)
            time.sleep(2.1)

    def read_raw(self, store, name: str) -> bytes:
        return store.backend.get(name)

    def write_raw(self, store, name: str, data: bytes) -> None:
        if self.kind == "dir":
            with open(os.path.join(store.backend.root, name), "r+b") as f:
                f.write(data)
        else:
            key = f"{store.backend.prefix}/{name}"
            self.seaweed.client().put_object(Bucket=store.backend.bucket, Key=key, Body=data)


@pytest.fixture(params=["dir", "s3"])
def where(request, store_dir):
    if request.param == "dir":
        return Where("dir", os.path.join(store_dir, "s"))
    bucket = request.getfixturevalue("s3_env")
    seaweed = request.getfixturevalue("seaweed")
    return Where("s3", f"s3://{bucket}/stores/s", seaweed, bucket)


@pytest.fixture
def store(where):
    s = init_dir(where.location, chunk_size=CS)
    yield s
    s.close()


def mixed(rnd: random.Random, chunks: int, tail: int = 0) -> bytes:
    out = bytearray()
    for i in range(chunks):
        out += [rnd.randbytes(CS), bytes(CS), (b"splitd s3 " * (CS // 10 + 1))[:CS]][i % 3]
    return bytes(out + rnd.randbytes(tail))


def test_roundtrip_dedup_and_zeroes(store, where):
    rnd = random.Random(1)
    image = mixed(rnd, 12, tail=5000)
    order = list(range(13))
    rnd.shuffle(order)
    a = backup(store, image, order=order, volume="v")
    assert image_of(store, a) == image
    chunks = set(store.backend.list("chunks/"))
    assert len(chunks) == 4 + 1 + 1                 # 4 random, 1 text (stored once), the tail
    again = store.writer(len(image))
    again.add(0, image)
    b = again.commit(volume="v")
    assert again.stats["new_chunks"] == 0 and again.stats["reused_chunks"] == 9
    assert set(store.backend.list("chunks/")) == chunks
    reopened = open_dir(where.location)
    assert [m["id"] for m in reopened.list()] == [a, b]
    assert image_of(reopened, b) == image
    assert reopened.rebuild_catalog() == 2
    assert reopened.verify(b).ok and reopened.check().ok


def test_encryption(where, store_dir):
    key1, key2 = os.path.join(store_dir, "k1"), os.path.join(store_dir, "k2")
    new_key_file(key1)
    new_key_file(key2)
    s = init_dir(where.sub("enc"), key_file=key1, chunk_size=CS)
    text = (b"secret text " * (CS // 12 + 1))[:CS]
    sid = backup(s, text * 2)
    for name in list(s.backend.list("")):
        assert b"secret text" not in s.backend.get(name), name
    with pytest.raises(KeyRefused, match="encrypted: give its key file"):
        open_dir(where.sub("enc"))
    with pytest.raises(KeyRefused, match="wrong key"):
        open_dir(where.sub("enc"), key_file=key2)
    assert image_of(open_dir(where.sub("enc"), key_file=key1), sid) == text * 2


def flip(where, store, name: str, at: int) -> None:
    raw = bytearray(where.read_raw(store, name))
    raw[at % len(raw)] ^= 1
    where.write_raw(store, name, bytes(raw))


def test_verify_names_corrupt_and_missing_chunks(store, where):
    rnd = random.Random(2)
    shared, other = rnd.randbytes(CS), rnd.randbytes(CS)
    a = backup(store, shared + b"a" * CS)
    b = backup(store, other + shared)
    c = backup(store, rnd.randbytes(CS))
    flip(where, store, chunk_name(store.chunk_id(shared)), 100)
    store.backend.delete(chunk_name(store.chunk_id(other)))
    report = store.check()
    assert not report.ok
    assert report.broken_snapshots == [a, b]
    assert sorted((p.object, p.what, p.snapshots) for p in report.problems) == sorted([
        (chunk_name(store.chunk_id(other)), "missing", [b]),
        (chunk_name(store.chunk_id(shared)), "corrupt", [a, b])])
    assert store.verify(c).ok
    with pytest.raises(CorruptObject, match=chunk_name(store.chunk_id(shared))):
        image_of(store, a)
    flip(where, store, manifest_name(c), 40)
    assert c in store.check().broken_snapshots


def test_prune_and_gc(store, where):
    sids = [backup(store, bytes([i + 1]) * CS + bytes([i + 100]) * CS, volume="v") for i in range(4)]
    assert store.gc(margin=0).deleted_chunks == 0
    where.age(store)
    plan, report = store.prune(RetentionPolicy(last=2), margin=0)
    assert [m["id"] for m in plan.remove] == sids[:2]
    assert report is not None and report.deleted_chunks == 4 and sorted(report.deleted_indexes) == sids[:2]
    assert store.snapshot_ids() == sids[2:]
    assert not store.backend.exists(index_name(sids[0]))
    assert store.check().ok and store.check().unreferenced_chunks == 0
    assert image_of(store, sids[3]) == bytes([4]) * CS + bytes([103]) * CS


def test_a_sweep_that_removes_chunks_a_writer_reused_sends_the_commit_back(store, where):
    """On S3 a reused chunk is not touched (no time update in place): a sweep
    between the reuse and the commit removes it, and the commit, seeing that a
    sweep ran, re-checks, commits nothing and names the chunks to give again.
    In a directory the touch keeps them."""
    rnd = random.Random(3)
    image = rnd.randbytes(6 * CS)
    old = backup(store, image)
    store.forget([old])
    where.age(store)
    w = store.writer(len(image))
    w.add(0, image)
    w.wait()
    assert w.stats["reused_chunks"] == 6
    swept = open_dir(where.location).gc(margin=0)
    if where.kind == "dir":
        assert swept.deleted_chunks == 0
        sid = w.commit()
    else:
        assert swept.deleted_chunks == 6
        with pytest.raises(ConcurrentSweep) as e:
            w.commit()
        assert sorted(e.value.offsets) == [i * CS for i in range(6)]
        for off in e.value.offsets:
            w.add(off, image[off:off + CS])
        sid = w.commit()
    assert image_of(store, sid) == image and store.check().ok


@pytest.mark.slow
def test_gc_racing_writers_loses_nothing(store, where):
    """Sweeps back to back in one thread (their own handle) while backups of
    nearly the same image, each reusing the chunks the previous one left as
    garbage, commit in another: every committed snapshot restores exactly."""
    rnd = random.Random(4)
    n = 24
    base = rnd.randbytes(n * CS)
    stop = threading.Event()
    sweeps: list[int] = []
    errors: list[BaseException] = []
    sweeper_store = open_dir(where.location)

    def sweeper():
        try:
            while not stop.is_set():
                sweeps.append(sweeper_store.gc(margin=0).deleted_chunks)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=sweeper)
    t.start()
    committed: dict[str, bytes] = {}
    refused = 0
    try:
        for round_ in range(10):
            image = bytearray(base)
            image[round_ * CS:round_ * CS + 10] = bytes([round_ + 1]) * 10
            if committed:
                store.forget(list(committed))
                where.age(store)
            w = store.writer(len(image))
            order = list(range(n))
            rnd.shuffle(order)
            for i in order:
                w.add(i * CS, bytes(image[i * CS:(i + 1) * CS]))
            while True:
                try:
                    sid = w.commit()
                    break
                except ConcurrentSweep as e:
                    refused += 1
                    for off in e.offsets:
                        w.add(off, bytes(image[off:off + CS]))
            assert image_of(store, sid) == image
            committed = {sid: bytes(image)}
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert sum(sweeps) > 0, "the sweeps never removed anything: the race was not exercised"
    for sid, image in committed.items():
        assert image_of(store, sid) == image
    assert store.check().ok
    print(f"sweeps {len(sweeps)}, chunks swept {sum(sweeps)}, commits sent back {refused}")


# -- S3 only -------------------------------------------------------------------

def test_seaweedfs_honours_if_none_match(s3_env):
    backend = S3Backend(f"s3://{s3_env}/p")
    assert backend.conditional_puts() is True
    assert backend.put_if_absent("chunks/ab/x", b"1") is True
    assert backend.put_if_absent("chunks/ab/x", b"1") is False
    assert backend.get("chunks/ab/x") == b"1"
    assert list(backend.list("")) == ["chunks/ab/x"]      # the probe object is gone


def test_head_then_put_where_if_none_match_is_not_honoured(s3_env):
    """The fallback path, against the same real server: told the server
    ignores If-None-Match, put_if_absent HEADs first."""
    backend = S3Backend(f"s3://{s3_env}/nocond")
    backend._conditional = False
    assert backend.put_if_absent("chunks/cd/y", b"1") is True
    assert backend.put_if_absent("chunks/cd/y", b"2") is False
    assert backend.get("chunks/cd/y") == b"1"
    assert list(backend.list("chunks/")) == ["chunks/cd/y"]


def test_settings_from_a_config_file(s3_env, seaweed, tmp_path, monkeypatch):
    from harness.seaweedfs import ADMIN
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    conf = tmp_path / "s3.toml"
    conf.write_text(f'endpoint = "{seaweed.endpoint}"\nregion = "us-east-1"\n'
                    f'access_key_id = "{ADMIN[0]}"\nsecret_access_key = "{ADMIN[1]}"\n'
                    'connections = 8\nretry_mode = "standard"\n')
    monkeypatch.setenv("SPLITD_S3_CONFIG", str(conf))
    s = init_dir(f"s3://{s3_env}/viaconf", chunk_size=CS)
    assert s.workers == 8
    assert image_of(s, backup(s, b"c" * CS)) == b"c" * CS
    conf.write_text('endpoint = "x"\nbogus = 1\n')
    with pytest.raises(StoreBadInput, match="unknown setting 'bogus'"):
        open_dir(f"s3://{s3_env}/viaconf")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_clear_line(s3_env, seaweed, monkeypatch, store_dir):
    from harness.seaweedfs import ADMIN, READER
    loc = f"s3://{s3_env}/errs"
    init_dir(loc, chunk_size=CS).close()
    with pytest.raises(StoreError) as e:
        open_dir(f"s3://nosuchbucket-{os.getpid()}/x")
    assert one_line(e).startswith(f"no bucket 'nosuchbucket-{os.getpid()}' at S3 endpoint")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError) as e:
        open_dir(loc)
    assert one_line(e).startswith(f"wrong S3 secret access key for key id {ADMIN[0]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKNOBODY")
    with pytest.raises(StoreError) as e:
        open_dir(loc)
    assert one_line(e).startswith("S3 access key id AKNOBODY is unknown at")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    reader = open_dir(loc)                       # Read and List only
    with pytest.raises(StoreError) as e:
        backup(reader, b"r" * CS)
    assert one_line(e).startswith("access denied: PUT leases/")
    conf = os.path.join(store_dir, "s3.toml")
    with open(conf, "w") as f:
        f.write('endpoint = "http://127.0.0.1:9"\nmax_attempts = 2\n')
    monkeypatch.setenv("SPLITD_S3_CONFIG", conf)
    with pytest.raises(StoreError) as e:
        open_dir(loc)
    assert one_line(e).startswith("cannot reach S3 endpoint http://127.0.0.1:9 (GET config)")
    with open(conf, "w") as f:              # an HTTP server that is not S3: SeaweedFS's filer
        f.write(f'endpoint = "http://127.0.0.1:{seaweed._filer}"\nmax_attempts = 1\n')
    with pytest.raises(StoreError) as e:
        open_dir(loc)
    assert one_line(e).endswith(f"(is http://127.0.0.1:{seaweed._filer} an S3 endpoint?)")
    with pytest.raises(StoreBadInput, match="bad S3 bucket name 'A_B'"):
        open_dir("s3://A_B/x")


@pytest.mark.slow
def test_server_killed_mid_backup_commits_nothing_and_the_next_run_completes(own_seaweed):
    own_seaweed.create_bucket("killed")
    loc = "s3://killed/s"
    store = init_dir(loc, chunk_size=CS)
    rnd = random.Random(5)
    image = rnd.randbytes(64 * CS)
    w = store.writer(len(image))
    for i in range(32):
        w.add(i * CS, image[i * CS:(i + 1) * CS])
    w.wait()
    own_seaweed.kill()
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        for i in range(32, 64):
            w.add(i * CS, image[i * CS:(i + 1) * CS])
        w.commit()
    assert time.monotonic() - t0 < 60
    assert one_line(e).startswith(f"cannot reach S3 endpoint {own_seaweed.endpoint}")
    w.abort()
    own_seaweed.start()
    again = open_dir(loc)
    assert again.snapshot_ids() == []
    w2 = again.writer(len(image))
    w2.add(0, image)
    sid = w2.commit()
    assert w2.stats["reused_chunks"] >= 32
    assert again.snapshot_ids() == [sid] and image_of(again, sid) == image


def test_a_sweep_already_past_its_mark_keeps_what_a_committed_writer_reused(store, where):
    """The window the lease-named index closes: a sweep marks, then works
    through many garbage chunks; meanwhile a writer that reused an old
    unreferenced chunk (named late in the listing) passes the fence (the
    chunk is still there) and commits. The sweep must not delete that chunk
    when it gets to it: on S3 there is no touch to protect it, only the index
    the writer named in its lease, which the sweep marks after its next beat.
    (Before that, the committed snapshot lost its chunk.)"""
    rnd = random.Random(6)
    cs = store.chunk_size
    late = next(d for d in (rnd.randbytes(cs) for _ in range(100000))
                if store.chunk_id(d).hex().startswith("ff"))
    garbage = [d for d in (rnd.randbytes(cs) for _ in range(700))
               if not store.chunk_id(d).hex().startswith("f")]
    w = store.writer(len(garbage) * cs)
    w.add(0, b"".join(garbage))
    old = w.commit()
    store.forget([old, backup(store, late)])
    where.age(store)
    w = store.writer(cs)
    w.add(0, late)
    w.wait()
    assert w.stats["reused_chunks"] == 1
    sweeper = open_dir(where.location)
    result: list = []
    t = threading.Thread(target=lambda: result.append(sweeper.gc(margin=0)))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not any(store.backend.list("gc/")):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.2)                       # marked; sweeping the early names
        sid = w.commit()
    finally:
        t.join()
    assert result and result[0].deleted_chunks >= len(garbage) // 2, result
    assert store.check().ok, store.check().problems
    assert image_of(store, sid) == late
