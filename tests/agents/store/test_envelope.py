"""The object format's one rule: whatever bytes are stored, opening them gives
the plaintext that was sealed or raises CorruptObject, never anything else."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, strategies as st

from agents.store.envelope import (
    KIND_CHUNK,
    KIND_INDEX,
    KIND_MANIFEST,
    Keys,
    open_sealed,
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
    assert open_sealed(keys, kind, "x/y", seal(keys, kind, "x/y", plain, level), 3000) == plain


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
        got = open_sealed(keys, kind, "x/y", bytes(stored), 1 << 20)
    except CorruptObject:
        return
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
        Index.decode("indexes/x", data)
    except CorruptObject:
        pass


def test_a_bomb_is_refused():
    stored = seal(PLAIN, KIND_INDEX, "x/y", bytes(1 << 20), 1)
    with pytest.raises(CorruptObject, match="claims more than"):
        open_sealed(PLAIN, KIND_INDEX, "x/y", stored, 1000)


def test_another_name_or_kind_is_refused():
    for keys in (PLAIN, SEALED):
        stored = seal(keys, KIND_MANIFEST, "snapshots/a", os.urandom(100), None)
        with pytest.raises(CorruptObject):
            open_sealed(keys, KIND_MANIFEST, "snapshots/b", stored, 1000)
        with pytest.raises(CorruptObject, match="kind"):
            open_sealed(keys, KIND_INDEX, "snapshots/a", stored, 1000)
