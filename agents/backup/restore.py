"""Write a snapshot back: into an NBD export (restore_to_uri) or a sparse
raw file or block device (restore_to_file).

A file is written by agents/store/image.py (worker threads that fetch, open,
re-hash and write each chunk, O_DIRECT where possible). An export is written
by `in_flight` tasks that each take the next chunk in offset order, have it
fetched, opened and re-hashed into a buffer of theirs by a thread pool (zstd,
AES-GCM and BLAKE3 release the GIL), and write it over every connection the
export allows; a run of zero chunks is one WRITE_ZEROES (or a hole in a
regular file), so the target holds zeroes there whatever it held before.

The check at the end (image.py, WrittenImage): the image digest of what the
target was given, chunk offset by chunk offset, must be the manifest's. Every
chunk's bytes were checked against their id as they were opened, into the
buffer that was then written, and the index against the manifest before the
first write; the tally proves each chunk went once to its own offset. So a
restore that says "ok" handed the target exactly the snapshot's image.

What only a read-back adds (`readback`, splitctl's --verify-readback): that
the target then returns those bytes, i.e. that nothing between our write
calls and the storage (an NBD server, a device, a concurrent writer to the
target) lost or changed them. It costs a second pass over the whole image,
and proves no durability either (a read may be answered from a cache). For
a file or device written with O_DIRECT the read-back does come from the
storage.

A chunk that is missing or fails its check does not stop the restore: the
rest is written, then ImageIncomplete names each bad chunk and the byte
ranges of the image left unwritten (exit 1: the snapshot is damaged).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import nbdwire as c
from agents import nbd
from agents.store import Store
from agents.store.errors import CorruptObject, ObjectMissing
from agents.store.image import WrittenImage, write_to_file
from agents.store.index import ZERO_ID, Index, chunk_count
from common.errors import SplitdError

Progress = Callable[[int, int], None]

# How a restore's result was checked (RestoreResult.check).
CHECK_WRITTEN = "written"           # the digest of what was written (the default)
CHECK_READBACK = "read-back"        # that, and the target read back
CHECK_NONE = "none"


class RestoreFailed(SplitdError):
    """The restore did not complete, or the target does not hold the image."""


@dataclass
class RestoreResult:
    snapshot: str
    target: str
    size: int
    bytes_written: int          # data chunks written
    bytes_zeroed: int           # zero runs (WRITE_ZEROES or holes)
    digest_checked: bool
    check: str                  # CHECK_WRITTEN, CHECK_READBACK or CHECK_NONE
    image_digest: str
    connections: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_of(check: bool, readback: bool) -> str:
    return CHECK_READBACK if readback else CHECK_WRITTEN if check else CHECK_NONE


def _finish(image: WrittenImage, target: str, check: bool) -> None:
    """Bad chunks always fail the restore (ImageIncomplete); the digest of
    what was written is compared only with `check`."""
    if check:
        image.check(target)
    else:
        image.check_complete(target)


def _digest_of(store: Store, size: int, chunk_size: int, ids: list[bytes]) -> str:
    index = Index(size, chunk_size, bytearray(b"".join(ids)))
    return index.digest(store._zero_map(index))


_ZEROES: dict[int, bytes] = {}


def _id_of(store: Store, data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's id as an index holds it (ZERO_ID for zeroes). Thread-safe."""
    n = len(data)
    zeroes = _ZEROES.get(n)
    if zeroes is None:
        zeroes = _ZEROES[n] = bytes(n)
    return ZERO_ID if data == zeroes else store.chunk_id(data)


def _check_read_back(store: Store, sid: str, manifest: dict[str, Any], ids: list[bytes],
                     target: str) -> None:
    got = _digest_of(store, manifest["size"], manifest["chunk_size"], ids)
    if got != manifest["image_digest"]:
        raise RestoreFailed(f"{target} does not hold snapshot {sid}: its image digest read back "
                            f"is {got[:16]}..., the manifest's {manifest['image_digest'][:16]}...")


