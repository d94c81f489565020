"""Bearer tokens of the remote admin API: made, listed, revoked, checked.

Rules kept here:
- A secret is secrets.token_urlsafe(32) (32 random bytes), handed out once by
  create() and never kept: the store holds its SHA-256 only (a random secret
  needs no salt or slow hash), so neither the database nor `token list`
  can give it back.
- A presented secret is checked against every token with hmac.compare_digest,
  so how long the check takes says nothing about how close a guess was.
- The store is the truth; the copy here (by name) spares a query per request
  and is changed only together with it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time

from common.errors import BadInput, Conflict, NotFound
from common.names import quoted, validate_name
from common.scopes import Scope
from volumes.store import MetadataStore, TokenRecord

log = logging.getLogger(__name__)

SECRET_BYTES = 32
# Longer than any secret we make; a longer one is refused before it is hashed.
MAX_SECRET = 256
MAX_GLOB = 256


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    def __init__(self, store: MetadataStore):
        self.store = store
        self._by_name = {rec.name: rec for rec in store.list_tokens()}

    def create(self, name: object, scope: object, volumes: object = None) -> tuple[TokenRecord, str]:
        """A new token: its record and its secret (the only time it exists)."""
        name = validate_name(name)
        if not isinstance(scope, str) or scope not in tuple(Scope):
            raise BadInput(f"scope must be one of {', '.join(Scope)} (got {quoted(scope)})")
        glob = _glob(volumes, scope)
        if name in self._by_name:
            raise Conflict(f"token {name!r} exists already: revoke it first "
                           "(splitctl token revoke), or choose another name")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        rec = TokenRecord(name, scope, glob, digest(secret), time.time(), None)
        self.store.add_token(rec)
        self._by_name[name] = rec
        log.info("token %s created: scope %s, volumes %s", name, scope, glob)
        return rec, secret

    def list(self) -> list[TokenRecord]:
        return sorted(self._by_name.values())

    def revoke(self, name: object) -> TokenRecord:
        name = validate_name(name)
        rec = self._by_name.get(name)
        if rec is None:
            raise NotFound(f"no token named {name!r} (splitctl token list shows them)")
        self.store.remove_token(name)
        del self._by_name[name]
        log.info("token %s revoked", name)
        return rec

    def verify(self, secret: object) -> TokenRecord | None:
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

    def still_valid(self, rec: TokenRecord) -> bool:
        """Whether `rec` has not been revoked (nor replaced by a new token of its name)."""
        now = self._by_name.get(rec.name)
        return now is not None and hmac.compare_digest(now.secret_sha256, rec.secret_sha256)

    def used(self, rec: TokenRecord) -> None:
        """Record a use (a connection authenticated with it): `last used` in token list."""
        when = time.time()
        self.store.set_token_last_used(rec.name, when)
        if rec.name in self._by_name:
            self._by_name[rec.name] = self._by_name[rec.name]._replace(last_used=when)


def describe(rec: TokenRecord) -> dict:
    """A token as the admin API shows it: never its secret, nor the secret's hash."""
    return {"name": rec.name, "scope": rec.scope, "volumes": rec.volumes,
            "created": rec.created, "last_used": rec.last_used}


def _glob(volumes: object, scope: str) -> str:
    if volumes is None:
        return "*"
    if not isinstance(volumes, str) or not volumes:
        raise BadInput(f"volumes must be a non-empty glob of volume names (got {quoted(volumes)})")
    if len(volumes) > MAX_GLOB or not volumes.isprintable():
        raise BadInput(f"volumes must be a glob of at most {MAX_GLOB} printable characters")
    if scope != Scope.SPLIT and volumes != "*":
        raise BadInput(f"volumes limits only a split token: a {scope} token "
                       + ("sees every volume" if scope == Scope.READ else "may do anything"))
    return volumes
