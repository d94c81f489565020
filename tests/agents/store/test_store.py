"""The backup store's basic contract: what goes in comes out, zeroes and
duplicates are not stored, compression falls back to raw, encryption keys are
checked, manifests say what they should, the catalog is only a cache."""
from __future__ import annotations

import asyncio
import json
import os
import random

import pytest

from agents.store import (
    CorruptObject,
    KeyRefused,
    ObjectMissing,
    StoreBadInput,
    StoreError,
    init_dir,
    new_key_file,
    open_dir,
)
from agents.store.envelope import F_SEALED, F_ZSTD, HEADER
from agents.store.names import chunk_name, manifest_name

from .conftest import backup, image_of

CS = 65536


def mixed_image(rnd: random.Random, chunks: int, tail: int = 0) -> bytes:
    """Random chunks, zero chunks and compressible chunks, plus a short tail."""
    out = bytearray()
    for i in range(chunks):
        kind = i % 3
        if kind == 0:
            out += rnd.randbytes(CS)
        elif kind == 1:
            out += bytes(CS)
        else:
            out += (b"splitd backup " * (CS // 14 + 1))[:CS]
    return bytes(out + rnd.randbytes(tail))


def stored_chunks(store) -> list[str]:
    return list(store.backend.list("chunks/"))


def test_roundtrip_out_of_order_with_short_tail(store):
    image = mixed_image(random.Random(1), 9, tail=5000)
    order = list(range(10))
    random.Random(2).shuffle(order)
    sid = backup(store, image, order=order, volume="v", pair="v->s", split_gen=3)
    assert image_of(store, sid) == image
    m = store.manifest(sid)
    assert (m["size"], m["chunk_size"], m["volume"], m["split_gen"], m["parent"]) == \
        (len(image), CS, "v", 3, None)
    st = m["stats"]
    assert st["zero_chunks"] == 3 and st["chunks"] == 10
    # The three compressible chunks are one chunk, stored once.
    assert st["new_chunks"] + st["reused_chunks"] == 7 and st["reused_chunks"] == 2
    assert len(stored_chunks(store)) == 5


def test_zero_chunks_and_holes_are_not_stored(store):
    size = 8 * CS
    w = store.writer(size)
    w.add(0, bytes(4 * CS))          # zero data: detected
    w.zero(4 * CS, 4 * CS)           # a hole: declared
    sid = w.commit()
    assert stored_chunks(store) == []
    assert list(store.iter_extents(sid)) == [(0, size, None)]
    assert image_of(store, sid) == bytes(size)


def test_compression_and_raw_fallback(store):
    rnd = random.Random(3)
    backup(store, rnd.randbytes(CS) + b"a" * CS)
    flags = {}
    for name in stored_chunks(store):
        raw = store.backend.get(name)
        flags[name] = HEADER.unpack_from(raw)[3]
        size = len(raw)
        assert size <= CS + HEADER.size
    assert sorted(f & F_ZSTD for f in flags.values()) == [0, F_ZSTD]


def test_incremental_takes_parent_entries_and_restores_both(store):
    rnd = random.Random(4)
    first = mixed_image(rnd, 8)
    sid1 = backup(store, first)
    second = bytearray(first)
    second[CS + 7] ^= 0xFF
    second[6 * CS:7 * CS] = rnd.randbytes(CS)
    sid2 = backup(store, bytes(second), parent=sid1, unchanged={0, 2, 3, 4, 5, 7})
    assert image_of(store, sid1) == first
    assert image_of(store, sid2) == bytes(second)
    m = store.manifest(sid2)
    assert m["parent"] == sid1 and m["stats"]["parent_chunks"] == 6
    shown = store.show(sid2)["sizes"]
    assert shown["new_data"] == 2 * CS and shown["logical"] == 8 * CS
    # Chunk 1 is no longer zero; chunks 4 and 7 are, though taken from the parent.
    assert (store.show(sid1)["sizes"]["zero"], shown["zero"]) == (3 * CS, 2 * CS)
    # fill_from_parent does the same in one call.
    w = store.writer(len(second), parent=sid2)
    w.add(0, bytes(second[:CS]))
    assert w.fill_from_parent() == 7
    assert image_of(store, w.commit()) == bytes(second)


def test_add_async_and_multi_chunk_adds(store):
    image = mixed_image(random.Random(5), 12)

    async def feed(w):
        await asyncio.gather(*(w.add_async(off, image[off:off + 3 * CS])
                               for off in range(0, len(image), 3 * CS)))

    w = store.writer(len(image))
    asyncio.run(feed(w))
    assert image_of(store, w.commit()) == image


def test_a_missing_parent_is_refused_and_leaves_no_lease(store):
    with pytest.raises(ObjectMissing, match="snapshots/20260101T000000.000Z-00000000"):
        store.writer(CS, parent="20260101T000000.000Z-00000000")
    assert list(store.backend.list("leases/")) == []


def test_bad_ranges_and_incomplete_images_are_refused(store):
    w = store.writer(4 * CS)
    with pytest.raises(StoreBadInput, match="not whole chunks"):
        w.add(100, bytes(CS))
    with pytest.raises(StoreBadInput, match="not whole chunks"):
        w.add(0, bytes(CS + 1))
    w.add(0, b"x" * CS)
    with pytest.raises(StoreBadInput, match="given twice"):
        w.zero(0)
    with pytest.raises(StoreBadInput, match="no parent"):
        w.take_from_parent(CS)
    with pytest.raises(StoreBadInput, match="3 chunks never given, the first at offset 65536"):
        w.commit()
    assert store.snapshot_ids() == []
    with pytest.raises(StoreBadInput, match="unknown manifest fields: colour"):
        w.commit(colour="blue")
    w.zero(CS, 3 * CS)                  # the writer stayed open: complete it
    assert image_of(store, w.commit()) == b"x" * CS + bytes(3 * CS)


def test_restore_to_file_is_sparse_and_exact(store, store_dir):
    image = mixed_image(random.Random(6), 30)
    sid = backup(store, image)
    out = os.path.join(store_dir, "restored.raw")
    written = store.restore_to_file(sid, out)
    assert written == 20 * CS
    with open(out, "rb") as f:
        assert f.read() == image
    assert os.stat(out).st_blocks * 512 < len(image)


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_restore_to_file_over_an_old_file_with_an_unaligned_tail(store, where, tmp_path):
    """A file that held other data is replaced by exactly the image; the
    last chunk, 5000 bytes, goes through the page cache, the others are
    written O_DIRECT (tmpfs and ext4 here both take it)."""
    image = mixed_image(random.Random(12), 7, tail=5000)
    sid = backup(store, image)
    out = os.path.join(store.backend.root if where == "tmpfs" else str(tmp_path), "restored.raw")
    with open(out, "wb") as f:
        f.write(random.Random(13).randbytes(len(image) + 3 * CS))
    assert store.restore_to_file(sid, out) == 5 * CS + 5000     # chunks 1 and 4 are zeroes
    with open(out, "rb") as f:
        assert f.read() == image


@pytest.mark.parametrize("encrypted", [False, True])
def test_get_chunk_into_opens_like_get_chunk(store_dir, encrypted):
    """Into a buffer that held garbage: the same bytes as get_chunk, for a
    compressed and a raw chunk; a wrong length or id is CorruptObject."""
    key = None
    if encrypted:
        key = os.path.join(store_dir, "key")
        new_key_file(key)
    s = init_dir(os.path.join(store_dir, "s"), chunk_size=CS, key_file=key)
    image = mixed_image(random.Random(14), 3)
    sid = backup(s, image)
    buf = bytearray(random.Random(15).randbytes(CS + 100))
    for off in (0, 2 * CS):                 # random (raw), compressible (zstd)
        cid = s.index(sid).id_at(off // CS)
        view = s.get_chunk_into(cid, CS, buf)
        assert len(view) == CS and view == s.get_chunk(cid, CS) == image[off:off + CS]
        with pytest.raises(CorruptObject, match=chunk_name(cid)):
            s.get_chunk_into(cid, CS - 4096, buf)
        with pytest.raises(CorruptObject, match=chunk_name(cid)):
            s.get_chunk_into(cid, CS, bytearray(CS - 1))
    s.close()


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 1 MiB file of random bytes on the disk (root),
    detached afterwards."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop device")
    backing = tmp_path / "device.img"
    backing.write_bytes(random.Random(16).randbytes(16 * CS))
    cp = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                        text=True, timeout=30)
    if cp.returncode != 0:
        pytest.skip(f"no loop device available: {cp.stderr.strip()}")
    dev = cp.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True, timeout=30)


