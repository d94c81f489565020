"""Bearer tokens of the remote admin API: a remoteapi.tokens.TokenBook over the
metadata store, whose glob limits the volumes a split token may split
(controller/access.py). The rules (random secrets shown once, SHA-256 stored,
constant-time checks) are the book's.
"""
from __future__ import annotations

from common.scopes import SCOPES, Scope
from remoteapi.tokens import MAX_GLOB, MAX_SECRET, SECRET_BYTES, TokenBook, digest
from volumes.store import MetadataStore, TokenRecord

__all__ = ["MAX_GLOB", "MAX_SECRET", "SECRET_BYTES", "Tokens", "describe", "digest"]


class Tokens(TokenBook[TokenRecord]):
    scopes = tuple(SCOPES)
    limited_scope = Scope.SPLIT
    limit_what = "volumes"
    cli = "splitctl token"

    def __init__(self, store: MetadataStore):
        super().__init__(store)

    def record(self, name: str, scope: str, glob: str, secret_sha256: str,
               created: float) -> TokenRecord:
        return TokenRecord(name, scope, glob, secret_sha256, created, None)


def describe(rec: TokenRecord) -> dict:
    """A token as the admin API shows it: never its secret, nor the secret's hash."""
    return {"name": rec.name, "scope": rec.scope, "volumes": rec.volumes,
            "created": rec.created, "last_used": rec.last_used}
