"""Corruption is found and named: a flipped byte in a chunk, an index or a
manifest, and a missing chunk; verify and check name the object and every
snapshot it breaks; reading that snapshot refuses."""
from __future__ import annotations

import os
import random

import pytest

from agents.store import CorruptObject, ImageIncomplete, init_dir, new_key_file
from agents.store.names import chunk_name, index_name, manifest_name

from .conftest import backup, image_of

CS = 65536


def flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture(params=["plain", "encrypted"])
def three(request, store_dir):
    """A store with three snapshots: A and B share chunk `shared`, C does not."""
    key = None
    if request.param == "encrypted":
        key = os.path.join(store_dir, "key")
        new_key_file(key)
    s = init_dir(os.path.join(store_dir, "s"), chunk_size=CS, key_file=key)
    rnd = random.Random(10)
    shared, a_only, b_only = rnd.randbytes(CS), b"a" * CS, rnd.randbytes(CS)
    a = backup(s, shared + a_only)
    b = backup(s, b_only + shared)
    c = backup(s, rnd.randbytes(CS) + bytes(CS))
    yield s, (a, b, c), s.chunk_id(shared)
    s.close()


def path_of(s, name):
    return os.path.join(s.backend.root, name)


def test_clean_store_verifies(three):
    s, sids, _ = three
    for sid in sids:
        assert s.verify(sid).ok
    report = s.check()
    assert report.ok and report.chunks_checked == 4 and report.unreferenced_chunks == 0


@pytest.mark.parametrize("extra", [1, 4096])
def test_chunk_grown_past_what_it_can_be_is_refused_before_reading(three, extra):
    """A chunk's object is at most its plaintext plus header, nonce and tag
    (zstd's output is kept only when smaller): a bigger one is corrupt, and
    is refused from its size, then again after a good chunk is read."""
    s, (a, b, c), shared = three
    with open(path_of(s, chunk_name(shared)), "ab") as f:
        f.write(os.urandom(CS + 64 + extra))
    with pytest.raises(CorruptObject, match=f"{chunk_name(shared)}: .*more than it can be"):
        s.get_chunk(shared, CS)
    other = s.index(c).id_at(0)     # this thread's buffer still reads a good chunk
    assert s.chunk_id(s.get_chunk(other, CS)) == other
    with pytest.raises(CorruptObject, match=chunk_name(shared)):
        s.get_chunk(shared, CS)


@pytest.mark.parametrize("where", [0, 3, 8, 100, -1])
def test_flipped_byte_in_a_shared_chunk(three, where):
    s, (a, b, c), shared = three
    path = path_of(s, chunk_name(shared))
    flip(path, where % os.path.getsize(path))
    report = s.verify(a)
    assert [(p.object, p.what, p.snapshots) for p in report.problems] == \
        [(chunk_name(shared), "corrupt", [a, b])]
    assert report.broken_snapshots == [a, b]
    whole = s.check()
    assert whole.broken_snapshots == [a, b] and len(whole.problems) == 1
    assert s.verify(c).ok
    with pytest.raises(CorruptObject, match=chunk_name(shared)):
        image_of(s, b)


def test_missing_chunk(three):
    s, (a, b, c), shared = three
    os.unlink(path_of(s, chunk_name(shared)))
    report = s.verify(b)
    assert [(p.what, p.snapshots) for p in report.problems] == [("missing", [a, b])]
    assert s.check(read_data=False).broken_snapshots == [a, b]
    # A restore writes the rest, then names the chunk and the range it held.
    out = path_of(s, "../restored")
    with pytest.raises(ImageIncomplete, match=chunk_name(shared)) as e:
        s.restore_to_file(b, out)
    assert e.value.ranges == [(CS, CS)] and list(e.value.chunks) == [chunk_name(shared)]
    assert f"image bytes {CS}+{CS} (offset+length) were not restored" in str(e.value), e.value
    with open(out, "rb") as f:
        assert f.read() == s.read_chunk(b, 0) + bytes(CS)


def test_restore_names_every_range_of_every_bad_chunk(store_dir):
    """One corrupt chunk used at three offsets (two of them adjacent) and a
    missing one: the restore writes every other chunk, then names both
    chunks and exactly the ranges they held, adjacent ones merged."""
    s = init_dir(os.path.join(store_dir, "s"), chunk_size=CS)
    rnd = random.Random(11)
    x, y, z = rnd.randbytes(CS), rnd.randbytes(CS), rnd.randbytes(CS)
    image = x + y + x + x + bytes(CS) + z + y[:4096]
    sid = backup(s, image)
    flip(path_of(s, chunk_name(s.chunk_id(x))), 100)
    os.unlink(path_of(s, chunk_name(s.chunk_id(y[:4096]))))
    out = path_of(s, "../restored")
    with pytest.raises(ImageIncomplete) as e:
        s.restore_to_file(sid, out)
    assert e.value.ranges == [(0, CS), (2 * CS, 2 * CS), (6 * CS, 4096)], e.value.ranges
    assert sorted(e.value.chunks) == sorted([chunk_name(s.chunk_id(x)), chunk_name(s.chunk_id(y[:4096]))])
    msg = str(e.value)
    assert msg.startswith(f"snapshot {sid} is damaged: image bytes 0+{CS}, {2 * CS}+{2 * CS}, "
                          f"{6 * CS}+4096 (offset+length) were not restored"), msg
    assert "content does not match its name" in msg or "corrupt object" in msg, msg
    assert f"missing object {chunk_name(s.chunk_id(y[:4096]))}" in msg, msg
    with open(out, "rb") as f:
        got = f.read()
    assert len(got) == len(image)
    for i in (1, 4, 5):         # y, zeroes, z: written
        assert got[i * CS:(i + 1) * CS] == image[i * CS:(i + 1) * CS]
    s.close()


@pytest.mark.parametrize("name_of", [index_name, manifest_name])
@pytest.mark.parametrize("where", [2, 12, -3])
def test_flipped_byte_in_an_index_or_manifest(three, name_of, where):
    s, (a, b, c), _ = three
    path = path_of(s, name_of(b))
    flip(path, where % os.path.getsize(path))
    report = s.verify(b)
    assert [(p.object, p.what, p.snapshots) for p in report.problems] == [(name_of(b), "corrupt", [b])]
    assert s.check().broken_snapshots == [b]
    assert s.verify(a).ok and s.verify(c).ok
    with pytest.raises(CorruptObject, match=name_of(b)):
        image_of(s, b)


def test_sampled_verify_reads_a_share(store):
    rnd = random.Random(11)
    sid = backup(store, rnd.randbytes(40 * CS))
    report = store.verify(sid, sample_pct=10, seed=1)
    assert report.ok and report.chunks_checked == 4
