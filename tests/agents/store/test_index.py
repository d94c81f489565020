"""The index's block-wise walks (digest, nonzero_runs) against the plain
definition, one entry at a time, on indexes of any shape."""
from __future__ import annotations

import struct

import blake3
from hypothesis import given, strategies as st

from agents.store.index import _DIGEST_CONTEXT, ID_LEN, ZERO_ID, Index, chunk_count


@st.composite
def indexes(draw):
    chunk_size = draw(st.sampled_from([4096, 1 << 20]))
    count = draw(st.integers(1, 300))
    size = count * chunk_size - draw(st.sampled_from([0, 1, chunk_size // 2]))
    entries = bytearray(chunk_count(size, chunk_size) * ID_LEN)
    for i in draw(st.sets(st.integers(0, len(entries) // ID_LEN - 1), max_size=40)):
        entries[i * ID_LEN:(i + 1) * ID_LEN] = draw(st.binary(min_size=ID_LEN, max_size=ID_LEN))
    return Index(size, chunk_size, entries)


def _plain_digest(index: Index, zero_id: dict[int, bytes]) -> str:
    h = blake3.blake3(_DIGEST_CONTEXT)
    h.update(struct.pack(">QI", index.size, index.chunk_size))
    for i, cid in enumerate(index.ids()):
        h.update(zero_id[index.chunk_len(i)] if cid == ZERO_ID else cid)
    return h.hexdigest()


@given(indexes())
def test_digest_and_runs_as_defined(index):
    zero_id = {index.chunk_size: b"z" * ID_LEN, index.chunk_len(index.count - 1): b"y" * ID_LEN}
    if index.chunk_len(index.count - 1) == index.chunk_size:
        zero_id[index.chunk_size] = b"z" * ID_LEN
    assert index.digest(zero_id) == _plain_digest(index, zero_id)
    nonzero = [i for i, cid in enumerate(index.ids()) if cid != ZERO_ID]
    covered = [i for a, b in index.nonzero_runs() for i in range(a, b + 1)]
    assert covered == nonzero
    runs = list(index.nonzero_runs())
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in zip(runs, runs[1:], strict=False))  # maximal
