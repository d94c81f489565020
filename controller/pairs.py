"""Every pair of the daemon: creating them, moving them between states,
persisting them, and wiring them into the volumes' layers.

The state machine: controller/states.py has the table; the "transitions"
section below acts on it, and PairManager._transition is the only code that
changes a pair's state (check, one SQLite transaction, then memory).

Crash safety (DESIGN.md "Crash safety"):
- Bitmaps write through to their files (volumes/bitmap.py), so after a
  kill -9 each file is exactly the bitmap the daemon had.
- A transition that only changes the state (split, drained, fail) is one
  SQLite transaction; the split moment is that commit, between two requests.
- Splits are durable before anything depends on them. A split's commit is
  the one not synced on the spot (DESIGN.md: a split is acknowledged at once,
  and an fdatasync costs 1-10 ms on a disk): the reply goes out, and the next
  durability round (asked for at once) syncs the WAL. Until then every change
  of P or S of that pair is held (Pair.split_durable), as a write waits for
  its bits. So a power cut before that sync finds the pair in its state
  before the split with nothing changed since: a mirror (or copy) whose
  guarantees hold, and copies the engine made of pending regions meanwhile
  are copies P->S of data P still holds. Two traces of such a lost split are
  handled at start: changed_p/changed_s bits set (in the file) for held
  changes that never ran are dropped in the mirroring states, where they
  mean nothing; and after an unclean stop (the RUNNING marker) the first
  split of a mirroring pair skips a generation number (a clean stop before
  that split keeps the marker), so a split that was answered, backed up and
  then lost never shares its split_gen with a later one (a backup chain
  matches generations by number, agents/backup/chain.py).
- A transition that rewrites bitmaps (create, resync, restore) writes the
  new set as generation N+1 files first, then commits the row naming N+1, then
  removes generation N (volumes/pairfiles.py). A crash in between leaves the
  old row and old files, or the new ones: never a state with the wrong bitmaps.
- A fault is written to the pair's fault file before its row: a full disk
  that refuses the commit still leaves the reason where a restart finds it.
- A pair whose bitmap files are missing or unreadable at start goes to
  `error` with the reason; only a full resync leaves it.

Split generations (DESIGN.md "Backup" 5, incremental forever): `split_gen`
counts a pair's splits; `delta_base` is the split_gen whose split the delta
bitmap covers the changes since, or None where the delta is "all" or unknown.
Both are columns of the pair's row, changed by _transition in the same
commit as the state, so a crash never separates them from it. The delta
bitmap is set in three places only, and each says what it then covers:
- create: every region (no base);
- resync: from split N, the regions changed on P or S since split N (base
  N); from error, every region (no base);
- restore: the regions changed since the split, but P then takes S's image:
  no base, so that a backup chain restarts with a full read.
From then on every change of P sets its delta bit before it is issued
(Pair.primary_change_ready), except in error, which therefore drops the
base too (and only a full resync leaves it). A split leaves the delta as it
is: after split N+1, the delta covers split delta_base to split N+1, and a
backup of split N+1 is a true incremental of the backup of split N exactly
when delta_base == N.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from volumes.bitmap import Bitmap
from volumes.errors import BadInput, Conflict, NotFound, SplitdError
from volumes.files import fsync_dir
from volumes.names import DEFAULT_REGION_SIZE, format_size, parse_rate, quoted, validate_name
from volumes.pairfiles import PairFiles
from volumes.store import PairRecord

from . import states as st
from .durability import Durability
from .engine import CopyEngine
from .instant import SnapshotSource, SourcePair, parse_source, source_spec
from .layers import ClientOps, ManagedVolume
from .pair import BITMAPS, INLINE_FILL, READ_POLICIES, Pair
from .served import WORKERS

log = logging.getLogger("splitd.pairs")

RUNNING_MARKER = "splitd.running"

# _transition's delta_base when the transition leaves it as it is.
_KEEP = object()


class Refused(SplitdError):
    """The action is not allowed in the pair's state."""

    code = "refused"


