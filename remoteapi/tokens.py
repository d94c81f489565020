"""Bearer tokens: made, listed, revoked, checked. The daemon's (controller/
tokens.py) and the host agent's (agents/host/tokens.py) are both a TokenBook.

Rules kept here:
- A secret is secrets.token_urlsafe(32) (32 random bytes), handed out once by
  create() and never kept: the store holds its SHA-256 only (a random secret
  needs no salt or slow hash), so neither the database nor `token list`
  can give it back.
- A presented secret is checked against every token with hmac.compare_digest,
  so how long the check takes says nothing about how close a guess was.
- The store is the truth; the copy here (by name) spares a query per request
  and is changed only together with it.

A token has a name, a scope (one of the book's `scopes`) and a glob that limits
the one scope that takes one (a split token's volumes, a prepare token's
directories): `limit()` checks it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar, cast

from common.errors import BadInput, Conflict, NotFound
from common.names import quoted, validate_name

log = logging.getLogger(__name__)

SECRET_BYTES = 32
# Longer than any secret we make; a longer one is refused before it is hashed.
MAX_SECRET = 256
MAX_GLOB = 256


class Record(Protocol):
    """What a TokenBook needs of a stored token: a NamedTuple with these fields
    and `last_used`."""

    @property
    def name(self) -> str: ...

    @property
    def scope(self) -> str: ...

    @property
    def secret_sha256(self) -> str: ...


R = TypeVar("R", bound=Record)


class TokenStore(Protocol[R]):
    def add_token(self, rec: R) -> None: ...

    def list_tokens(self) -> list[R]: ...

    def set_token_last_used(self, name: str, when: float) -> None: ...

    def remove_token(self, name: str) -> bool: ...


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenBook(Generic[R]):
    """Subclasses give `scopes`, `limited_scope` (the scope a glob limits),
    `limit_what` ("volumes"), `cli` (the command that manages tokens, for
    messages) and `record()`."""

    scopes: Sequence[str] = ()
    limited_scope: str = ""
    limit_what = "volumes"
    cli = "splitctl token"

    def __init__(self, store: TokenStore[R]):
        self.store = store
        self._by_name = {rec.name: rec for rec in store.list_tokens()}

    def record(self, name: str, scope: str, glob: str, secret_sha256: str, created: float) -> R:
        raise NotImplementedError

    def create(self, name: object, scope: object, glob: object = None) -> tuple[R, str]:
        """A new token: its record and its secret (the only time it exists)."""
        name = validate_name(name)
        if not isinstance(scope, str) or scope not in self.scopes:
            raise BadInput(f"scope must be one of {', '.join(self.scopes)} (got {quoted(scope)})")
        checked = self.limit(glob, scope)
        if name in self._by_name:
            raise Conflict(f"token {name!r} exists already: revoke it first "
                           f"({self.cli} revoke), or choose another name")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        rec = self.record(name, scope, checked, digest(secret), time.time())
        self.store.add_token(rec)
        self._by_name[name] = rec
        log.info("token %s created: scope %s, %s %s", name, scope, self.limit_what, checked)
        return rec, secret

    def limit(self, glob: object, scope: str) -> str:
        """The glob a new token is limited by ("*": none), checked."""
        what = self.limit_what
        if glob is None:
            return "*"
        if not isinstance(glob, str) or not glob:
            raise BadInput(f"{what} must be a non-empty glob (got {quoted(glob)})")
        if len(glob) > MAX_GLOB or not glob.isprintable():
            raise BadInput(f"{what} must be a glob of at most {MAX_GLOB} printable characters")
        if scope != self.limited_scope and glob != "*":
            raise BadInput(f"{what} limits only a {self.limited_scope} token: a {scope} "
                           f"token may do what its scope allows anywhere")
        return glob

    def list(self) -> list[R]:
        return sorted(self._by_name.values(), key=lambda rec: rec.name)

    def revoke(self, name: object) -> R:
        name = validate_name(name)
        rec = self._by_name.get(name)
        if rec is None:
            raise NotFound(f"no token named {name!r} ({self.cli} list shows them)")
        self.store.remove_token(name)
        del self._by_name[name]
        log.info("token %s revoked", name)
        return rec

    def verify(self, secret: object) -> R | None:
        """The token whose secret this is, or None."""
        if not isinstance(secret, str) or not secret or len(secret) > MAX_SECRET:
            return None
        presented = digest(secret).encode()
        found = None
        for rec in self._by_name.values():
            # Every token is compared, in constant time each.
            if hmac.compare_digest(rec.secret_sha256.encode(), presented):
                found = rec
        return found

    def still_valid(self, rec: R) -> bool:
        """Whether `rec` has not been revoked (nor replaced by a new token of its name)."""
        now = self._by_name.get(rec.name)
        return now is not None and hmac.compare_digest(now.secret_sha256, rec.secret_sha256)

    def used(self, rec: R) -> None:
        """Record a use (a connection authenticated with it): `last used` in token list."""
        when = time.time()
        self.store.set_token_last_used(rec.name, when)
        if rec.name in self._by_name:
            # A NamedTuple with a last_used field, as every store's record is.
            self._by_name[rec.name] = cast(Any, self._by_name[rec.name])._replace(last_used=when)
