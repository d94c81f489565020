"""backup_export(): stream one NBD export into the store as a new snapshot.

The plan, per chunk of the store (4 MiB by default, aligned to the image):

    not in x-splitd:delta (incremental)  -> take the parent's entry (nothing read)
    wholly zero in base:allocation       -> a zero chunk (nothing read or stored)
    partly in the delta (incremental)    -> the parent's chunk from the store, the
                                            delta regions READ over it
    anything else                        -> READ the whole chunk

and every chunk read goes to the writer (which dedups, compresses, stores).
So an incremental READs exactly the delta regions that may hold data: its
bytes read are at most delta regions x region size, whatever the chunk size.

base:allocation: only NBD_STATE_ZERO says the bytes read as zeroes; a run
with NBD_STATE_HOLE alone may read as anything ("base:allocation context",
NBD protocol), so it is read like data.

Reads go over every connection the export allows (multi-conn), `in_flight`
chunks at a time; the writer's own bound (SnapshotWriter.max_pending) keeps
memory at about (in_flight + 2 x workers) x chunk size.

Nothing is committed unless every chunk was read and stored: a dropped
connection, a full store or a cancelled run leaves no snapshot, only chunks
that the next run reuses (or gc removes).
"""
from __future__ import annotations

import asyncio
import getpass
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import nbdwire as c
from agents import nbd
from agents.backup.chain import BackupSource, ChainDecision, choose_parent
from agents.store import Store
from agents.store.index import chunk_count
from common.errors import Conflict, NoSpace, SplitdError

# When waiting for pending = 0 (--wait-copy): how often to look again.
PENDING_POLL = 0.5

Progress = Callable[[int, int], None]      # (bytes done, bytes to read)


class BackupFailed(SplitdError):
    """The backup did not complete; nothing was committed. The message says why."""


class NotIncremental(Conflict):
    """--incremental was asked for, but the chain cannot be trusted (the reason)."""


@dataclass
class BackupResult:
    snapshot: str
    mode: str                   # "full" | "incremental"
    reason: str
    parent: str | None
    size: int
    bytes_read: int             # READ bytes the NBD client asked for (its stats)
    reads: int                  # READ requests
    block_status: int           # BLOCK_STATUS requests
    delta_bytes: int | None     # bytes in x-splitd:delta (incremental only)
    chunks_read: int
    chunks_zero: int
    chunks_parent: int
    new_bytes: int              # plaintext of chunks new to the store
    stored_bytes: int           # what they take there (compressed, sealed)
    connections: int
    waited_s: float             # --wait-copy: time until pending = 0
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def pending_bytes(client: nbd.Client) -> int:
    total = 0
    async for _, length, flags in client.extents(nbd.PENDING):
        if flags & 1:
            total += length
    return total


async def wait_copied(client: nbd.Client, timeout: float | None,
                      progress: Progress | None = None) -> float:
    """Poll x-splitd:pending until no region is left to copy; seconds waited."""
    if nbd.PENDING not in client.contexts:
        raise BackupFailed(f"--wait-copy: {client.target.where()} offers no x-splitd:pending map "
                           "(not a split secondary of splitd)")
    start = time.monotonic()
    first = None
    while True:
        left = await pending_bytes(client)
        first = left if first is None else first
        if progress is not None and first:
            progress(first - left, first)
        if left == 0:
            return time.monotonic() - start
        if timeout is not None and time.monotonic() - start > timeout:
            raise BackupFailed(f"--wait-copy: {left} bytes still pending after {timeout:g} s; "
                               "nothing read (use --now to read through the read policy)")
        await asyncio.sleep(PENDING_POLL)


async def _runs_of(client: nbd.Client, context: str, want: Callable[[int], bool]
                   ) -> list[tuple[int, int]]:
    """The (offset, length) runs of `context` whose flags satisfy `want`."""
    return [(off, length) async for off, length, flags in client.extents(context) if want(flags)]


def _per_chunk(runs: list[tuple[int, int]], chunk: int, size: int) -> dict[int, list[tuple[int, int]]]:
    """The runs cut at chunk boundaries: chunk index -> its pieces of runs."""
    out: dict[int, list[tuple[int, int]]] = {}
    for off, length in runs:
        end = min(off + length, size)
        while off < end:
            i = off // chunk
            piece_end = min(end, (i + 1) * chunk)
            out.setdefault(i, []).append((off, piece_end - off))
            off = piece_end
    return out


def _runs(marks: bytearray, value: int) -> Iterator[tuple[int, int]]:
    """(first, end) index runs of chunks whose mark is `value`."""
    i, n = 0, len(marks)
    while i < n:
        if marks[i] != value:
            i += 1
            continue
        j = i
        while j < n and marks[j] == value:
            j += 1
        yield i, j
        i = j