@pytest.mark.root
def test_restore_to_a_block_device(store, loop_device):
    """Over a device full of other bytes: data chunks written (O_DIRECT),
    zero chunks zeroed (BLKZEROOUT), what lies beyond the image kept; a
    device smaller than the image is refused before anything is written."""
    image = mixed_image(random.Random(17), 12)
    sid = backup(store, image)
    with open(loop_device, "rb") as f:
        beyond = f.read()[len(image):]
    assert store.restore_to_file(sid, loop_device) == 8 * CS
    with open(loop_device, "rb") as f:
        got = f.read()
    assert got[:len(image)] == image and got[len(image):] == beyond
    big = backup(store, image * 2)
    with pytest.raises(StoreBadInput, match=f"block device {loop_device} has {16 * CS} bytes, "
                                            f"the image {24 * CS}"):
        store.restore_to_file(big, loop_device)
    with open(loop_device, "rb") as f:
        assert f.read() == got


def test_encryption_keys(store_dir):
    key1, key2 = os.path.join(store_dir, "k1"), os.path.join(store_dir, "k2")
    new_key_file(key1)
    new_key_file(key2)
    with pytest.raises(FileExistsError):
        new_key_file(key1)
    path = os.path.join(store_dir, "enc")
    s = init_dir(path, key_file=key1, chunk_size=CS)
    image = mixed_image(random.Random(7), 6)
    sid = backup(s, image, volume="secret-volume")
    # Everything but the config is sealed: no plaintext name, no plaintext data.
    for dirpath, _d, files in os.walk(path):
        for f in files:
            if f != "config" and "cache" not in dirpath:
                raw = open(os.path.join(dirpath, f), "rb").read()
                assert b"secret-volume" not in raw and b"splitd backup" not in raw
                assert HEADER.unpack_from(raw)[3] & F_SEALED
    with pytest.raises(KeyRefused, match="is encrypted: give its key file"):
        open_dir(path)
    with pytest.raises(KeyRefused, match="wrong key for store"):
        open_dir(path, key_file=key2)
    assert image_of(open_dir(path, key_file=key1), sid) == image
    plain = init_dir(os.path.join(store_dir, "plain"), chunk_size=CS)
    with pytest.raises(KeyRefused, match="not encrypted, but a key file was given"):
        open_dir(plain.backend.root, key_file=key1)
    # Two stores with different keys name the same data differently; so do two
    # plain stores (their id keys are random).
    other = init_dir(os.path.join(store_dir, "enc2"), key_file=key2, chunk_size=CS)
    backup(other, image)
    backup(plain, image)
    names = [set(x.backend.list("chunks/")) for x in (s, other, plain)]
    assert len(names[0]) == len(names[1]) == len(names[2]) == 3
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_a_sealed_object_cannot_move_to_another_name(store_dir):
    key = os.path.join(store_dir, "k")
    new_key_file(key)
    s = init_dir(os.path.join(store_dir, "enc"), key_file=key, chunk_size=CS)
    a = backup(s, b"a" * CS)
    b = backup(s, b"b" * CS)
    root = s.backend.root
    os.replace(os.path.join(root, manifest_name(a)), os.path.join(root, manifest_name(b)))
    report = s.verify(b)
    assert [p.object for p in report.problems] == [manifest_name(b)]
    assert "authentication failed" in report.problems[0].why


