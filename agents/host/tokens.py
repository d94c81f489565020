"""The host agent's bearer tokens: a remoteapi.tokens.TokenBook over a small
SQLite database in the state directory (tokens.db), and what each scope may call.

    read     list, status, ping: looks, changes nothing
    prepare  read, plus prepare of directories matching the token's --dirs glob
    admin    everything

The service and `splitd-host token` open the same database: a token made or
revoked by the command counts at the service's next authentication or request
(HostTokens re-reads the table whenever another connection committed to it).
"""
from __future__ import annotations

import os
import sqlite3
import threading
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from common.errors import Forbidden
from common.plain import PlainStrEnum
from common.scopes import covers
from remoteapi.tokens import TokenBook

DB_NAME = "tokens.db"


class HostScope(PlainStrEnum):
    READ = "read"
    PREPARE = "prepare"
    ADMIN = "admin"


# Weakest first: a token's scope covers every scope up to its own.
HOST_SCOPES: tuple[HostScope, ...] = (HostScope.READ, HostScope.PREPARE, HostScope.ADMIN)

# Method -> the scope it needs. Not listed: admin (a new method is closed to
# tokens until someone decides otherwise).
METHOD_SCOPES: dict[str, HostScope] = {
    "ping": HostScope.READ,
    "list": HostScope.READ,
    "status": HostScope.READ,
    "prepare": HostScope.PREPARE,
}


class HostToken(NamedTuple):
    name: str
    scope: str
    dirs: str               # glob of directories a prepare token may prepare; "*" for all
    secret_sha256: str      # hex; the secret itself is never stored
    created: float
    last_used: float | None


class TokenDB:
    """tokens.db: one table, every change one transaction, synchronous=FULL."""

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, DB_NAME)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10)
        self._lock = threading.Lock()
        try:
            os.chmod(self.path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, "
                             "scope TEXT NOT NULL, dirs TEXT NOT NULL, "
                             "secret_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL, "
                             "last_used REAL)")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: tuple) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                count = self._db.execute(sql, params).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return count

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        with self._lock:
            return self._db.execute("PRAGMA data_version").fetchone()[0]

    def add_token(self, rec: HostToken) -> None:
        self._write("INSERT INTO tokens (name, scope, dirs, secret_sha256, created, last_used) "
                    "VALUES (?,?,?,?,?,?)", tuple(rec))

    def list_tokens(self) -> list[HostToken]:
        with self._lock:
            rows = self._db.execute("SELECT name, scope, dirs, secret_sha256, created, "
                                    "last_used FROM tokens ORDER BY name").fetchall()
        return [HostToken(*r) for r in rows]

    def set_token_last_used(self, name: str, when: float) -> None:
        self._write("UPDATE tokens SET last_used = ? WHERE name = ?", (when, name))

    def remove_token(self, name: str) -> bool:
        return self._write("DELETE FROM tokens WHERE name = ?", (name,)) == 1


class HostTokens(TokenBook[HostToken]):
    scopes = tuple(HOST_SCOPES)
    limited_scope = HostScope.PREPARE
    limit_what = "dirs"
    cli = "splitd-host token"

    def __init__(self, db: TokenDB):
        self.db = db
        self._seen = db.data_version()
        super().__init__(db)

    def record(self, name: str, scope: str, glob: str, secret_sha256: str,
               created: float) -> HostToken:
        return HostToken(name, scope, glob, secret_sha256, created, None)

    def refresh(self) -> None:
        """Re-read the table if `splitd-host token` changed it since."""
        version = self.db.data_version()
        if version != self._seen:
            self._seen = version
            self._by_name = {rec.name: rec for rec in self.db.list_tokens()}

    def verify(self, secret: object) -> HostToken | None:
        self.refresh()
        return super().verify(secret)

    def still_valid(self, rec: HostToken) -> bool:
        self.refresh()
        return super().still_valid(rec)


def describe(rec: HostToken) -> dict[str, Any]:
    """A token as `token list --json` shows it: never its secret, nor its hash."""
    return {"name": rec.name, "scope": rec.scope, "dirs": rec.dirs, "created": rec.created,
            "last_used": rec.last_used}


def required_scope(method: str) -> HostScope:
    return METHOD_SCOPES.get(method, HostScope.ADMIN)


def authorize(token: HostToken, method: str, params: dict[str, Any]) -> None:
    """Raise Forbidden unless `token` may call `method` with `params`. A
    prepare token's glob is matched against the directory as given and as
    resolved (symbolic links, ".."), and both must match: a link inside the
    allowed tree cannot lead out of it."""
    need = required_scope(method)
    if not covers(token.scope, need, HOST_SCOPES):
        raise Forbidden(f"forbidden: token {token.name!r} has scope {token.scope}; "
                        f"{method} needs scope {need}")
    if need is not HostScope.PREPARE or token.scope != HostScope.PREPARE or token.dirs == "*":
        return
    directory = params.get("directory")
    if not isinstance(directory, str):
        return      # prepare refuses it itself
    for path in {directory, os.path.realpath(directory)}:
        if not fnmatchcase(path, token.dirs):
            raise Forbidden(f"forbidden: token {token.name!r} may prepare only directories "
                            f"matching {token.dirs!r}, not {path!r}")