async def backup_export(uri: str, store: Store, src: BackupSource, *, full: bool = False,
                        require_incremental: bool = False, wait_copy: bool = False,
                        wait_timeout: float | None = None, connections: int = 4,
                        in_flight: int = 8, progress: Progress | None = None,
                        tls: dict[str, Any] | None = None, created_by: str | None = None
                        ) -> BackupResult:
    """Back up the export at `uri` into `store`; see the module docstring.
    `src` says what the export is (chain.py); `tls`: ca_file/cert/key for
    agents.nbd.open."""
    started = time.monotonic()
    try:
        client = await nbd.open(uri, connections, max_requests=16, **(tls or {}))
    except (nbd.ConnectError, OSError, ValueError) as e:
        raise BackupFailed(f"cannot read {uri}: {e}") from None
    async with client:
        waited = 0.0
        if wait_copy:
            waited = await wait_copied(client, wait_timeout)
        size = client.size
        decision = choose_parent(store, src, size, full=full, has_delta=nbd.DELTA in client.contexts)
        if require_incremental and not decision.incremental:
            why = decision.reason.removesuffix(": full read, deduplicated")
            raise NotIncremental(f"--incremental refused: {why}")
        try:
            return await _read_into_store(client, store, src, decision, size, in_flight,
                                          progress, created_by, started, waited)
        except (nbd.RequestError, nbd.Disconnected, nbd.RequestTimeout, c.ProtocolError,
                ConnectionError) as e:
            raise BackupFailed(f"backup of {uri} failed while reading: {e}; nothing committed "
                               "(the chunks stored so far are reused by the next run)") from None
        except NoSpace as e:
            # The store's filesystem first (the backend's message), then what
            # it means for this run.
            raise NoSpace(f"{e}; nothing committed (the chunks stored so far are reused by "
                          "the next run, once there is space)") from None


async def _read_into_store(client: nbd.Client, store: Store, src: BackupSource,
                           decision: ChainDecision, size: int, in_flight: int,
                           progress: Progress | None, created_by: str | None, started: float,
                           waited: float) -> BackupResult:
    cs = store.chunk_size
    count = chunk_count(size, cs)

    def chunk_len(i: int) -> int:
        return min(cs, size - i * cs)

    # Where the image may hold data: only NBD_STATE_ZERO promises zeroes.
    if c.BASE_ALLOCATION in client.contexts:
        data = _per_chunk(await _runs_of(client, c.BASE_ALLOCATION, lambda f: not f & c.STATE_ZERO),
                          cs, size)
    else:
        data = {i: [(i * cs, chunk_len(i))] for i in range(count)}
    # What to read of each chunk: None, all of it; a list, only those ranges
    # (the delta) over the parent's chunk. Chunks in neither dict come from
    # the parent (incremental) or are zero.
    delta_bytes = None
    reads: dict[int, list[tuple[int, int]] | None] = {}
    if decision.incremental:
        delta_runs = await _runs_of(client, nbd.DELTA, lambda f: bool(f & 1))
        delta_bytes = sum(n for _, n in delta_runs)
        delta = _per_chunk(delta_runs, cs, size)
        parent_plan = bytearray(b"\x01" * count)     # 1: from the parent
        for i, ranges in delta.items():
            parent_plan[i] = 0
            if i in data:
                whole = sum(n for _, n in ranges) == chunk_len(i)
                reads[i] = None if whole else ranges
    else:
        parent_plan = bytearray(count)
        reads = dict.fromkeys(data)
    zero_plan = bytearray(0 if parent_plan[i] or i in reads else 1 for i in range(count))
    todo = sorted(reads.items())
    total = sum(chunk_len(i) if r is None else sum(n for _, n in r) for i, r in todo)
    done = 0
    pindex = store.index(decision.parent) if decision.parent else None

    def span(first: int, end: int) -> tuple[int, int]:
        return first * cs, min(end * cs, size) - first * cs

    writer = store.writer(size, parent=decision.parent)
    try:
        for first, end in _runs(parent_plan, 1):
            writer.take_from_parent(*span(first, end))
        for first, end in _runs(zero_plan, 1):
            writer.zero(*span(first, end))
        queue = iter(todo)

        async def worker() -> None:
            nonlocal done
            for i, ranges in queue:
                off, n = i * cs, chunk_len(i)
                if ranges is None:
                    buf = await client.read(off, n)
                    got = n
                else:
                    # Only the changed regions cross the network; the rest of
                    # the chunk is the parent's, read back from the store.
                    assert decision.parent is not None
                    buf = bytearray(await asyncio.to_thread(store.read_chunk, decision.parent, off, pindex))
                    view = memoryview(buf)
                    await asyncio.gather(*(client.readinto(o, view[o - off:o - off + m]) for o, m in ranges))
                    got = sum(m for _, m in ranges)
                await writer.add_async(off, buf, handover=True)
                done += got
                if progress is not None:
                    progress(done, total)

        tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(in_flight, len(todo))))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        stats = client.stats
        mode = "incremental" if decision.incremental else "full"
        read: dict[str, Any] = {
                "mode": mode, "reason": decision.reason, "bytes_read": stats.bytes_read, "reads": stats.reads,
                "block_status": stats.block_status, "delta_bytes": delta_bytes,
                "connections": len(client.connections), "waited_s": round(waited, 3)}
        sid = await asyncio.to_thread(
            writer.commit, source=src.source, volume=src.volume, pair=src.pair,
            split_gen=src.split_gen, split_time=src.split_time, directory=src.directory,
            mountpoint=src.mountpoint,
            delta_base=src.delta_base, pair_created=src.pair_created, read=read,
            created_by=created_by or default_created_by())
    except BaseException:
        writer.abort()
        raise
    ws = writer.stats
    return BackupResult(
        snapshot=sid, mode=mode, reason=decision.reason, parent=decision.parent, size=size,
        bytes_read=stats.bytes_read, reads=stats.reads, block_status=stats.block_status,
        delta_bytes=delta_bytes, chunks_read=len(todo), chunks_zero=ws["zero_chunks"],
        chunks_parent=ws["parent_chunks"], new_bytes=ws["new_bytes"], stored_bytes=ws["stored_bytes"],
        connections=len(client.connections), waited_s=round(waited, 3),
        seconds=round(time.monotonic() - started, 3))


def default_created_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()} (splitctl backup run)"
