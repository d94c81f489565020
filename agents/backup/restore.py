"""Write a snapshot back: into an NBD export (restore_to_uri) or a sparse
raw file or block device (restore_to_file).

Chunks are fetched, opened and re-hashed by the store's thread pool, ahead
of the writes (Store.iter_image, which first checks the index against the
manifest's image digest); writes go over every connection the export allows
with many in flight; a run of zero chunks is one WRITE_ZEROES (or a hole in
a regular file), so the target holds zeroes there whatever it held before.

At the end the target is read back and its image digest recomputed from the
bytes found there, with the store's keys (agents/store/index.py, "Image
digest"): a restore that says "ok" put exactly the snapshot's image there.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import nbdwire as c
from agents import nbd
from agents.store import Extent, Store
from agents.store.index import ZERO_ID, Index, chunk_count
from common.errors import SplitdError

Progress = Callable[[int, int], None]


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
    image_digest: str
    connections: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _digest_of(store: Store, size: int, chunk_size: int, ids: list[bytes]) -> str:
    index = Index(size, chunk_size, bytearray(b"".join(ids)))
    lengths = {index.chunk_size, index.chunk_len(index.count - 1)}
    return index.digest({n: store.zero_id(n) for n in lengths})


_ZEROES: dict[int, bytes] = {}


def _id_of(store: Store, data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's id as an index holds it (ZERO_ID for zeroes). Thread-safe."""
    n = len(data)
    zeroes = _ZEROES.get(n)
    if zeroes is None:
        zeroes = _ZEROES[n] = bytes(n)
    return ZERO_ID if data == zeroes else store.chunk_id(bytes(data))


def _check_digest(store: Store, sid: str, manifest: dict[str, Any], ids: list[bytes],
                  target: str) -> None:
    got = _digest_of(store, manifest["size"], manifest["chunk_size"], ids)
    if got != manifest["image_digest"]:
        raise RestoreFailed(f"{target} does not hold snapshot {sid}: its image digest read back "
                            f"is {got[:16]}..., the manifest's {manifest['image_digest'][:16]}...")


def restore_to_file(store: Store, sid: str, path: str, *, check: bool = True,
                    progress: Progress | None = None) -> RestoreResult:
    """Snapshot `sid` into `path` (a regular file, made sparse, or a block
    device), then (check) read it back and compare image digests."""
    started = time.monotonic()
    manifest = store.manifest(sid)
    size, cs = manifest["size"], manifest["chunk_size"]
    if os.path.exists(path) and not (os.path.isfile(path) or _is_block(path)):
        raise RestoreFailed(f"{path} is neither a regular file nor a block device")
    written = store.restore_to_file(sid, path)
    if progress is not None:
        progress(size, size)
    if check:
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
        _check_digest(store, sid, manifest, ids, path)
    return RestoreResult(sid, path, size, written, size - written, check, manifest["image_digest"],
                         0, round(time.monotonic() - started, 3))


def _is_block(path: str) -> bool:
    import stat
    return stat.S_ISBLK(os.stat(path).st_mode)


async def restore_to_uri(store: Store, sid: str, uri: str, *, connections: int = 4,
                         in_flight: int = 8, check: bool = True, progress: Progress | None = None,
                         tls: dict[str, Any] | None = None) -> RestoreResult:
    """Snapshot `sid` into the export at `uri` (its size must be at least the
    image's; a larger export keeps what lies beyond)."""
    started = time.monotonic()
    manifest = store.manifest(sid)
    size, cs = manifest["size"], manifest["chunk_size"]
    try:
        client = await nbd.open(uri, connections, max_requests=16, meta_contexts=(), **(tls or {}))
    except (nbd.ConnectError, OSError, ValueError) as e:
        raise RestoreFailed(f"cannot open {uri}: {e}") from None
    async with client:
        if client.read_only:
            raise RestoreFailed(f"{client.target.where()} is read-only")
        if client.size < size:
            raise RestoreFailed(f"{client.target.where()} has {client.size} bytes, the image "
                                f"{size}: make it at least that large")
        try:
            written, zeroed = await _write_image(client, store, sid, in_flight, size, progress)
            await client.flush()
            ids: list[bytes] = []
            if check:
                ids = await _read_back_ids(client, store, size, cs, in_flight)
        except (nbd.RequestError, nbd.Disconnected, nbd.RequestTimeout, ConnectionError) as e:
            raise RestoreFailed(f"restore of {sid} into {uri} failed: {e}") from None
        conns = len(client.connections)
    if check:
        _check_digest(store, sid, manifest, ids, uri)
    return RestoreResult(sid, uri, size, written, zeroed, check, manifest["image_digest"], conns,
                         round(time.monotonic() - started, 3))


async def _write_image(client: nbd.Client, store: Store, sid: str, in_flight: int, size: int,
                       progress: Progress | None) -> tuple[int, int]:
    """Feed Store.iter_image (a thread: it blocks) to `in_flight` writer tasks."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Extent | None] = asyncio.Queue(in_flight)
    stop = threading.Event()

    def produce() -> None:
        try:
            for ext in store.iter_image(sid):
                if stop.is_set():
                    return
                asyncio.run_coroutine_threadsafe(queue.put(ext), loop).result()
        finally:
            for _ in range(in_flight):
                if stop.is_set():
                    break
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    written = zeroed = 0
    can_zero = bool(client.flags & c.TF_SEND_WRITE_ZEROES)

    async def consume() -> None:
        nonlocal written, zeroed
        while (ext := await queue.get()) is not None:
            if ext.data is not None:
                await client.write(ext.offset, ext.data)
                written += ext.length
            else:
                if can_zero:
                    await client.zero(ext.offset, ext.length)
                else:
                    step = 4 << 20
                    for off in range(ext.offset, ext.offset + ext.length, step):
                        await client.write(off, bytes(min(step, ext.offset + ext.length - off)))
                zeroed += ext.length
            if progress is not None:
                progress(written + zeroed, size)

    producer = loop.run_in_executor(None, produce)
    consumers = [asyncio.ensure_future(consume()) for _ in range(in_flight)]
    try:
        await asyncio.gather(*consumers)
        await producer
    except BaseException:
        stop.set()
        for t in consumers:
            t.cancel()
        # Unblock the producer if it waits on a full queue.
        while not queue.empty():
            queue.get_nowait()
        await asyncio.gather(producer, return_exceptions=True)
        raise
    return written, zeroed


async def _read_back_ids(client: nbd.Client, store: Store, size: int, cs: int,
                         in_flight: int) -> list[bytes]:
    ids: list[bytes] = [b""] * chunk_count(size, cs)
    async for off, data in client.iter_read(0, size, request=cs, ahead=in_flight):
        ids[off // cs] = await asyncio.to_thread(_id_of, store, data)
    return ids
