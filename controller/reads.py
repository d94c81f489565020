"""Read policies: how a read of a split secondary is served where it touches
pending regions (not yet copied P->S), DESIGN.md "Split".

    copy-on-read  copy the regions P->S now, then read S
    staging       read the regions from P into memory, serve from there, and
                  leave the buffers to the copy engine (no second read of P)
    wait          hold the read until the copy engine has copied the regions

A pair stores and shows its policy's name (controller/states.py
READ_POLICIES); `policy_named` gives the object that does the work. Policies
hold no state: what they leave behind (staged buffers, held reads) is the
pair's, and outlives a change of policy (`pair set --read-policy`): the
engine writes staged buffers and wakes held reads whatever the policy is now.

Everything here runs on the event loop thread, synchronously, as pair.py.
"""
from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, ClassVar

from . import states as st

if TYPE_CHECKING:
    from .pair import Pair

STAGING_LIMIT = 64 * 1024 * 1024   # bytes of staged regions held at once, per pair

# S's disk is full (or its quota): P still holds the split image, so a read
# can be served from P and the regions stay pending.
_S_FULL = (errno.ENOSPC, errno.EDQUOT)


class ReadStrategy:
    """Serves a read of S that touches pending regions first..last."""

    name: ClassVar[str]

    def read(self, pair: Pair, offset: int, length: int,
             first: int, last: int) -> bytes | asyncio.Future[bytes]:
        raise NotImplementedError


class CopyOnRead(ReadStrategy):
    name = "copy-on-read"

    def read(self, pair: Pair, offset: int, length: int,
             first: int, last: int) -> bytes | asyncio.Future[bytes]:
        try:
            pair.cor_count += pair.fill_pending(first, last)
        except OSError as e:
            if e.errno not in _S_FULL:
                raise
            return pair.overlay(offset, length, pair.diff, pair.secondary, pair.primary)
        return pair.secondary.read(offset, length)


class Staging(ReadStrategy):
    name = "staging"

    def read(self, pair: Pair, offset: int, length: int,
             first: int, last: int) -> bytes | asyncio.Future[bytes]:
        pending = pair.diff
        out = bytearray(pair.secondary.read(offset, length))
        for a, b in list(pending.runs(first, last)):
            for r in range(a, b + 1):
                buf = pair.staged.get(r)
                roff, rlen = pair.span(r, r)
                if buf is None:
                    buf = self._stage(pair, r, roff, rlen)
                # Overlay the part of region r that the request covers.
                lo = max(offset, roff)
                hi = min(offset + length, roff + rlen)
                out[lo - offset:hi - offset] = buf[lo - roff:hi - roff]
        pair.kick()
        return bytes(out)

    def _stage(self, pair: Pair, r: int, roff: int, rlen: int) -> bytes:
        """Region r's bytes of the split image, staged for the engine; past
        the memory bound, copied on read instead (or, S's disk full, read
        from P unstaged)."""
        if pair.staged_bytes + rlen > STAGING_LIMIT:
            try:
                pair.copy_regions(r, r, pair.diff)
                pair.cor_count += 1
                return pair.secondary.read(roff, rlen)
            except OSError as e:
                if e.errno not in _S_FULL:
                    raise
                return pair.primary.read(roff, rlen)
        buf = pair.primary.read(roff, rlen)
        pair.staged[r] = buf
        pair.staged_bytes += rlen
        pair.staged_count += 1
        pair.urgent.append(r)   # the engine writes it soon, memory is bounded
        return buf


class Waiter:
    """A read held by policy `wait` until its regions are copied."""

    __slots__ = ("first", "future", "last", "length", "offset")

    def __init__(self, first: int, last: int, offset: int, length: int,
                 future: asyncio.Future[bytes]):
        self.first, self.last = first, last         # the regions it waits for
        self.offset, self.length = offset, length   # the read, once they are copied
        self.future = future


class Wait(ReadStrategy):
    name = "wait"

    def read(self, pair: Pair, offset: int, length: int,
             first: int, last: int) -> bytes | asyncio.Future[bytes]:
        # The engine copies these regions first; the reply waits until it has
        # (Pair.wake_waiters, from copy_regions).
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pair.waiters.append(Waiter(first, last, offset, length, fut))
        pair.urgent.extend(r for a, b in pair.diff.runs(first, last) for r in range(a, b + 1))
        pair.kick()
        return fut


_STRATEGIES = {s.name: s for s in (CopyOnRead(), Staging(), Wait())}
# One for each name a pair may store: a name without one fails at import.
POLICIES: dict[str, ReadStrategy] = {name: _STRATEGIES[name] for name in st.READ_POLICIES}


def policy_named(name: str) -> ReadStrategy:
    """The strategy of the read policy called `name` (one of READ_POLICIES)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown read policy {name!r} (one of "
                         f"{', '.join(st.READ_POLICIES)})") from None