def restore_to_file(store: Store, sid: str, path: str, *, check: bool = True, readback: bool = False,
                    progress: Progress | None = None) -> RestoreResult:
    """Snapshot `sid` into `path` (a regular file, made sparse, or a block
    device); then (check) compare the image digest of what was written,
    and (readback) read it back and compare that too."""
    started = time.monotonic()
    if os.path.exists(path) and not (os.path.isfile(path) or _is_block(path)):
        raise RestoreFailed(f"{path} is neither a regular file nor a block device")
    image = write_to_file(store, sid, path, progress=progress)
    _finish(image, path, check or readback)
    manifest = image.manifest
    size, cs = manifest["size"], manifest["chunk_size"]
    if readback:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            def one(i: int) -> bytes:
                n = min(cs, size - i * cs)
                data = os.pread(fd, n, i * cs)
                if len(data) != n:
                    raise RestoreFailed(f"{path} is shorter than the image ({size} bytes)")
                return _id_of(store, data)
            with ThreadPoolExecutor(store.workers) as pool:
                ids = list(pool.map(one, range(chunk_count(size, cs))))
        finally:
            os.close(fd)
        _check_read_back(store, sid, manifest, ids, path)
    return RestoreResult(sid, path, size, image.bytes_written, image.bytes_zeroed, check or readback,
                         _check_of(check, readback), manifest["image_digest"], 0,
                         round(time.monotonic() - started, 3))


def _is_block(path: str) -> bool:
    import stat
    return stat.S_ISBLK(os.stat(path).st_mode)


async def restore_to_uri(store: Store, sid: str, uri: str, *, connections: int = 4,
                         in_flight: int = 8, check: bool = True, readback: bool = False,
                         progress: Progress | None = None,
                         tls: dict[str, Any] | None = None) -> RestoreResult:
    """Snapshot `sid` into the export at `uri` (its size must be at least the
    image's; a larger export keeps what lies beyond)."""
    started = time.monotonic()
    manifest, index = store.checked_index(sid)
    size, cs = index.size, index.chunk_size
    try:
        client = await nbd.open(uri, connections, max_requests=16, meta_contexts=(), **(tls or {}))
    except (nbd.ConnectError, OSError, ValueError) as e:
        raise RestoreFailed(f"cannot open {uri}: {e}") from None
    image = WrittenImage(store, sid, manifest, index)
    async with client:
        if client.read_only:
            raise RestoreFailed(f"{client.target.where()} is read-only")
        if client.size < size:
            raise RestoreFailed(f"{client.target.where()} has {client.size} bytes, the image "
                                f"{size}: make it at least that large")
        try:
            await _write_image(client, store, image, in_flight, progress)
            await client.flush()
            _finish(image, uri, check or readback)
            ids: list[bytes] = []
            if readback:
                ids = await _read_back_ids(client, store, size, cs, in_flight)
        except (nbd.RequestError, nbd.Disconnected, nbd.RequestTimeout, ConnectionError) as e:
            raise RestoreFailed(f"restore of {sid} into {uri} failed: {e}") from None
        conns = len(client.connections)
    if readback:
        _check_read_back(store, sid, manifest, ids, uri)
    return RestoreResult(sid, uri, size, image.bytes_written, image.bytes_zeroed, check or readback,
                         _check_of(check, readback), manifest["image_digest"], conns,
                         round(time.monotonic() - started, 3))


async def _write_image(client: nbd.Client, store: Store, image: WrittenImage, in_flight: int,
                       progress: Progress | None) -> None:
    """`in_flight` tasks, each taking the next extent of the image: a chunk
    opened into a buffer of the task's (in the pool), then written; a zero
    run zeroed. Results go into `image`."""
    loop = asyncio.get_running_loop()
    index = image.index
    cs = index.chunk_size
    extents = store.iter_extents(image.sid, index)     # shared: each task takes the next
    can_zero = bool(client.flags & c.TF_SEND_WRITE_ZEROES)
    zeroes = b"" if can_zero else bytes(cs)
    done = 0

    async def task(pool: ThreadPoolExecutor) -> None:
        nonlocal done
        buf = bytearray(cs)     # this task's; dropped, never reused, if it fails
        for offset, length, cid in extents:
            if cid is None:
                if can_zero:
                    await client.zero(offset, length)
                else:
                    for off in range(offset, offset + length, cs):
                        await client.write(off, memoryview(zeroes)[:min(cs, offset + length - off)])
                image.zeroed(offset, length)
            else:
                try:
                    view = await loop.run_in_executor(pool, store.get_chunk_into, cid, length, buf)
                except (CorruptObject, ObjectMissing) as e:
                    image.failed(offset, length, cid, e)
                else:
                    await client.write(offset, view)
                    image.wrote(offset, length, cid)
            done += length
            if progress is not None:
                progress(done, index.size)

    with ThreadPoolExecutor(store.workers, thread_name_prefix="restore") as pool:
        tasks = [asyncio.ensure_future(task(pool)) for _ in range(in_flight)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def _read_back_ids(client: nbd.Client, store: Store, size: int, cs: int,
                         in_flight: int) -> list[bytes]:
    ids: list[bytes] = [b""] * chunk_count(size, cs)
    async for off, data in client.iter_read(0, size, request=cs, ahead=in_flight):
        ids[off // cs] = await asyncio.to_thread(_id_of, store, data)
    return ids
