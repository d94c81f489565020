"""Garbage collection that is safe while backups are written, and retention.

Mark and sweep
--------------
Mark: every chunk named by the index of a committed snapshot, or of the parent
of a running writer, is live. Sweep: every other chunk goes, but only if its
modification time is before a *cutoff*, and so do indexes with no manifest
(a writer killed between index and manifest, or a forgotten snapshot).

Why a running writer loses nothing:

1. A writer holds a lease (`leases/<uuid>`: start time, parent, heartbeat
   every LEASE_REFRESH seconds) from before its first chunk until after its
   manifest is written. A sweep takes
       cutoff = min(sweep start, start of every live lease) - margin,
   so every chunk a live writer wrote has an mtime >= its start >= cutoff,
   and a chunk it reuses is touched first (mtime = now) - both survive.
   The parent it takes entries from is a root of the mark, even if it was
   forgotten meanwhile (forget removes only the manifest; the index stays
   until no lease names it). Where touching cannot update a time (S3: s3.py),
   a reused chunk is only protected by (2).
2. What (1) does not close is the race of a sweep that read a reused chunk's
   old mtime just before the writer touched it, and deletes it just after. So
   a sweep announces itself (`gc/<uuid>`: "running", a heartbeat and a beat
   counter). It bumps the counter at least every SWEEP_BEAT seconds, and
   never between reading a chunk's mtime and deleting that chunk. A writer,
   at commit, once every chunk is processed (so every touch is done), writes
   its index and names it in its lease (a fresh beat), then looks at the
   running sweeps and waits until each has bumped its counter or ended.
   Right after every bump a sweep reads the live leases again and marks the
   indexes they name (and their parents) before it decides on anything else:
   every deletion decided before the writer's index was marked is then done,
   and later ones see the index (and the touches). If any sweep ran
   since the writer started, it then checks that every chunk its index
   names still exists; if some are gone it commits nothing and raises
   ConcurrentSweep with their offsets (no data is lost: no snapshot refers
   to them); the caller reads those chunks again from its source, gives them
   to the writer and commits again. A sweep that starts after that check sees the
   lease and its index. The wait is about a second, however long the sweep.
3. A lease or marker whose heartbeat is older than LEASE_EXPIRY belongs to a
   dead process and is ignored (and removed by a later sweep). A sweep beats
   between objects, from the thread that sweeps, and before each deletion checks that
   its last beat is recent: a sweep that was paused (SIGSTOP, a stalled
   storage) long enough for writers to think it dead stops instead of
   deleting. A writer beats once more just before its fence, so a sweep that
   starts after the fence sees its lease even if the writer was paused. What
   remains is a pause of more than LEASE_EXPIRY/2 inside one deletion: leases
   without fencing tokens cannot close that, as with any lease scheme.

`margin` (default MARGIN seconds) allows for clocks that disagree between the
writer's host and the storage's (mtime), e.g. a remote store.

Retention (plan_prune), restic-like
-----------------------------------
Snapshots are grouped by (source, volume, pair); each group is pruned on its
own. Within a group, newest first (created_at, UTC): `last N` keeps the N
newest; `hourly/daily/weekly/monthly/yearly N` keep, for each of the N most
recent hours/days/ISO weeks/months/years *that have a snapshot*, the newest
snapshot of that bucket (buckets without snapshots do not count, so a
`daily 7` spans more than a week when a day was missed); when a group has
fewer buckets than a rule asks for, its oldest snapshot is kept as well. A
snapshot kept by any rule stays; the plan says which rules kept it. A policy
with no rule is refused: it would remove everything. (Proxmox Backup Server
differs: there each rule only considers snapshots older than those the
previous rules kept.)
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from agents.store.backend import Backend, DirBackend
from agents.store.errors import CorruptObject, ObjectMissing, StoreBadInput, StoreError
from agents.store.names import chunk_id_of, index_name, manifest_name, valid_snapshot_id

if TYPE_CHECKING:
    from agents.store.store import Store

LEASE_REFRESH = 30.0      # a writer's heartbeat
LEASE_EXPIRY = 600.0      # a lease or sweep not heard of for this long is dead
MARGIN = 300.0            # default gc margin (clock disagreement)
SWEEP_BEAT = 1.0          # a sweep bumps its beat counter at least this often
SWEEP_POLL = 0.1          # how often a committing writer looks again


def _read_json(backend: Backend, name: str) -> dict[str, Any] | None:
    try:
        value = json.loads(backend.get(name))
    except (ObjectMissing, ValueError):
        return None
    return value if isinstance(value, dict) else None


class _Heartbeat:
    """A small JSON object refreshed every LEASE_REFRESH seconds by a daemon
    thread until released."""

    def __init__(self, backend: Backend, name: str, body: dict[str, Any]) -> None:
        self.backend = backend
        self.name = name
        self.body = body
        self.start: float = body["start"]
        self.last_beat = self.start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beat()

    def beat(self) -> None:
        self.last_beat = time.time()
        self.body["heartbeat"] = self.last_beat
        self.body["beat"] = self.body.get("beat", 0) + 1
        self.backend.put(self.name, json.dumps(self.body).encode())

    def run_in_background(self) -> None:
        def loop() -> None:
            while not self._stop.wait(LEASE_REFRESH):
                try:
                    self.beat()
                except Exception:   # the owner notices a stale beat; keep trying
                    pass
        self._thread = threading.Thread(target=loop, name=f"heartbeat {self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None


class Lease(_Heartbeat):
    """A running writer's lease (module docstring, point 1)."""

    @classmethod
    def take(cls, backend: Backend, parent: str | None) -> Lease:
        lease = cls(backend, f"leases/{uuid.uuid4().hex}", {
            "start": time.time(), "parent": parent, "index": None,
            "host": socket.gethostname(), "pid": os.getpid()})
        lease.run_in_background()
        return lease

    def name_index(self, sid: str) -> None:
        """Name the index this writer is committing (written already), with
        a fresh beat: every sweep bumped after this marks it (point 2)."""
        self.body["index"] = sid
        self.beat()

    def release(self) -> None:
        if not self._stop.is_set():
            self.stop()
            try:
                self.backend.delete(self.name)
            except StoreError:      # unreachable storage: the lease expires on its own
                pass