def test_init_refuses_an_existing_store_and_bad_settings(store, store_dir):
    with pytest.raises(StoreError, match="already holds a store"):
        init_dir(store.backend.root)
    with pytest.raises(StoreBadInput, match="chunk size"):
        init_dir(os.path.join(store_dir, "x"), chunk_size=1000)
    with pytest.raises(StoreError, match="no backup store at"):
        open_dir(os.path.join(store_dir, "nothing"))


def test_catalog_is_a_cache(store):
    sids = [backup(store, bytes([i]) * CS, volume=f"v{i}") for i in range(3)]
    assert [m["id"] for m in store.list()] == sids
    os.unlink(store.catalog().path)
    store.close()
    assert [m["volume"] for m in store.list()] == ["v0", "v1", "v2"]
    store.forget([sids[1]])
    assert [m["id"] for m in store.list()] == [sids[0], sids[2]]
    assert store.rebuild_catalog() == 2


def test_manifest_is_json_with_the_digest(store):
    sid = backup(store, b"z" * CS + bytes(CS), directory="/srv/data", created_by="test")
    raw = store.backend.get(manifest_name(sid))
    manifest = json.loads(raw[HEADER.size:-16])
    assert manifest["directory"] == "/srv/data" and len(manifest["image_digest"]) == 64
    # The digest does not depend on whether zeroes were detected or declared.
    w = store.writer(2 * CS)
    w.add(0, b"z" * CS)
    w.zero(CS)
    other = w.commit()
    assert store.manifest(other)["image_digest"] == manifest["image_digest"]
    assert chunk_name(store.chunk_id(b"z" * CS)) in set(store.backend.list("chunks/"))


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs of our own (root), unmounted afterwards."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", f"store-test-{os.getpid()}", str(mnt)],
                   check=True)
    yield str(mnt)
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.root
def test_a_full_store_fails_clearly_and_commits_nothing(small_fs):
    from common.errors import NoSpace
    s = init_dir(os.path.join(small_fs, "s"), chunk_size=CS)
    image = random.Random(8).randbytes(32 * CS)
    w = s.writer(len(image))
    with pytest.raises(NoSpace, match=rf"^filesystem {small_fs} is full: cannot write chunks/"):
        for off in range(0, len(image), CS):
            w.add(off, image[off:off + CS])
        w.commit()
    w.abort()                       # idempotent: commit already aborted if it raised
    assert s.snapshot_ids() == [] and list(s.backend.list("leases/")) == []
    assert s.check().ok
    # Space again (what gc would free): a small backup goes through.
    for name in list(s.backend.list("chunks/")):
        s.backend.delete(name)
    sid = backup(s, image[:4 * CS])
    assert image_of(s, sid) == image[:4 * CS]


