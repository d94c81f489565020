"""The catalog: a local SQLite cache of the store's manifests, so `list` does
not open every manifest each time. It is only a cache: every row is a copy of
a manifest in the store, `refresh()` brings it in step with the store (adds
new snapshots, drops forgotten ones) and `rebuild()` throws it away and reads
every manifest again. Deleting the file loses nothing.
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    manifest   TEXT NOT NULL
);
"""


class Catalog:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    def refresh(self, present: Iterable[str], load: Callable[[str], dict[str, Any] | None]) -> None:
        """Make the rows match the snapshot ids `present` in the store; `load`
        gives a new one's manifest (None: unreadable, left out)."""
        present = set(present)
        have = self.ids()
        self._db.execute("BEGIN")
        try:
            for sid in have - present:
                self._db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
            for sid in sorted(present - have):
                manifest = load(sid)
                if manifest is not None:
                    self._db.execute("INSERT INTO snapshots VALUES (?, ?, ?)",
                                     (sid, manifest["created_at"], json.dumps(manifest)))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def clear(self) -> None:
        self._db.execute("DELETE FROM snapshots")

    def manifests(self) -> list[dict[str, Any]]:
        """Every cached manifest, oldest first."""
        rows = self._db.execute("SELECT manifest FROM snapshots ORDER BY created_at, id")
        return [json.loads(r[0]) for r in rows]
