"""A snapshot's index: the chunk at every chunk offset of the image.

Binary, then sealed like any object (envelope.py; zstd shrinks runs of zero
entries to nothing):

    magic       4  b"SPIX"
    version     1  1
    reserved    3  0
    size        8  image size in bytes (u64, big-endian)
    chunk_size  4  bytes per chunk (u32); the last chunk may be shorter
    count       4  ceil(size / chunk_size)
    entries     count x 32: the chunk's id (keyed BLAKE3-256 of its plaintext),
                or 32 zero bytes for a chunk that is all zeroes (never stored)

Image digest. `image_digest()` is BLAKE3-256 over
"splitd image digest v1" | size | chunk_size | id_0 | id_1 | ... where id_i is
chunk i's id, and for a zero chunk the id of that many zero bytes (so the
digest does not depend on whether zeroes were detected). Every term is known
as soon as its chunk has been hashed, so it is computed at commit from the
index whatever order the chunks arrived in. Since ids are keyed, the digest
is a property of the image *in this store*: a restore recomputes it from the
bytes it wrote, with the store's keys.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from agents.store.errors import CorruptObject

ID_LEN = 32
ZERO_ID = bytes(ID_LEN)
# magic, version, 3 reserved, size, chunk_size, count
_HEAD = struct.Struct(">4sB3xQII")
_MAGIC = b"SPIX"
_DIGEST_CONTEXT = b"splitd image digest v1"
# Entries looked at together where an index may be sparse.
_BLOCK = 64
_ZERO_BLOCK = bytes(_BLOCK * ID_LEN)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


@dataclass
class Index:
    size: int
    chunk_size: int
    entries: bytearray          # count * ID_LEN

    @property
    def count(self) -> int:
        return len(self.entries) // ID_LEN

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def id_at(self, i: int) -> bytes:
        return bytes(self.entries[i * ID_LEN:(i + 1) * ID_LEN])

    def ids(self) -> Iterator[bytes]:
        for i in range(self.count):
            yield self.id_at(i)

    def data_ids(self) -> set[bytes]:
        """The distinct stored chunks this index refers to."""
        return {cid for cid in self.ids() if cid != ZERO_ID}

    def encode(self) -> bytes:
        return _HEAD.pack(_MAGIC, 1, self.size, self.chunk_size, self.count) + bytes(self.entries)

    @classmethod
    def decode(cls, name: str, data: bytes) -> Index:
        if len(data) < _HEAD.size:
            raise CorruptObject(name, "index shorter than its header")
        magic, version, size, chunk_size, count = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != 1:
            raise CorruptObject(name, "not an index (magic or version)")
        if chunk_size == 0 or count != chunk_count(size, chunk_size) \
                or len(data) != _HEAD.size + count * ID_LEN:
            raise CorruptObject(name, "index header disagrees with its length")
        return cls(size, chunk_size, bytearray(data[_HEAD.size:]))

    def _zero_block(self, i: int) -> bool:
        """Whether the _BLOCK entries from i on are all zero chunks of the
        full chunk size (a sparse image's index is mostly such blocks)."""
        end = i + _BLOCK
        return (end * self.chunk_size <= self.size
                and self.entries[i * ID_LEN:end * ID_LEN] == _ZERO_BLOCK)

    def nonzero_runs(self) -> Iterator[tuple[int, int]]:
        """(first, last) of each run of chunks that are not zero chunks."""
        entries = self.entries
        count = self.count
        start = -1
        i = 0
        while i < count:
            if self._zero_block(i):
                if start >= 0:
                    yield start, i - 1
                    start = -1
                i += _BLOCK
                continue
            zero = entries[i * ID_LEN:(i + 1) * ID_LEN] == ZERO_ID
            if zero and start >= 0:
                yield start, i - 1
                start = -1
            elif not zero and start < 0:
                start = i
            i += 1
        if start >= 0:
            yield start, count - 1

    def digest(self, zero_id: dict[int, bytes]) -> str:
        """The image digest (module docstring); `zero_id` maps a chunk length
        to the id of that many zero bytes. Blocks of zero chunks are hashed
        at once (a 1 TiB sparse index: 0.5 s one entry at a time)."""
        h = blake3.blake3(_DIGEST_CONTEXT)
        h.update(struct.pack(">QI", self.size, self.chunk_size))
        entries = self.entries
        zero_run = zero_id[self.chunk_size] * _BLOCK if self.chunk_size in zero_id else None
        i = 0
        while i < self.count:
            if zero_run is not None and self._zero_block(i):
                h.update(zero_run)
                i += _BLOCK
                continue
            cid = entries[i * ID_LEN:(i + 1) * ID_LEN]
            h.update(zero_id[self.chunk_len(i)] if cid == ZERO_ID else cid)
            i += 1
        return h.hexdigest()
