"""Incremental forever: may this split be read as an incremental of a
snapshot already in the store, and of which one?

A backup of split N+1 is a true incremental of the backup of split N exactly
when the export's delta covers the changes since split N, that is when the
pair's delta_base == N (controller/pairs.py, "Split generations"). The parent
is the newest snapshot in the store of the same source and pair; the chain is
trusted only when all of these hold, and otherwise the agent reads everything
(deduplicated against the store, so unchanged chunks are not stored again)
and says why:

- the pair is known (a backup of a bare export has no split generations);
- the store holds a snapshot of that pair from that source;
- delta_base is not None (None: the pair was just made, restored, or went
  through error or a full resync: its delta is "everything");
- the parent's split_gen == delta_base (else a generation gap: a split that
  was never backed up, or a parent forgotten since);
- the parent is the same pair, not one deleted and made again under the same
  name (pair_created), and the same size;
- the parent's manifest and index can be read.

Never a silently wrong incremental: each failed condition is a reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.store import CorruptObject, ObjectMissing, Store


@dataclass(frozen=True)
class BackupSource:
    """What the agent knows of the image it reads: where from (`source`: the
    daemon, as the NBD server's address), and for a split secondary its pair
    and split generations (from the host agent's prepare or the daemon's
    locate)."""
    source: str
    volume: str | None = None
    pair: str | None = None
    split_gen: int | None = None
    delta_base: int | None = None
    split_time: str | None = None
    pair_created: Any = None
    directory: str | None = None
    mountpoint: str | None = None


@dataclass(frozen=True)
class ChainDecision:
    parent: str | None          # the snapshot to build on; None: read everything
    reason: str                 # why (one line), for the report and the manifest
    newest: str | None = None   # the newest snapshot of the pair, trusted or not

    @property
    def incremental(self) -> bool:
        return self.parent is not None


def newest_of_pair(store: Store, source: str, pair: str) -> dict[str, Any] | None:
    """The newest snapshot manifest of `pair` from `source`, or None."""
    found = [m for m in store.list() if m.get("source") == source and m.get("pair") == pair]
    return found[-1] if found else None


def choose_parent(store: Store, src: BackupSource, size: int, *, full: bool = False,
                  has_delta: bool = True) -> ChainDecision:
    if full:
        return ChainDecision(None, "full read asked for (--full)")
    if src.pair is None:
        return ChainDecision(None, "no pair known (a bare export): full read, deduplicated")
    newest = newest_of_pair(store, src.source, src.pair)
    if newest is None:
        return ChainDecision(None, f"no earlier backup of pair {src.pair} from {src.source} "
                                   "in this store: full read")
    pid = newest["id"]

    def no(why: str) -> ChainDecision:
        return ChainDecision(None, f"{why}: full read, deduplicated", pid)

    if not has_delta:
        return no("the export offers no x-splitd:delta map")
    if src.delta_base is None:
        return no(f"pair {src.pair}'s delta has no base (the pair was made, restored, or went "
                  f"through error or a full resync since split {newest.get('split_gen')})")
    if newest.get("split_gen") != src.delta_base:
        return no(f"generation gap: the newest backup {pid} is of split {newest.get('split_gen')}, "
                  f"but this split's delta covers the changes since split {src.delta_base}")
    if src.pair_created is not None and newest.get("pair_created") not in (None, src.pair_created):
        return no(f"pair {src.pair} was deleted and made again since backup {pid}")
    if newest.get("size") != size:
        return no(f"the volume's size changed since backup {pid} ({newest.get('size')} -> {size})")
    try:
        store.manifest(pid)
        index = store.index(pid)
    except (ObjectMissing, CorruptObject) as e:
        return no(f"parent {pid} cannot be read ({e})")
    if index.size != size:
        return no(f"parent {pid}'s index is of {index.size} bytes, not {size}")
    return ChainDecision(pid, f"incremental of {pid} (split {src.delta_base} -> "
                              f"{src.split_gen}): only x-splitd:delta regions read", pid)
