"""The format of every stored object but `config`, and the keys that seal it.

An object is a fixed 8-byte header, then the body:

    magic    4  b"SPLB"
    version  1  1
    kind     1  1 chunk, 2 index, 3 manifest
    flags    1  bit 0: body is zstd-compressed; bit 1: body is AES-256-GCM
                sealed; bit 2: a 16-byte checksum follows the body
    reserved 1  0

- Plain store, chunk:     header | body               (the chunk's name is its
                                                       keyed hash: reading re-hashes)
- Plain store, otherwise: header | body | BLAKE3-128(header | name | body)
- Encrypted store:        header | nonce(12) | AES-256-GCM(body) | tag(16), with
                          associated data header | name, so a header cannot be
                          altered and an object cannot be swapped for another
                          (an index moved under another snapshot's name fails).

The nonce is random per object (96 bits; a store would need ~2^32 objects
under one key before a collision is a concern, NIST SP 800-38D 8.3).

Keys. A store has a random 32-byte `id_seed` in its config. Plain store: chunk
names are BLAKE3 keyed with `id_seed`. Encrypted store: the key file holds a
32-byte secret S; the AES key and the chunk-name key are both derived from S
(BLAKE3 derive_key, distinct contexts, mixed with id_seed), so names reveal
nothing to whoever lacks S, and two stores with different secrets name the same
data differently. The config keeps only a check value derived from S, to
refuse a wrong key before anything is read or written.
"""
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agents.store.errors import CorruptObject, KeyRefused

MAGIC = b"SPLB"
VERSION = 1
KIND_CHUNK, KIND_INDEX, KIND_MANIFEST = 1, 2, 3
F_ZSTD, F_SEALED, F_CHECKSUM = 1, 2, 4
# magic, version, kind, flags, reserved
HEADER = struct.Struct(">4sBBBB")
NONCE_LEN, TAG_LEN, SUM_LEN = 12, 16, 16
KEY_FILE_LEN = 32
# open_sealed_into's piece: decoded, then hashed while in the CPU's cache.
STEP = 128 * 1024

_CTX_AES = "splitd backup store 2026 aes-256-gcm key"
_CTX_ID = "splitd backup store 2026 chunk id key"
_CTX_CHECK = "splitd backup store 2026 key check"