def live_leases(backend: Backend, now: float) -> list[dict[str, Any]]:
    found = []
    for name in backend.list("leases/"):
        body = _read_json(backend, name)
        if body is not None and now - body.get("heartbeat", 0) < LEASE_EXPIRY:
            found.append(body)
    return found


def sweeps_since(backend: Backend, start: float) -> bool:
    """For a writer about to commit, all its chunks processed (module
    docstring, point 2): wait until every sweep running now has bumped its
    beat counter or ended; True if any sweep ran at any time since `start`."""
    overlapped = False
    waiting: dict[str, int] = {}
    first = True
    while first or waiting:
        now = time.time()
        markers = {name: _read_json(backend, name) for name in backend.list("gc/")}
        for name, m in markers.items():
            if m is None:
                continue
            fresh = now - m.get("heartbeat", 0) < LEASE_EXPIRY
            if m.get("state") == "running" and fresh:
                overlapped = True
                if first:
                    waiting[name] = m.get("beat", 0)
                elif name in waiting and m.get("beat", 0) != waiting[name]:
                    del waiting[name]
            elif m.get("state") == "running":
                overlapped |= m.get("heartbeat", 0) >= start
            else:
                overlapped |= m.get("end", 0) >= start
                waiting.pop(name, None)
        for name in list(waiting):
            m = markers.get(name)
            if m is None or now - m.get("heartbeat", 0) >= LEASE_EXPIRY:
                del waiting[name]
        first = False
        if waiting:
            time.sleep(SWEEP_POLL)
    return overlapped