def test_two_backups_at_once_both_complete(store):
    """Two writers, in threads, into one store, with much data in common (each
    chunk written by one of them, reused by the other)."""
    import threading
    rnd = random.Random(9)
    common = [rnd.randbytes(CS) for _ in range(24)]
    images = [b"".join(common) + rnd.randbytes(CS) for _ in range(2)]
    sids: list[str] = []

    def run(image):
        sids.append(backup(store, image, order=list(range(25))))

    threads = [threading.Thread(target=run, args=(im,)) for im in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sids) == 2
    for image in images:
        assert any(image_of(store, sid) == image for sid in sids)
    assert len(list(store.backend.list("chunks/"))) == 26 and store.check().ok


def test_big_chunks_skip_zstd_only_when_a_sample_does_not_shrink(store_dir):
    mib = 1 << 20
    s = init_dir(os.path.join(store_dir, "big"), chunk_size=mib)
    rnd = random.Random(12)
    chunks = [rnd.randbytes(mib),                                  # incompressible: raw
              b"splitd " * (mib // 7) + b"x" * (mib % 7),           # text: zstd
              rnd.randbytes(mib // 2) + bytes(mib // 2)]            # half and half: zstd
    sid = backup(s, b"".join(chunks))
    flags = [HEADER.unpack_from(s.backend.get(chunk_name(s.chunk_id(c))))[3] & F_ZSTD for c in chunks]
    assert flags == [0, F_ZSTD, F_ZSTD]
    assert image_of(s, sid) == b"".join(chunks)


@pytest.mark.parametrize("encrypted", [False, True])
def test_handed_over_bytearrays_are_stored_as_given(store_dir, encrypted):
    """add(handover=True) takes one-chunk bytearrays without a copy: plain
    and sealed (AESGCM takes bytes only), compressible or not, zero or not."""
    key = None
    if encrypted:
        key = os.path.join(store_dir, "k")
        new_key_file(key)
    s = init_dir(os.path.join(store_dir, "h"), key_file=key, chunk_size=CS)
    image = mixed_image(random.Random(11), 8)
    w = s.writer(len(image))
    for off in range(0, len(image), CS):
        w.add(off, bytearray(image[off:off + CS]), handover=True)
    assert image_of(s, w.commit()) == image
    s.close()