def new_key_file(path: str) -> None:
    """Write a new random key file (32 bytes, hex, mode 0600); refuses to
    overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_FILE_LEN).hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_key_file(path: str) -> bytes:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise KeyRefused(f"cannot read key file {path}: {e.strerror}") from e
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != KEY_FILE_LEN:
        raise KeyRefused(f"key file {path} is not a store key (64 hex digits expected)")
    return secret


def _derive(context: str, secret: bytes, seed: bytes) -> bytes:
    return blake3.blake3(secret + seed, derive_key_context=context).digest()


def key_check(secret: bytes, seed: bytes) -> str:
    return _derive(_CTX_CHECK, secret, seed).hex()


@dataclass(frozen=True)
class Keys:
    """What seals and names a store's objects: `id_key` always, `aes` only for
    an encrypted store."""
    id_key: bytes
    aes: AESGCM | None
    aes_key: bytes | None = None

    @classmethod
    def for_store(cls, seed: bytes, secret: bytes | None) -> Keys:
        if secret is None:
            return cls(id_key=seed, aes=None)
        aes_key = _derive(_CTX_AES, secret, seed)
        return cls(id_key=_derive(_CTX_ID, secret, seed), aes=AESGCM(aes_key), aes_key=aes_key)

    def decrypt(self, nonce: bytes, sealed: memoryview, aad: bytes,
                scratch: Callable[[int], bytearray] | None = None) -> bytearray | memoryview:
        """AES-256-GCM open of `sealed` (ciphertext | tag); InvalidTag if it
        fails. Through the streaming API into one preallocated buffer, from
        a view of the stored object: AESGCM.decrypt wants bytes (a 4 MiB
        slice copy first) and copies its output again; this is ~25% less
        CPU a chunk. The buffer is new, or `scratch(n)` (then the result
        is a view of it). The plaintext is returned only once finalize()
        has checked the tag."""
        assert self.aes_key is not None
        ct, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]
        d = Cipher(algorithms.AES(self.aes_key), modes.GCM(nonce, bytes(tag))).decryptor()
        d.authenticate_additional_data(aad)
        room = len(ct) + 15                 # update_into wants len + block - 1
        if scratch is not None:
            buf = scratch(room)
            n = d.update_into(ct, buf)      # type: ignore[arg-type]  # any buffer
            d.finalize()
            return memoryview(buf)[:n]
        out = bytearray(room)
        n = d.update_into(ct, out)      # type: ignore[arg-type]  # any buffer
        d.finalize()
        del out[n:]
        return out


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard's (de)compressor objects are not thread-safe: one per thread.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


_PROBE, _PROBES = 16384, 4


def _worth_compressing(plain: bytes | bytearray, level: int) -> bool:
    """False when four 16 KiB samples spread over a big object do not shrink
    by 2% together: random or already-compressed data, which zstd would take
    about a third of the hashing time to fail on. Small objects are always
    tried."""
    if len(plain) < 16 * _PROBE:
        return True
    step = len(plain) // _PROBES
    c = _compressor(level)
    packed = sum(len(c.compress(plain[i * step:i * step + _PROBE])) for i in range(_PROBES))
    return packed < 0.98 * _PROBES * _PROBE


def seal(keys: Keys, kind: int, name: str, plain: bytes | bytearray, level: int | None
         ) -> bytes:
    """The stored form of `plain`: compressed at zstd `level` (None: not at
    all) when that shrinks it (and, for a big object, when a sample says it
    might), then sealed or checksummed."""
    flags = 0
    body = plain
    if level is not None and _worth_compressing(plain, level):
        packed = _compressor(level).compress(plain)
        if len(packed) < len(plain):
            body, flags = packed, F_ZSTD
    if keys.aes is not None:
        flags |= F_SEALED
        header = HEADER.pack(MAGIC, VERSION, kind, flags, 0)
        nonce = os.urandom(NONCE_LEN)
        # AESGCM takes bytes only (a bytearray is refused with TypeError).
        return header + nonce + keys.aes.encrypt(nonce, bytes(body), header + name.encode())
    if kind != KIND_CHUNK:
        flags |= F_CHECKSUM
    header = HEADER.pack(MAGIC, VERSION, kind, flags, 0)
    if flags & F_CHECKSUM:
        return header + body + blake3.blake3(header + name.encode() + body).digest(SUM_LEN)
    return header + body


def open_sealed(keys: Keys, kind: int, name: str, stored: bytes | memoryview, max_size: int) -> bytes:
    """The plaintext of a stored object (new bytes, never a view of
    `stored`); raises CorruptObject if it fails any check."""
    flags, body = _open_body(keys, kind, name, stored, None)
    if flags & F_ZSTD:
        try:
            # -1: size not recorded; decompress() then stops at max_output_size.
            if zstandard.frame_content_size(body) > max_size:
                raise CorruptObject(name, f"claims more than {max_size} bytes")
            out: bytes = _decompressor().decompress(body, max_output_size=max_size)
            return out
        except zstandard.ZstdError as e:
            raise CorruptObject(name, f"zstd: {e}") from None
    return bytes(body)


def open_sealed_into(keys: Keys, kind: int, name: str, stored: bytes | memoryview,
                     out: memoryview, hasher: blake3.blake3 | None = None) -> int:
    """The plaintext of a stored object written into `out`; returns its
    length. A plaintext longer than `out` is CorruptObject, like any failed
    check. Nothing is allocated per call: zstd decompresses straight into
    `out` (a fresh 4 MiB result costs ~1000 page faults, a reused buffer
    none), and an encrypted body is opened into a buffer of the calling
    thread's. `out` may hold garbage after a failure.

    `hasher` is fed the plaintext piece by piece as it is written (STEP
    bytes at a time, while they are still in the CPU's cache): one pass
    over the chunk instead of a second one to hash it, ~2 ms less a 4 MiB
    chunk here."""
    flags, body = _open_body(keys, kind, name, stored, _scratch)
    if not flags & F_ZSTD:
        if len(body) > len(out):
            raise CorruptObject(name, f"more than {len(out)} bytes")
        for at in range(0, len(body), STEP):
            piece = out[at:min(at + STEP, len(body))]
            piece[:] = body[at:at + STEP]
            if hasher is not None:
                hasher.update(piece)
        return len(body)
    try:
        if zstandard.frame_content_size(body) > len(out):
            raise CorruptObject(name, f"claims more than {len(out)} bytes")
        reader = _decompressor().stream_reader(body)
        got = 0
        while got < len(out) and (n := reader.readinto(out[got:got + STEP])):
            if hasher is not None:
                hasher.update(out[got:got + n])
            got += n
        if reader.read(1):
            raise CorruptObject(name, f"more than {len(out)} bytes")
        return got
    except zstandard.ZstdError as e:
        raise CorruptObject(name, f"zstd: {e}") from None


def _scratch(n: int) -> bytearray:
    """A buffer of at least `n` bytes, the calling thread's, reused."""
    buf: bytearray | None = getattr(_local, "scratch", None)
    if buf is None or len(buf) < n:
        buf = _local.scratch = bytearray(n)
    return buf


def _open_body(keys: Keys, kind: int, name: str, stored: bytes | memoryview,
               scratch: Callable[[int], bytearray] | None
               ) -> tuple[int, bytes | bytearray | memoryview]:
    """(flags, body): the header checked, the body decrypted (into
    `scratch(n)` if given, else new) or its checksum checked; still
    compressed if flags say so. CorruptObject if any check fails."""
    if len(stored) < HEADER.size:
        raise CorruptObject(name, "shorter than its header")
    magic, version, got_kind, flags, _ = HEADER.unpack_from(stored)
    if magic != MAGIC:
        raise CorruptObject(name, "bad magic")
    if version != VERSION:
        raise CorruptObject(name, f"format version {version}, this splitd reads {VERSION}")
    if got_kind != kind:
        raise CorruptObject(name, f"kind {got_kind}, expected {kind}")
    header = bytes(stored[:HEADER.size])
    if flags & F_SEALED:
        if keys.aes is None:
            raise CorruptObject(name, "sealed, in a store opened without encryption")
        if len(stored) < HEADER.size + NONCE_LEN + TAG_LEN:
            raise CorruptObject(name, "shorter than its nonce and tag")
        nonce = bytes(stored[HEADER.size:HEADER.size + NONCE_LEN])
        try:
            return flags, keys.decrypt(nonce, memoryview(stored)[HEADER.size + NONCE_LEN:],
                                       header + name.encode(), scratch)
        except InvalidTag:
            raise CorruptObject(name, "authentication failed (altered, or not this store's)") from None
    if keys.aes is not None:
        raise CorruptObject(name, "not sealed, in an encrypted store")
    if kind != KIND_CHUNK and not flags & F_CHECKSUM:
        # seal() always sets it: a cleared bit is damage (the flags byte
        # is covered by the checksum only while the bit says to check it).
        raise CorruptObject(name, "no checksum")
    # Views, not slices: a slice of a 4 MiB chunk is a 4 MiB copy.
    body = memoryview(stored)[HEADER.size:]
    if flags & F_CHECKSUM:
        if len(body) < SUM_LEN:
            raise CorruptObject(name, "shorter than its checksum")
        body, mac = body[:-SUM_LEN], bytes(body[-SUM_LEN:])
        h = blake3.blake3(header)
        h.update(name.encode())
        h.update(body)
        if h.digest(SUM_LEN) != mac:
            raise CorruptObject(name, "checksum mismatch")
    return flags, body