class PairManager:
    def __init__(self, volumes, registry, global_rate: int = 0):
        self.volumes = volumes          # volumes.manager.VolumeManager
        self.store = volumes.store
        self.registry = registry        # daemon.connections.ConnectionRegistry
        self.dir = os.path.join(volumes.data_dir, "pairs")
        self.files = PairFiles(self.dir, BITMAPS)   # bitmap generations, fault records
        self.layers: dict[str, ManagedVolume] = {}
        self.pairs: dict[str, Pair] = {}
        self.unavailable: dict[str, str] = {}
        self.ops = ClientOps()
        self.durability = Durability(lambda: list(self.pairs.values()), self.fail, self.store)
        self.engine = CopyEngine(lambda: list(self.pairs.values()), self._drained, self.fail,
                                 global_rate, self.ops)
        self.durability.on_round = self.engine.kick
        # Instant restores (controller/instant.py): the threads that fetch
        # their chunks.
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._reopening: set[asyncio.Task[None]] = set()   # _reopen tasks
        # Present while a daemon runs: found at start, the last stop was not
        # clean and a split may have been answered but lost (module docstring).
        self.running_marker = os.path.join(volumes.data_dir, RUNNING_MARKER)
        self.unclean = os.path.exists(self.running_marker)
        self._load()
        _make_durably(self.running_marker)

    # -- layers ------------------------------------------------------------------

    def layer(self, name: str) -> ManagedVolume:
        layer = self.layers.get(name)
        if layer is None or layer.vol is not self.volumes.find(name):
            layer = self.layers[name] = ManagedVolume(self.volumes.get(name), self.durability,
                                                      self.ops)
        return layer

    def roles(self, volume: str) -> list[str]:
        """Names of the pairs a volume belongs to (as P or S), unavailable
        pairs included: their rows still name the volume (deleting it would
        fail on the foreign key, deep inside SQLite)."""
        names = {p.name for p in self.pairs.values()
                 if volume in (p.primary.name, p.secondary.name)}
        names.update(rec.secondary for rec in self._unavailable_records()
                     if volume in (rec.primary_vol, rec.secondary))
        return sorted(names)

    def _unavailable_records(self) -> list[PairRecord]:
        if not self.unavailable:
            return []
        return [rec for rec in self.store.list_pairs() if rec.secondary in self.unavailable]

    def _wire(self, pair: Pair) -> None:
        self.layer(pair.primary.name).primary_of.append(pair)
        if not isinstance(pair, SourcePair):    # its S is no volume
            self.layer(pair.secondary.name).secondary_of = pair
        primary_layer = self.layer(pair.primary.name)
        pair.siblings = lambda: [p for p in primary_layer.primary_of if p is not pair]
        pair.on_fault = lambda reason: self.fail(pair, reason)
        pair.want_round = self.durability.want_round
        pair.row_synced = self.store.synced
        pair.poke = self.durability.poke
        pair.settle = self.durability.settle
        # Rounds inline (no event loop yet, tests): fills are done on the spot.
        pair.fill_limit = 1 << 62 if self.durability.inline else INLINE_FILL
        self.engine.attach(pair)

    def _unwire(self, pair: Pair) -> None:
        p_layer = self.layers.get(pair.primary.name)
        if p_layer is not None and pair in p_layer.primary_of:
            p_layer.primary_of.remove(pair)
        s_layer = self.layers.get(pair.secondary.name)
        if s_layer is not None and s_layer.secondary_of is pair:
            s_layer.secondary_of = None

    # -- start -------------------------------------------------------------------------

    def _load(self) -> None:
        for rec in self.store.list_pairs():
            p_vol = self.volumes.find(rec.primary_vol)
            # An instant restore names its volume in both columns (its S is no volume).
            s_vol = self.volumes.find(rec.secondary) if rec.source is None else p_vol
            if p_vol is None or s_vol is None:
                missing = rec.primary_vol if p_vol is None else rec.secondary
                self.unavailable[rec.secondary] = f"volume {missing!r} is not available"
                log.error("pair %s not loaded: volume %s is not available", rec.secondary, missing)
                continue
            nbits = _nregions(p_vol)
            generation = rec.generation
            unreadable = ""
            try:
                bitmaps = self.files.load_generation(rec.secondary, nbits, generation)
            except OSError as e:
                # The guarantee cannot be checked without the bitmaps: error,
                # never silently wrong. Fresh files; a full resync rebuilds S.
                unreadable = f"bitmaps of generation {generation} unreadable at start: {e}"
                log.error("pair %s: %s; state error", rec.secondary, unreadable)
                generation += 1
                bitmaps = self.files.write_generation(rec.secondary, nbits, generation, {})
            # The pair as its row says; the bitmaps may already be the fresh ones.
            args = (rec.secondary, p_vol, s_vol, rec.state, rec.read_policy, rec.rate,
                    rec.grp, rec.generation, bitmaps, rec.reason, rec.created, rec.split_at,
                    rec.split_gen, rec.delta_base)
            source_failed = ""
            if rec.source is None:
                pair = Pair(*args)
            else:
                source, source_failed = self._reopen_source(rec, bitmaps, bool(unreadable))
                pair = SourcePair(*args, source=source)
            if unreadable:
                self._transition([pair], "fail", reason=unreadable,
                                 generation=(generation, bitmaps))
            self.files.keep_only_generation(rec.secondary, generation)
            fault = self.files.read_fault(rec.secondary)
            if fault and pair.state != st.ERROR:
                # The fault was recorded, its row not (a full disk, say).
                log.error("pair %s: %s (recorded before the stop); state error",
                          rec.secondary, fault)
                try:
                    self._transition([pair], "fail", reason=fault, force=True)
                except Exception as e:  # noqa: BLE001 -- the fault file keeps it meanwhile
                    log.error("pair %s: could not record its error in the database: %s",
                              rec.secondary, e)
            if not self.files.has_fault_file(rec.secondary):
                try:
                    self.files.make_fault_file(rec.secondary)  # a pair made by an older splitd
                except OSError as e:
                    log.warning("pair %s: cannot make its fault record: %s", rec.secondary, e)
            if pair.state in st.MIRRORING:
                self._drop_lost_split(pair)
            pair.start_drain()
            self.pairs[pair.name] = pair
            self._wire(pair)
            log.info("pair %s (%s -> %s): %s, %d regions to copy", pair.name, p_vol.name,
                     pair.secondary.name, pair.state, pair.drain_total)
            if source_failed and pair.state != st.ERROR:
                self.fail(pair, source_failed)
            elif isinstance(pair, SourcePair) and pair.state == st.RESTORE \
                    and not pair.bm["restore"].count():
                # Restored before the stop, but not yet dissolved.
                self._dissolve(pair, "restored")

    def _reopen_source(self, rec: PairRecord, bitmaps: dict[str, Bitmap],
                       unreadable: bool) -> tuple[SnapshotSource, str]:
        """The source of an instant restore at start: (it, why it failed to
        open or ""). Not opened when nothing is left to restore or the pair
        is in error (nothing will be read from it)."""
        try:
            spec = parse_source(rec.source or "")
        except ValueError as e:
            spec = source_spec("?", "?", None)
            return SnapshotSource(spec, 0, reason=str(e)), f"cannot restart the restore: {e}"
        size = self.volumes.get(rec.primary_vol).size
        if unreadable or rec.state == st.ERROR:
            return SnapshotSource(spec, size, reason=rec.reason or "the pair is in error"), ""
        if not bitmaps["restore"].count():
            return SnapshotSource(spec, size, reason="nothing left to restore"), ""
        # Opened once the daemon runs (start(): _reopen), in a thread.
        source = SnapshotSource(spec, size, reason="its backup store is being opened")
        source.opening = True
        return source, ""

    async def _reopen(self, pair: SourcePair) -> None:
        """Background task, at start: the store of an instant restore opened
        again, in a thread (controller/instant.py: its reads and copies wait
        meanwhile); if it cannot be, the pair goes to error with the reason.
        Handles its own errors."""
        spec = pair.source.spec
        try:
            await pair.source.load(self.fetch_pool())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- whatever it is, it is the pair's reason
            if self.pairs.get(pair.name) is pair and pair.state != st.ERROR:
                self.fail(pair, f"cannot reopen snapshot {spec['snapshot']} of {spec['store']} "
                                f"at start: {e} (a resync cannot repair this: fix the store or "
                                f"key, or delete the pair and volume {pair.name!r} and restore "
                                "again)")
            return
        if not pair.source.closed:
            log.info("instant restore of volume %s: snapshot %s of %s open again", pair.name,
                     spec["snapshot"], spec["store"])

    def fetch_pool(self) -> ThreadPoolExecutor:
        if self._fetch_pool is None:
            self._fetch_pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="restore")
        return self._fetch_pool

    # -- instant restore (controller/instant.py) ----------------------------------------------

    async def create_instant(self, store: str, snapshot: str, volume: str,
                             key_file: str | None, rate: int = 0,
                             check: Callable[[], None] = lambda: None) -> SourcePair:
        """A new volume `volume`, restored from `snapshot` of `store`:
        usable at once, restored in the background (controller/instant.py).
        Checks first (and `check()`), then opens the store in a thread (a
        wrong key refused: nothing is made; other requests run meanwhile),
        checks again, then, without an await, the bitmap files, then the
        volume's and pair's rows in one commit."""
        volume = validate_name(volume)
        rate = parse_rate(rate, f"rate of the restore of {volume!r}")
        self._check_new_volume(volume)
        spec = source_spec(store, snapshot, key_file)
        source = SnapshotSource(spec, 0)
        await source.load(self.fetch_pool())
        made_files = False
        try:
            size = source.size
            if size <= 0 or size % 4096:
                raise BadInput(f"snapshot {snapshot} is {size} bytes, not a multiple of 4096: "
                               "restore it into a volume of your choosing instead "
                               "(splitctl backup restore --to-volume NAME)")
            rs = DEFAULT_REGION_SIZE
            nbits = (size + rs - 1) // rs
            # A walk of the whole index (262144 chunks for 1 TiB): in a thread too.
            restore_bits = await asyncio.to_thread(source.restore_bits, nbits, rs)
            self._check_new_volume(volume)
            check()
            generation = 1
            self.files.remove_generation(volume, generation)
            self.files.make_folder(volume)
            made_files = True
            self.files.make_fault_file(volume)
            bitmaps = self.files.write_generation(
                volume, nbits, generation,
                {"restore": restore_bits, "delta": _all_bits(nbits)})
            now = time.time()
            rec = PairRecord(volume, volume, st.RESTORE, "copy-on-read", rate, None, generation,
                             "", now, None, split_gen=0, delta_base=None,
                             source=json.dumps(spec))
            vol = self.volumes.create(volume, size, rs, pair=rec)
        except BaseException:
            source.close()
            if made_files:
                self.files.remove_all(volume)
            raise
        pair = SourcePair(volume, vol, vol, st.RESTORE, "copy-on-read", rate, None, generation,
                          bitmaps, "", now, None, source=source)
        pair.start_drain()
        self.pairs[volume] = pair
        self._wire(pair)
        pair.kick()
        log.info("instant restore of snapshot %s of %s into new volume %s (%s): %d of %d "
                 "regions to restore", snapshot, store, volume, format_size(size),
                 pair.drain_total, nbits)
        return pair

    def _check_new_volume(self, volume: str) -> None:
        """May an instant restore make volume `volume`? Conflict if not."""
        if self.volumes.find(volume) is not None or volume in self.volumes.unavailable \
                or self.store.get_volume(volume) is not None:
            raise Conflict(f"volume {volume!r} already exists: an instant restore makes a new "
                           "volume (give another name, or delete that one first)")
        if volume in self.unavailable:
            raise Conflict(f"pair {volume!r} exists but is unavailable "
                           f"({self.unavailable[volume]}); delete it first")

    def _dissolve(self, pair: SourcePair, outcome: str) -> None:
        """An instant restore ends: its row removed and its end recorded
        (restore_status, after restarts too) in one commit (the volume
        stands alone from then on), then its files."""
        info = pair.describe()
        info.update(state=outcome, finished=time.time(), remaining=0 if outcome == "restored"
                    else info["remaining"])
        self.store.end_restore(pair.name, outcome, json.dumps(info), info["finished"])
        self._unwire(pair)
        del self.pairs[pair.name]
        # Reads still waiting for a fetch: restored meanwhile (by the engine),
        # they are answered from P; the others (a delete) fail.
        pair.retry_reads()
        pair.fail_waiters()
        for bm in pair.bm.values():
            bm.close()
        self.files.remove_all(pair.name)
        pair.source.close()
        log.info("instant restore of volume %s %s; the pair is dissolved", pair.name, outcome)

    def _restore_end(self, volume: str) -> dict[str, Any] | None:
        """The status an instant restore of `volume` ended with, if one did."""
        ended = self.store.get_restore_end(volume)
        return json.loads(ended[1]) if ended is not None else None

    def restore_status(self, volume: str) -> dict[str, Any]:
        """An instant restore of `volume`: running (its pair.show), or how it
        ended (recorded when its pair was dissolved); NotFound otherwise."""
        volume = validate_name(volume)
        pair = self.pairs.get(volume)
        if isinstance(pair, SourcePair):
            return pair.describe()
        ended = self._restore_end(volume)
        if ended is not None:
            return ended
        raise NotFound(f"no instant restore known for volume {volume!r} (none was made, "
                       "or it ended before this splitd recorded ends)")

    def _drop_lost_split(self, pair: Pair) -> None:
        """A mirroring pair at start: drop what a split that did not survive a
        power cut may have left (module docstring, "Splits are durable ...")."""
        if self.unclean:
            pair.gen_skip = 1
        for kind in ("changed_p", "changed_s"):
            bm = pair.bm[kind]
            if bm.count():
                log.warning("pair %s: %d %s bits in state %s (a split lost in a power cut); "
                            "dropped", pair.name, bm.count(), kind, pair.state)
                bm.clear_all()
                bm.sync()

    # -- create / delete -------------------------------------------------------------------

    def create(self, primary: str, secondary: str, create_secondary: bool = False,
               read_policy: str = "copy-on-read", rate: int = 0, group: str | None = None) -> Pair:
        primary, secondary = validate_name(primary), validate_name(secondary)
        # Messages name the pair (= its secondary): "rate must be..." alone
        # does not say which request or pair was wrong.
        _check_read_policy(read_policy, secondary)
        rate = parse_rate(rate, f"rate of pair {secondary!r}")
        if group is not None:
            try:
                group = validate_name(group)
            except BadInput:
                raise BadInput(f"invalid group name {quoted(group)} for pair {secondary!r}: use "
                               "1 to 64 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit") from None
        if primary == secondary:
            raise BadInput(f"cannot pair volume {primary!r} with itself")
        for vol in (primary, secondary):
            if isinstance(self.pairs.get(vol), SourcePair):
                raise Conflict(f"volume {vol!r} is being restored from a backup snapshot "
                               f"(splitctl pair show {vol}); pair it once that is done")
        p_vol = self.volumes.get(primary)
        # A pair not loaded (one of its volumes is unavailable) still owns its
        # row and bitmap files: pairing over it failed inside SQLite, and the
        # clean-up then removed the other pair's bitmap files.
        for rec in self._unavailable_records():
            if secondary in (rec.secondary, rec.primary_vol) or primary == rec.secondary:
                vol = secondary if secondary in (rec.secondary, rec.primary_vol) else primary
                raise Conflict(f"volume {vol!r} belongs to pair {rec.secondary!r}, which is "
                               f"unavailable ({self.unavailable[rec.secondary]}); delete that "
                               "pair first")
        if secondary in self.pairs:
            raise Conflict(f"volume {secondary!r} is already the secondary of pair {secondary!r} "
                           f"(primary {self.pairs[secondary].primary.name!r})")
        as_primary = [p.name for p in self.pairs.values() if p.primary.name == secondary]
        if as_primary:
            raise Conflict(f"volume {secondary!r} is the primary of pair {as_primary[0]!r}; "
                           "a secondary cannot be a primary too")
        if primary in self.pairs:
            raise Conflict(f"volume {primary!r} is the secondary of pair {primary!r}; "
                           "cascaded pairs are not supported")
        s_vol = self.volumes.find(secondary)
        created = False
        if s_vol is None:
            if not create_secondary:
                raise NotFound(f"no volume named {secondary!r} (add --create-secondary to "
                               f"create it with the primary's size)")
            s_vol = self.volumes.create(secondary, p_vol.size, p_vol.region_size)
            created = True
        else:
            if create_secondary:
                raise Conflict(f"volume {secondary!r} exists already; drop --create-secondary "
                               "to pair with it (its data will be overwritten)")
            if s_vol.size != p_vol.size:
                raise BadInput(f"sizes differ: primary {primary!r} is {format_size(p_vol.size)} "
                               f"({p_vol.size} bytes), secondary {secondary!r} is "
                               f"{format_size(s_vol.size)} ({s_vol.size} bytes)")
            if s_vol.read_only:
                raise BadInput(f"volume {secondary!r} is read-only and cannot be a secondary")
            conns = self.registry.count(secondary)
            if conns:
                raise Conflict(f"volume {secondary!r} has {conns} open NBD connection"
                               f"{'s' if conns > 1 else ''}; disconnect them before pairing "
                               "(its data will be overwritten)")
        nbits = _nregions(p_vol)
        # A new secondary is one hole: only P's allocated regions need copying.
        # An existing one may hold anything: every region is copied.
        diff = _allocated_bits(p_vol, nbits) if created else _all_bits(nbits)
        generation = 1
        try:
            self.files.remove_generation(secondary, generation)
            self.files.make_folder(secondary)
            self.files.make_fault_file(secondary)
            bitmaps = self.files.write_generation(secondary, nbits, generation,
                                             {"diff": diff, "delta": _all_bits(nbits)})
            now = time.time()
            # The delta is every region: no base (module docstring).
            rec = PairRecord(secondary, primary, st.COPY, read_policy, rate, group, generation,
                             "", now, None, split_gen=0, delta_base=None)
            self.store.add_pair(rec)
        except BaseException:
            self.files.remove_all(secondary)
            if created:
                self.volumes.delete(secondary)
            raise
        pair = Pair(secondary, p_vol, s_vol, st.COPY, read_policy, rate, group, generation,
                    bitmaps, "", now, None)
        pair.start_drain()
        self.pairs[secondary] = pair
        self._wire(pair)
        pair.kick()
        release_heap()
        log.info("pair %s created: %s -> %s, %d of %d regions to copy", secondary, primary,
                 secondary, pair.drain_total, nbits)
        return pair

    def delete(self, name: str, force: bool = False) -> dict:
        if validate_name(name) in self.unavailable and name not in self.pairs:
            # Not loaded: nothing serves it or copies for it; forget its row
            # and files so its volumes can be deleted or paired again.
            self.store.remove_pair(name)
            self.files.remove_all(name)
            del self.unavailable[name]
            log.info("unavailable pair %s deleted", name)
            return {"name": name, "deleted": True, "state_was": "unavailable"}
        pair = self.get(name)
        if not force:
            if pair.state == st.SPLIT and pair.diff.count():
                raise Refused(f"pair {name!r} is split with {pair.diff.count()} regions not yet "
                              "copied: deleting it now leaves the secondary incomplete "
                              "(wait with `splitctl pair wait --until copied`, or use --force)")
            if isinstance(pair, SourcePair) and pair.state == st.RESTORE:
                raise Refused(_instant_refusal(pair, "deleting it now leaves the volume half "
                                               "restored (--force, then delete the volume)"))
            if pair.state == st.RESTORE:
                raise Refused(f"pair {name!r} is restoring: deleting it now leaves the primary "
                              "half restored (wait, or use --force)")
            left = pair.bm["restore"].count()
            if isinstance(pair, SourcePair) and left:
                # A failed instant restore: its volume answers EIO where
                # nothing was restored; without the pair those regions would
                # read as zeroes, with nothing to say they are wrong.
                raise Refused(f"instant restore {name!r} failed with {left} regions never "
                              f"restored: deleting the pair leaves zeroes there ({pair.reason}); "
                              f"use --force, then `splitctl volume delete {name}`, and restore "
                              "again")
        if isinstance(pair, SourcePair):
            self._dissolve(pair, "deleted")
            return {"name": name, "deleted": True, "state_was": pair.state}
        self.store.remove_pair(name)
        self._close_secondary(pair, "pair deleted")
        self._unwire(pair)
        del self.pairs[name]
        for bm in pair.bm.values():
            bm.close()
        self.files.remove_all(name)
        log.info("pair %s deleted (was %s)", name, pair.state)
        return {"name": name, "deleted": True, "state_was": pair.state}

    def get(self, name: str) -> Pair:
        pair = self.pairs.get(validate_name(name))
        if pair is None:
            ended = self._restore_end(name)
            if ended is not None:
                raise NotFound(f"no pair named {name!r}: the instant restore of volume {name!r} "
                               f"ended ({ended['state']}) and its pair is "
                               f"dissolved (splitctl backup restore-status {name})")
            raise NotFound(f"no pair named {name!r} (a pair is named by its secondary volume)")
        return pair

    def set(self, name: str, rate: int | None = None, read_policy: str | None = None) -> Pair:
        pair = self.get(name)
        changes: dict[str, int | str] = {}
        new_rate = pair.rate if rate is None else parse_rate(rate, f"rate of pair {name!r}")
        if rate is not None:
            changes["rate"] = new_rate
        if read_policy is not None:
            _check_read_policy(read_policy, name)
            if isinstance(pair, SourcePair) and read_policy != pair.read_policy:
                # Its reads always restore what they read (controller/instant.py).
                raise Refused(_instant_refusal(pair, f"its read policy is always "
                                               f"{pair.read_policy} (only --rate can be set)"))
            changes["read_policy"] = read_policy
        if not changes:
            raise BadInput("nothing to set: give a rate or a read policy")
        self.store.update_pairs([(name, changes)])
        pair.rate = new_rate
        if read_policy is not None:
            pair.read_policy = read_policy
        pair.tokens = 0.0
        pair.kick()
        return pair

    # -- transitions ------------------------------------------------------------------------
    #
    # The pair state machine: the table is controller/states.py, and this
    # section is everything that acts on it. Only _transition changes a pair's
    # state; the actions around it (split, resync, restore, drained, fail) say
    # what must be durable before and what is cleaned up after.

    def _check(self, pair: Pair, action: str) -> str:
        """The state `action` takes the pair to; Refused if it may not."""
        if isinstance(pair, SourcePair) and action not in ("drained", "fail"):
            # Before the state table: its "from restore you can: delete" is
            # no advice for a volume half restored from a snapshot.
            raise Refused(_instant_refusal(pair, f"it cannot {action}"))
        try:
            new = st.next_state(pair.name, pair.state, action)
        except st.TransitionRefused as e:
            raise Refused(str(e)) from None
        if action in ("split", "restore"):
            # While a pair restores P, P's file is not yet P's image: regions
            # still to restore are read from S. A split of another pair of P
            # would freeze the file's stale bytes as its image, and a second
            # restore into P would fight the first one (each copy into P is
            # a P write for the other: endless recursion). Both wait.
            for other in pair.siblings():
                if other.state == st.RESTORE:
                    raise Refused(f"pair {pair.name!r}: its primary {pair.primary.name!r} is "
                                  f"being restored from pair {other.name!r}; {action} it when "
                                  "that restore is done")
        return new

    def _transition(self, pairs: Sequence[Pair], action: str, *, split_at: float | None = None,
                    reason: str | None = None,
                    generation: tuple[int, dict[str, Bitmap]] | None = None,
                    delta_base: int | None | object = _KEEP,
                    force: bool = False) -> None:
        """Move `pairs` by `action`, the one place where a pair's state changes:

        1. check every pair against the table before anything changes (a
           refused member of a group changes no pair of it);
        2. record one SQLite transaction holding every pair's new row: the
           state, and split_at, reason, generation and delta_base when
           given; a split counts one more split_gen, a fail drops the delta
           base (module docstring, "Split generations"). A group split is
           one commit: its pairs split at one instant;
        3. apply it in memory: state, those fields, the new bitmap
           `generation` (number, bitmaps; the caller closes and removes the
           old one once this returns). A state with something to copy starts
           a new drain (progress from 0) and wakes the engine; in error
           nothing is copied and the progress of the drain it stopped stays.

        An error of the commit is raised at once, nothing changed; with
        `force` (a fault: the pair stops whether or not that can be
        recorded, see fail()) step 3 is done anyway and the error raised
        after it.
        """
        news = [self._check(pair, action) for pair in pairs]
        columns: dict[str, object] = {}
        if split_at is not None:
            columns["split_at"] = split_at
        if reason is not None:
            columns["reason"] = reason
        if generation is not None:
            columns["generation"] = generation[0]
        if action == "fail":
            delta_base = None   # changes in error are not tracked
        if delta_base is not _KEEP:
            columns["delta_base"] = delta_base
        rows: list[dict[str, Any]] = [{"state": new, **columns} for new in news]
        if action == "split":
            for pair, row in zip(pairs, rows, strict=True):
                row["split_gen"] = pair.split_gen + 1 + pair.gen_skip
        # A split is synced by the next durability round, before any change
        # that depends on it (module docstring); every other change now.
        durable = action != "split"
        unrecorded: Exception | None = None
        commit = 0
        try:
            commit = self.store.update_pairs(
                [(pair.name, row) for pair, row in zip(pairs, rows, strict=True)], durable=durable)
        except Exception as e:
            if not force:
                raise
            unrecorded = e
        for pair, new, row in zip(pairs, news, rows, strict=True):
            pair.state = new
            if split_at is not None:
                pair.split_at = split_at
            if reason is not None:
                pair.reason = reason
            if "split_gen" in row:
                pair.split_gen = row["split_gen"]
                pair.gen_skip = 0
            if commit:
                pair.row_commit = 0 if durable else commit
            if "delta_base" in row:
                pair.delta_base = row["delta_base"]
            if generation is not None:
                pair.use_generation(*generation)
            if new != st.ERROR:
                pair.start_drain()
                pair.kick()
        if not durable:
            self.durability.want_round()
        if unrecorded is not None:
            raise unrecorded

    def split(self, names: list[str]) -> list[Pair]:
        """Split pairs at one single point: one transaction, one loop tick, so
        no P write of any of them lands between the first and the last."""
        pairs = [self.get(n) for n in names]
        self._transition(pairs, "split", split_at=time.time())
        log.info("split %s: %s", "group" if len(pairs) > 1 else "pair",
                 ", ".join(f"{p.name} ({p.diff.count()} pending)" for p in pairs))
        return pairs

    def group_members(self, group: str) -> list[str]:
        members = sorted(p.name for p in self.pairs.values() if p.group == group)
        if not members:
            raise NotFound(f"no pairs in group {group!r}")
        return members

    def resync(self, name: str) -> Pair:
        pair = self.get(name)
        self._check(pair, "resync")
        nbits = pair.nregions
        delta_base: int | None
        if pair.state == st.ERROR:
            full = _all_bits(nbits)
            contents = {"diff": full, "delta": full}
            delta_base = None
        else:
            changed = _or(pair.bm["changed_p"], pair.bm["changed_s"])
            # The diff as the file has it: a region copied but not yet durably
            # is copied again.
            contents = {"diff": _or(pair.diff.file_bits(), changed), "delta": changed}
            # Exactly the regions changed since this split (S's changes are
            # copied back over them): the next split's delta is based here.
            delta_base = pair.split_gen
        self._rewrite(pair, "resync", contents, delta_base)
        return pair

    def restore(self, name: str) -> Pair:
        pair = self.get(name)
        self._check(pair, "restore")
        if pair.primary.read_only:
            # Its file is open read-only: every restore copy would fail (EIO to
            # P's readers, then error). Refuse before anything changes.
            raise Refused(f"pair {name!r}: primary {pair.primary.name!r} is read-only and "
                          "cannot be restored")
        changed = _or(pair.bm["changed_p"], pair.bm["changed_s"])
        # P becomes S's image, which differs from this split's image where S
        # wrote: the next split's delta must name those regions (and what P
        # writes from now on). Keeping the old delta (the previous split to
        # this one) lost S's writes from incremental backups. P's image jumps
        # back, though: the next split's backup starts a new chain (no base).
        contents = {"diff": pair.diff.file_bits(), "delta": changed, "restore": changed}
        self._rewrite(pair, "restore", contents, None)
        return pair

    def _rewrite(self, pair: Pair, action: str, contents: Mapping[str, bytes | None],
                 delta_base: int | None) -> None:
        """A transition with a new bitmap generation (resync, restore): the
        new files and their directory entry durable, then the row naming
        them (and the split_gen the new delta is based on) committed, then
        the old files removed. A crash in between leaves the old row and
        files, or the new ones."""
        generation = pair.generation + 1
        bitmaps = self.files.write_generation(pair.name, pair.nregions, generation, contents)
        leaving_error = pair.state == st.ERROR
        old = pair.bm
        try:
            self._transition([pair], action, reason="", generation=(generation, bitmaps),
                             delta_base=delta_base)
        except BaseException:
            if pair.generation != generation:   # not committed: the old one stays
                for bm in bitmaps.values():
                    bm.close()
                self.files.remove_generation(pair.name, generation)
            raise
        if leaving_error:
            # Leaving error (a full resync): the row says so now; forget the fault.
            try:
                self.files.write_fault(pair.name, "")
            except OSError as e:
                log.warning("pair %s: could not clear its fault record: %s", pair.name, e)
        self._close_secondary(pair, f"pair {action}")
        for bm in old.values():
            bm.close()
        self.files.remove_generation(pair.name, generation - 1)
        release_heap()
        log.info("pair %s: %s, %d regions to copy", pair.name, pair.state, pair.drain_total)

    def _drained(self, pair: Pair) -> None:
        """The copy engine has nothing left to copy (copy, resync, restore)."""
        if pair.state == st.RESTORE:
            # P holds S's image only once the restore copies are durable (in
            # `pair` the restore bitmap is no longer looked at). A copy or
            # resync needs no wait: in `pair` the diff is still drained, and
            # its lazy clears are due as soon as nothing is left to copy.
            bm = pair.bm["restore"]
            if bm.lazy or not bm.synced():
                if not self.durability.inline:
                    self.durability.want_round()
                    return
                self.durability.round_now(everything=True)
        if isinstance(pair, SourcePair):
            self._dissolve(pair, "restored")
            return
        was = pair.state
        self._transition([pair], "drained")
        log.info("pair %s: %s done, now %s", pair.name, was, pair.state)
        # The copies are done: make them durable now, not at the next idle round.
        self.durability.want_round()

    def fail(self, pair: Pair, reason: str) -> None:
        """Suspend a pair: state error, recorded where a restart finds it. If
        it cannot be recorded at all, pair.unrecorded stays set and the
        primary's writes are refused (Pair.primary_change_ready) until it is."""
        if pair.state != st.ERROR:
            log.error("pair %s: %s; state error (%s)", pair.name, reason,
                      "delete the pair and the volume, restore again"
                      if isinstance(pair, SourcePair) else "only a full resync leaves it")
        recorded = False
        # The fault file first: it was allocated with the pair, so this
        # write needs no new space when the SQLite commit fails for want of it.
        try:
            self.files.write_fault(pair.name, reason)
            recorded = True
        except OSError as e:
            log.error("pair %s: could not write its fault record: %s", pair.name, e)
        try:
            self._transition([pair], "fail", reason=reason, force=True)
            recorded = True
        except Exception as e:  # noqa: BLE001 -- the fault file may hold it
            log.error("pair %s: could not record its error in the database: %s", pair.name, e)
        pair.unrecorded = not recorded
        self._close_secondary(pair, reason)

    def _close_secondary(self, pair: Pair, reason: str) -> None:
        """S stops being served: close its connections, fail waiting reads."""
        pair.fail_waiters()
        n = self.registry.close_export(pair.secondary.name, reason)
        if n:
            log.info("closed %d connection(s) to %s: %s", n, pair.secondary.name, reason)

    # -- daemon life --------------------------------------------------------------------------

    def start(self) -> None:
        self.durability.start()
        for pair in self.pairs.values():
            pair.fill_limit = INLINE_FILL
            if isinstance(pair, SourcePair) and pair.source.opening:
                task = asyncio.get_running_loop().create_task(self._reopen(pair))
                self._reopening.add(task)
                task.add_done_callback(self._reopening.discard)
        self.engine.start()

    async def stop(self) -> None:
        for task in list(self._reopening):
            task.cancel()       # (an open under way in its thread is left to finish)
        await self.engine.stop()
        # Every copy made durable, every lazy clear applied, every bitmap
        # (and the WAL) synced: a clean stop, no split can be lost.
        await self.durability.stop()
        self.store.sync_wal()
        if any(pair.gen_skip for pair in self.pairs.values()):
            # A pair has not split since an unclean stop: the number a lost
            # split of it may have had stays skipped past this clean stop
            # (the marker stays, so the next start skips it again).
            return
        try:
            os.unlink(self.running_marker)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for pair in self.pairs.values():
            for bm in pair.bm.values():
                bm.close()
            if isinstance(pair, SourcePair):
                pair.source.close()
        if self._fetch_pool is not None:
            self._fetch_pool.shutdown(wait=False, cancel_futures=True)


