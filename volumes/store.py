"""The metadata store: one SQLite database, <data_dir>/splitd.db.

Rules kept here:
- Every state change is one transaction (BEGIN IMMEDIATE ... COMMIT), so a
  crash leaves either the old state or the new one, never half of each.
- WAL journal with synchronous=FULL: a commit that returned is on disk.
  One exception, asked for by name (`durable=False`, a split): the commit is
  written to the WAL but not synced (synchronous=NORMAL, which keeps the
  database whole across a power cut but may lose the last commits); the
  caller makes it durable later with `sync_wal()` before anything that
  depends on it, and `synced(seq)` says whether it is.
- The schema version lives in PRAGMA user_version. MIGRATIONS[i] takes the
  schema from version i to i+1; opening a database applies the missing ones,
  each in its own transaction together with its version bump. A later table
  (pairs, bitmap generations, backups) is one more entry at the end of that
  list and, usually, a few methods here.
- Only this module writes SQL.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from volumes.errors import ErrorCode, SplitdError

MIGRATIONS: list[str] = [
    # 0 -> 1: volumes.
    """
    CREATE TABLE volumes (
        name        TEXT PRIMARY KEY,
        size        INTEGER NOT NULL,
        region_size INTEGER NOT NULL,
        read_only   INTEGER NOT NULL DEFAULT 0,
        created     REAL NOT NULL
    );
    """,
    # 1 -> 2: pairs. A pair is named by its secondary. `generation` names the
    # set of bitmap files that goes with this row (pairs/<secondary>/*.<gen>.bm):
    # a transition that rewrites bitmaps writes generation+1 first, then
    # commits the row, so a crash leaves the old set or the new one.
    """
    CREATE TABLE pairs (
        secondary   TEXT PRIMARY KEY REFERENCES volumes(name),
        primary_vol TEXT NOT NULL REFERENCES volumes(name),
        state       TEXT NOT NULL,
        read_policy TEXT NOT NULL,
        rate        INTEGER NOT NULL DEFAULT 0,
        grp         TEXT,
        generation  INTEGER NOT NULL,
        reason      TEXT NOT NULL DEFAULT '',
        created     REAL NOT NULL,
        split_at    REAL
    );
    """,
    # 2 -> 3: remote admin tokens. Only the SHA-256 of a secret is kept (the
    # secrets are random, 32 bytes: no salt or slow hash needed); `volumes`
    # is the glob a split token is limited to.
    """
    CREATE TABLE tokens (
        name          TEXT PRIMARY KEY,
        scope         TEXT NOT NULL,
        volumes       TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created       REAL NOT NULL,
        last_used     REAL
    );
    """,
    # 3 -> 4: split generations, for incremental backups (DESIGN.md "Backup"
    # 5). `split_gen` counts the pair's splits; `delta_base` is the split_gen
    # that the delta bitmap covers the changes since (NULL: the delta is "all"
    # or unknown). A split does not touch the delta, so after split N the
    # delta covers split delta_base to split N. A pair from before v4 that
    # was split counts that split as its first, and has no delta base.
    """
    ALTER TABLE pairs ADD COLUMN split_gen INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pairs ADD COLUMN delta_base INTEGER;
    UPDATE pairs SET split_gen = 1 WHERE split_at IS NOT NULL;
    """,
    # 4 -> 5: pairs whose secondary is no volume but a read-only source (an
    # instant restore from a backup snapshot, controller/instant.py). `source`
    # is JSON naming it (store, snapshot, key file), NULL for a pair of two
    # volumes; such a pair is named by its primary, which both volume
    # columns then hold.
    """
    ALTER TABLE pairs ADD COLUMN source TEXT;
    """,
    # 5 -> 6: backup snapshots served from their store (controller/served.py),
    # served again at every start: the export name, where the store is
    # (a directory or s3://), the snapshot, the key file (NULL for a plain
    # store) and the chunk cache's bound. And the instant restores that
    # ended (controller/instant.py), for backup.restore_status after a
    # restart: `outcome` restored or deleted, `info` the status (JSON) at
    # the end; a volume's row goes with the volume.
    """
    CREATE TABLE served (
        name        TEXT PRIMARY KEY,
        store       TEXT NOT NULL,
        snapshot    TEXT NOT NULL,
        key_file    TEXT,
        cache_size  INTEGER NOT NULL,
        created     REAL NOT NULL
    );
    CREATE TABLE restores (
        volume      TEXT PRIMARY KEY REFERENCES volumes(name),
        outcome     TEXT NOT NULL,
        info        TEXT NOT NULL,
        finished    REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class VolumeRecord(NamedTuple):
    name: str
    size: int
    region_size: int
    read_only: bool
    created: float


class SchemaTooNew(SplitdError):
    """The database was written by a newer splitd; we must not touch it."""

    code = ErrorCode.SCHEMA_TOO_NEW


class MetadataStore:
    def __init__(self, path: str):
        self.path = path
        # Autocommit mode (isolation_level=None): transactions are ours, explicit.
        # The daemon uses the store from its event loop thread, but a helper
        # thread may read it too; the lock keeps one statement group at a time.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        # Commits counted; every commit up to `_synced` is durable.
        self._commits = 0
        self._synced = 0
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One state change: everything inside commits together or not at all.
        `durable=False`: the commit is not synced (see the module's docstring);
        `last_commit` numbers it for `synced()`."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (disk full, say) can leave the transaction
                    # open; roll it back so the next one can BEGIN.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
            self._commits += 1
            if durable:
                if self._synced < self._commits - 1:
                    # An earlier commit is not synced, and this one may not
                    # have synced the WAL: SQLite writes (and syncs) nothing
                    # for a transaction that changes no page (an UPDATE to
                    # the same values). Sync it here, or it would pass as
                    # durable on the strength of a sync that never happened.
                    # If it fails, they stay unsynced: the next durability
                    # round tries again, and sends their pairs to error.
                    try:
                        self._fdatasync_wal()
                    except OSError:
                        return
                # A synced WAL holds every earlier commit too.
                self._synced = self._commits

    @property
    def last_commit(self) -> int:
        return self._commits

    def synced(self, seq: int) -> bool:
        """Is commit number `seq` (a `last_commit`) durable?"""
        return seq <= self._synced

    def wal_sync_begin(self) -> tuple[int, int] | None:
        """For a durability round: (the commit number a sync now covers, a
        new fd of the WAL to fdatasync on any thread), or None when every
        commit is durable. Pass the number to wal_sync_end once synced."""
        with self._lock:
            if self._synced >= self._commits:
                return None
            return self._commits, os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)

    def wal_sync_end(self, seq: int) -> None:
        with self._lock:
            self._synced = max(self._synced, seq)

    def sync_wal(self) -> None:
        """Make every commit so far durable, on this thread."""
        with self._lock:
            if self._synced >= self._commits:
                return
            self._fdatasync_wal()
            self._synced = self._commits

    def _fdatasync_wal(self) -> None:
        fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{self.path} has schema version {version}; this splitd "
                               f"knows up to {SCHEMA_VERSION} (was it written by a newer one?)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                # executescript() would COMMIT on its own; run statement by statement.
                for statement in _statements(MIGRATIONS[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target:d}")

    # -- volumes ------------------------------------------------------------

    def add_volume(self, name: str, size: int, region_size: int, read_only: bool,
                   created: float | None = None, pair: PairRecord | None = None) -> VolumeRecord:
        """The volume's row; with `pair`, that pair's row in the same
        transaction (a volume born in a pair: an instant restore)."""
        record = VolumeRecord(name, size, region_size, bool(read_only),
                              time.time() if created is None else created)
        with self.transaction() as db:
            db.execute("INSERT INTO volumes (name, size, region_size, read_only, created) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (record.name, record.size, record.region_size, int(record.read_only),
                        record.created))
            if pair is not None:
                _insert_pair(db, pair)
        return record

    def get_volume(self, name: str) -> VolumeRecord | None:
        with self._lock:
            row = self._db.execute("SELECT name, size, region_size, read_only, created "
                                   "FROM volumes WHERE name = ?", (name,)).fetchone()
        return _volume(row) if row else None

    def list_volumes(self) -> list[VolumeRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, size, region_size, read_only, created "
                                    "FROM volumes ORDER BY name").fetchall()
        return [_volume(r) for r in rows]

    def set_volume_size(self, name: str, size: int) -> None:
        with self.transaction() as db:
            cur = db.execute("UPDATE volumes SET size = ? WHERE name = ?", (size, name))
            if cur.rowcount != 1:
                raise KeyError(name)

    def remove_volume(self, name: str) -> bool:
        """Delete the row (and the record of its instant restore); False if
        there was none."""
        with self.transaction() as db:
            db.execute("DELETE FROM restores WHERE volume = ?", (name,))
            return db.execute("DELETE FROM volumes WHERE name = ?", (name,)).rowcount == 1


    # -- pairs --------------------------------------------------------------

    def add_pair(self, rec: PairRecord) -> None:
        with self.transaction() as db:
            _insert_pair(db, rec)

    def list_pairs(self) -> list[PairRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_PAIR_COLUMNS} FROM pairs "
                                    "ORDER BY secondary").fetchall()
        return [PairRecord(*r) for r in rows]

    def update_pairs(self, changes: list[tuple[str, dict]], durable: bool = True) -> int:
        """Change several pairs in one transaction: [(secondary, {column: value})].
        Returns the commit's number (see `transaction`, `synced`)."""
        with self.transaction(durable) as db:
            for secondary, cols in changes:
                bad = set(cols) - set(PairRecord._fields)
                if bad:
                    raise ValueError(f"unknown pair columns {bad}")
                assigns = ", ".join(f"{c} = ?" for c in cols)
                cur = db.execute(f"UPDATE pairs SET {assigns} WHERE secondary = ?",
                                 (*cols.values(), secondary))
                if cur.rowcount != 1:
                    raise KeyError(secondary)
        return self._commits

    def remove_pair(self, secondary: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM pairs WHERE secondary = ?", (secondary,)).rowcount == 1

    # -- instant restores that ended ------------------------------------------

    def end_restore(self, volume: str, outcome: str, info: str, finished: float) -> None:
        """An instant restore's pair dissolved: its row removed and its end
        recorded, in one transaction (`info`: JSON)."""
        with self.transaction() as db:
            db.execute("DELETE FROM pairs WHERE secondary = ?", (volume,))
            db.execute("INSERT OR REPLACE INTO restores (volume, outcome, info, finished) "
                       "VALUES (?, ?, ?, ?)", (volume, outcome, info, finished))

    def get_restore_end(self, volume: str) -> tuple[str, str, float] | None:
        """(outcome, info, finished) of the instant restore of `volume` that ended."""
        with self._lock:
            row = self._db.execute("SELECT outcome, info, finished FROM restores "
                                   "WHERE volume = ?", (volume,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def forget_restore_end(self, volume: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM restores WHERE volume = ?", (volume,))

    # -- served snapshots ---------------------------------------------------

    def add_served(self, rec: ServedRecord) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO served (name, store, snapshot, key_file, cache_size, created) "
                       "VALUES (?, ?, ?, ?, ?, ?)", rec)

    def list_served(self) -> list[ServedRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, store, snapshot, key_file, cache_size, created "
                                    "FROM served ORDER BY name").fetchall()
        return [ServedRecord(*r) for r in rows]

    def remove_served(self, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM served WHERE name = ?", (name,)).rowcount == 1


    # -- tokens -------------------------------------------------------------

    def add_token(self, rec: TokenRecord) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens (name, scope, volumes, secret_sha256, created, "
                       "last_used) VALUES (?,?,?,?,?,?)", rec)

    def list_tokens(self) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, scope, volumes, secret_sha256, created, "
                                    "last_used FROM tokens ORDER BY name").fetchall()
        return [TokenRecord(*r) for r in rows]

    def set_token_last_used(self, name: str, when: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE tokens SET last_used = ? WHERE name = ?", (when, name))

    def remove_token(self, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 1


class TokenRecord(NamedTuple):
    name: str
    scope: str
    volumes: str            # glob of volume names (split scope); "*" for all
    secret_sha256: str      # hex; the secret itself is never stored
    created: float
    last_used: float | None


class ServedRecord(NamedTuple):
    name: str               # the export's name
    store: str              # absolute path of the store, or s3://BUCKET/PREFIX
    snapshot: str
    key_file: str | None
    cache_size: int
    created: float


class PairRecord(NamedTuple):
    secondary: str
    primary_vol: str
    state: str
    read_policy: str
    rate: int
    grp: str | None
    generation: int
    reason: str
    created: float
    split_at: float | None
    split_gen: int = 0              # splits the pair has had
    delta_base: int | None = None   # the split_gen the delta covers changes since
    source: str | None = None       # JSON: a read-only source instead of a secondary volume


_PAIR_COLUMNS = ", ".join(PairRecord._fields)


def _insert_pair(db: sqlite3.Connection, rec: PairRecord) -> None:
    db.execute(f"INSERT INTO pairs ({_PAIR_COLUMNS}) VALUES "
               f"({', '.join('?' * len(PairRecord._fields))})", rec)


def _volume(row) -> VolumeRecord:
    name, size, region_size, read_only, created = row
    return VolumeRecord(name, size, region_size, bool(read_only), created)


def _statements(script: str) -> list[str]:
    # Migrations are plain DDL without ';' inside literals, so a split is enough.
    return [s.strip() for s in script.split(";") if s.strip()]