@dataclass
class GcReport:
    dry_run: bool
    cutoff: float
    snapshots: int = 0
    live_leases: int = 0
    marked_chunks: int = 0
    unreferenced_chunks: int = 0
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    kept_young_chunks: int = 0       # unreferenced, but newer than the cutoff
    deleted_indexes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def collect_garbage(store: Store, *, dry_run: bool = False, margin: float = MARGIN) -> GcReport:
    """Mark and sweep (module docstring). Refuses to sweep (StoreError) if the
    index of a committed snapshot cannot be read: it would not know what that
    snapshot needs; `check` names the object."""
    backend = store.backend
    t0 = time.time()
    marker = _Heartbeat(backend, f"gc/{uuid.uuid4().hex}", {
        "state": "running", "start": t0, "dry_run": dry_run,
        "host": socket.gethostname(), "pid": os.getpid()})
    try:
        now = time.time()
        leases = live_leases(backend, now)
        # At least a second: file times come from a coarse clock that may lag time.time().
        cutoff = min([now] + [lease["start"] for lease in leases]) - max(margin, 1.0)
        report = GcReport(dry_run=dry_run, cutoff=cutoff, live_leases=len(leases))
        sids = store.snapshot_ids()
        report.snapshots = len(sids)
        roots: set[str] = set()
        marked: set[bytes] = set()

        def mark(sid: str) -> None:
            roots.add(sid)
            try:
                marked.update(store.index(sid).data_ids())
            except ObjectMissing:
                if sid in sids:
                    raise StoreError(f"snapshot {sid} has no index; gc refuses to sweep "
                                     f"(run check)") from None
            except CorruptObject as e:
                raise StoreError(f"{e}; gc refuses to sweep (run check)") from None

        def leases_roots(found: list[dict[str, Any]]) -> set[str]:
            return {lease[k] for lease in found for k in ("parent", "index")
                    if isinstance(lease.get(k), str)}

        def beat() -> None:
            """Bump, then mark what writers named since (point 2), before
            any further decision."""
            marker.beat()
            for sid in sorted(leases_roots(live_leases(backend, time.time())) - roots):
                mark(sid)

        for sid in sorted(set(sids) | leases_roots(leases)):
            if time.time() - marker.last_beat > SWEEP_BEAT:
                beat()
            mark(sid)
        report.marked_chunks = len(marked)

        def may_delete(name: str, live: Callable[[], bool]) -> bool:
            """Whether `name` is unmarked (`live()` false) and old enough to
            go; the caller deletes it at once. The beat comes first, never
            between the decision and the deletion (point 2); stale first, then
            beat (point 3)."""
            if time.time() - marker.last_beat > LEASE_EXPIRY / 2:
                raise StoreError("gc stalled past its lease; stopped (run it again)")
            if time.time() - marker.last_beat > SWEEP_BEAT:
                beat()
            if live():
                return False
            try:
                if backend.mtime(name) >= cutoff:
                    report.kept_young_chunks += name.startswith("chunks/")
                    return False
            except ObjectMissing:
                return False
            return True

        for name in backend.list("chunks/"):
            cid = chunk_id_of(name)
            if cid is None or cid in marked:
                continue
            report.unreferenced_chunks += 1
            if may_delete(name, partial(marked.__contains__, cid)):
                report.deleted_chunks += 1
                if not dry_run:
                    try:
                        report.deleted_bytes += backend.size(name)
                    except ObjectMissing:
                        continue
                    backend.delete(name)
        for name in backend.list("indexes/"):
            sid = name.rsplit("/", 1)[1]
            if valid_snapshot_id(sid) and sid not in roots and not backend.exists(manifest_name(sid)) \
                    and may_delete(name, partial(roots.__contains__, sid)):
                report.deleted_indexes.append(sid)
                if not dry_run:
                    backend.delete(index_name(sid))
        if not dry_run:
            _tidy(backend, now)
        backend.sync()
        report.seconds = round(time.time() - t0, 3)
        return report
    finally:
        marker.body.update(state="done", end=time.time())
        marker.beat()


def _tidy(backend: Backend, now: float) -> None:
    """Remove dead leases, old sweep markers and a killed writer's temporaries."""
    for name in list(backend.list("leases/")):
        body = _read_json(backend, name)
        if body is None or now - body.get("heartbeat", 0) > 2 * LEASE_EXPIRY:
            backend.delete(name)
    for name in list(backend.list("gc/")):
        body = _read_json(backend, name)
        if body is None or now - body.get("heartbeat", 0) > 2 * LEASE_EXPIRY:
            backend.delete(name)
    if isinstance(backend, DirBackend):
        backend.remove_stale_temporaries(LEASE_EXPIRY)


# -- retention -------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def rules(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v}


_BUCKETS = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{:04d}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


@dataclass
class PrunePlan:
    keep: list[dict[str, Any]] = field(default_factory=list)     # manifests, with "kept_by"
    remove: list[dict[str, Any]] = field(default_factory=list)   # manifests


def plan_prune(manifests: Iterable[dict[str, Any]], policy: RetentionPolicy) -> PrunePlan:
    """Which snapshots `policy` keeps and which it removes (module docstring)."""
    rules = policy.rules()
    if any(v < 0 for v in rules.values()):
        raise StoreBadInput("retention counts must not be negative")
    if not rules:
        raise StoreBadInput("no retention rule given: refusing to remove every snapshot")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for m in manifests:
        groups.setdefault((m.get("source"), m.get("volume"), m.get("pair")), []).append(m)
    plan = PrunePlan()
    for members in groups.values():
        members.sort(key=lambda m: (m["created_at"], m["id"]), reverse=True)
        kept_by: dict[str, list[str]] = {m["id"]: [] for m in members}
        for rule, count in rules.items():
            last_bucket = None
            for i, m in enumerate(members):
                if count == 0:
                    break
                if rule == "last":
                    bucket: str = str(i)
                else:
                    when = datetime.strptime(m["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
                    bucket = _BUCKETS[rule](when)
                if bucket != last_bucket:
                    kept_by[m["id"]].append(rule)
                    last_bucket = bucket
                    count -= 1
            if count and rule != "last" and members:
                # Fewer buckets than asked for: keep the oldest too, so the rule
                # still reaches as far back as the group does (as restic does).
                kept_by[members[-1]["id"]].append(f"{rule} (oldest)")
        for m in members:
            if kept_by[m["id"]]:
                plan.keep.append({**m, "kept_by": kept_by[m["id"]]})
            else:
                plan.remove.append(m)
    plan.keep.sort(key=lambda m: m["id"])
    plan.remove.sort(key=lambda m: m["id"])
    return plan


__all__ = ["collect_garbage", "plan_prune", "RetentionPolicy", "PrunePlan", "GcReport",
           "Lease", "sweeps_since"]