def _make_durably(path: str) -> None:
    """Create `path` (empty) and make it and its directory entry durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def _instant_refusal(pair: SourcePair, what: str) -> str:
    """Why an instant restore's pair refuses `what`, and what to do instead."""
    spec = pair.source.spec
    head = (f"pair {pair.name!r} is the instant restore of volume {pair.name!r} from snapshot "
            f"{spec['snapshot']} of {spec['store']}: {what}")
    if pair.state == st.ERROR:
        return (f"{head}; a resync cannot repair a failed one: delete the pair and the volume "
                f"(splitctl pair delete {pair.name} --force; splitctl volume delete "
                f"{pair.name}) and restore again")
    return (f"{head}; its pair is dissolved once the volume is restored "
            f"(splitctl backup restore-status {pair.name} --wait)")


def _check_read_policy(policy, pair_name: str) -> None:
    if not isinstance(policy, str) or policy not in READ_POLICIES:
        raise BadInput(f"read policy {quoted(policy)} for pair {pair_name!r} is not one of "
                       f"{', '.join(READ_POLICIES)}")


def release_heap() -> None:
    """Give freed memory back to the system. Building a generation of bitmaps
    makes several temporary copies of 2 MiB (for a 1 TiB volume) that glibc
    would otherwise keep on the heap for good."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def _nregions(vol) -> int:
    return (vol.size + vol.region_size - 1) // vol.region_size


def _all_bits(nbits: int) -> bytes:
    bm = Bitmap(nbits)
    if nbits:
        bm.set_range(0, nbits - 1)
    return bm.copy_bits()


def _allocated_bits(vol, nbits: int) -> bytes:
    """Bits of the regions that hold any allocated data of `vol`."""
    bm = Bitmap(nbits)
    rs = vol.region_size
    pos = 0
    for length, flags in vol.extents(0, vol.size):
        if not flags & 1:  # data
            bm.set_range(pos // rs, (pos + length - 1) // rs)
        pos += length
    return bm.copy_bits()


def _or(*maps: Bitmap | bytes) -> bytes:
    """The union of bitmaps (or their bytes), as bytes."""
    raw = [m.bits if isinstance(m, Bitmap) else m for m in maps]
    acc = 0
    for r in raw:
        acc |= int.from_bytes(r, "little")
    return acc.to_bytes(len(raw[0]), "little")
