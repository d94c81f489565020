"""The object format's one rule: whatever bytes are stored, opening them gives
the plaintext that was sealed or raises CorruptObject, never anything else."""
from __future__ import annotations

import os

import blake3
import pytest
from hypothesis import given, strategies as st

from agents.store.envelope import (
    F_CHECKSUM,
    F_SEALED,
    F_ZSTD,
    HEADER,
    KIND_CHUNK,
    KIND_INDEX,
    KIND_MANIFEST,
    MAGIC,
    NONCE_LEN,
    VERSION,
    Keys,
    open_sealed,
    open_sealed_into,
    seal,
)
from agents.store.errors import CorruptObject
from agents.store.index import Index

PLAIN = Keys.for_store(bytes(32), None)
SEALED = Keys.for_store(bytes(32), b"k" * 32)
KINDS = st.sampled_from([KIND_CHUNK, KIND_INDEX, KIND_MANIFEST])


@given(keys=st.sampled_from([PLAIN, SEALED]), kind=KINDS, plain=st.binary(max_size=3000),
       level=st.sampled_from([None, 1, 3]))
def test_roundtrip(keys, kind, plain, level):
    stored = seal(keys, kind, "x/y", plain, level)
    assert open_sealed(keys, kind, "x/y", stored, 3000) == plain
    assert opened_into(keys, kind, stored, 3000) == plain


def opened_into(keys: Keys, kind: int, stored: bytes, room: int) -> bytes:
    """open_sealed_into a `room`-byte buffer (garbage before): what it wrote,
    which is also exactly what its hasher was fed."""
    out = bytearray(os.urandom(room))
    hasher = blake3.blake3()
    n = open_sealed_into(keys, kind, "x/y", stored, memoryview(out), hasher)
    assert hasher.digest() == blake3.blake3(out[:n]).digest()
    return bytes(out[:n])


@given(keys=st.sampled_from([PLAIN, SEALED]), kind=KINDS, plain=st.binary(min_size=1, max_size=2000),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.integers(0, 10**6))
def test_damage_is_detected_or_harmless(keys, kind, plain, flips, cut):
    original = seal(keys, kind, "x/y", plain, 1)
    stored = bytearray(original)
    for at, mask in flips:
        stored[at % len(stored)] ^= mask
    if cut % 3 == 0:
        stored = stored[:cut % len(stored)]
    try:
        into = opened_into(keys, kind, bytes(stored), 1 << 20)
    except CorruptObject:
        into = None
    try:
        got = open_sealed(keys, kind, "x/y", bytes(stored), 1 << 20)
    except CorruptObject:
        assert into is None, "open_sealed_into took what open_sealed refused"
        return
    assert into == got, "open_sealed_into opened it differently"
    if stored == original:          # the flips cancelled out
        return
    # Only a plain chunk has no checksum of its own (its name is checked by
    # the caller, which re-hashes it); everything else must have been caught.
    assert keys is PLAIN and kind == KIND_CHUNK, "damage went unnoticed"
    assert isinstance(got, bytes)


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_else(data):
    for keys in (PLAIN, SEALED):
        for kind in (KIND_CHUNK, KIND_INDEX, KIND_MANIFEST):
            try:
                open_sealed(keys, kind, "x/y", data, 1 << 20)
            except CorruptObject:
                pass
            try:
                opened_into(keys, kind, data, 1000)
            except CorruptObject:
                pass
    try:
        Index.decode("indexes/x", data)
    except CorruptObject:
        pass


def test_a_bomb_is_refused():
    stored = seal(PLAIN, KIND_INDEX, "x/y", bytes(1 << 20), 1)
    with pytest.raises(CorruptObject, match="claims more than"):
        open_sealed(PLAIN, KIND_INDEX, "x/y", stored, 1000)
    with pytest.raises(CorruptObject, match="claims more than 1000 bytes"):
        opened_into(PLAIN, KIND_INDEX, stored, 1000)


@pytest.mark.parametrize("keys", [PLAIN, SEALED], ids=["plain", "sealed"])
def test_more_than_the_buffer_is_refused(keys):
    """open_sealed_into never writes past its buffer: a stored body (raw,
    or a zstd frame that does not record its size) bigger than it is
    CorruptObject."""
    raw = seal(keys, KIND_CHUNK, "x/y", os.urandom(1001), None)
    with pytest.raises(CorruptObject, match="more than 1000 bytes"):
        opened_into(keys, KIND_CHUNK, raw, 1000)
    import zstandard
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(5000))
    assert zstandard.frame_content_size(frame) == -1
    header = HEADER.pack(MAGIC, VERSION, KIND_CHUNK, F_ZSTD, 0)
    if keys is SEALED:
        header = HEADER.pack(MAGIC, VERSION, KIND_CHUNK, F_ZSTD | F_SEALED, 0)
        nonce = os.urandom(NONCE_LEN)
        stored = header + nonce + keys.aes.encrypt(nonce, frame, header + b"x/y")
    else:
        stored = header + frame
    with pytest.raises(CorruptObject, match="more than 1000 bytes"):
        opened_into(keys, KIND_CHUNK, stored, 1000)
    assert opened_into(keys, KIND_CHUNK, stored, 5000) == bytes(5000)


def test_another_name_or_kind_is_refused():
    for keys in (PLAIN, SEALED):
        stored = seal(keys, KIND_MANIFEST, "snapshots/a", os.urandom(100), None)
        with pytest.raises(CorruptObject):
            open_sealed(keys, KIND_MANIFEST, "snapshots/b", stored, 1000)
        with pytest.raises(CorruptObject, match="kind"):
            open_sealed(keys, KIND_INDEX, "snapshots/a", stored, 1000)


@pytest.mark.parametrize("kind", [KIND_INDEX, KIND_MANIFEST])
def test_a_cleared_checksum_flag_is_refused(kind):
    """Found by test_damage_is_detected_or_harmless: in a plain store an index
    or manifest whose F_CHECKSUM bit is flipped off was opened unchecked
    (its checksum then read as part of the body)."""
    stored = bytearray(seal(PLAIN, kind, "x/y", b"\x00", 1))
    stored[6] ^= F_CHECKSUM
    with pytest.raises(CorruptObject, match="no checksum"):
        open_sealed(PLAIN, kind, "x/y", bytes(stored), 1000)
    with pytest.raises(CorruptObject, match="no checksum"):
        opened_into(PLAIN, kind, bytes(stored), 1000)
