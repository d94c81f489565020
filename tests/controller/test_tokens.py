"""Tokens (controller/tokens.py) on a real metadata store, and the scope
table and checks of the remote admin API (controller/access.py)."""
from __future__ import annotations

import hashlib
import sqlite3
from types import SimpleNamespace

import pytest

from common.errors import BadInput, Conflict, Forbidden, NotFound
from common.scopes import Scope, covers
from controller.access import METHOD_SCOPES, authorize, required_scope
from controller.service import METHODS
from controller.tokens import Tokens, describe
from volumes.store import MetadataStore


@pytest.fixture
def store(tmp_path):
    s = MetadataStore(str(tmp_path / "splitd.db"))
    yield s
    s.close()


def test_create_verify_revoke(store):
    tokens = Tokens(store)
    rec, secret = tokens.create("backup", "split", "db*")
    assert len(secret) >= 43 and rec.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert tokens.verify(secret) == rec
    for wrong in (secret[:-1], secret + "x", "", None, 42, "x" * 10000):
        assert tokens.verify(wrong) is None
    # A second Tokens on the same store (a restarted daemon) knows it.
    assert Tokens(store).verify(secret) == rec
    assert tokens.still_valid(rec)
    tokens.revoke("backup")
    assert tokens.verify(secret) is None and not tokens.still_valid(rec)
    assert Tokens(store).list() == []
    # Made again under the same name: the old secret stays dead.
    tokens.create("backup", "split", "db*")
    assert tokens.verify(secret) is None and not tokens.still_valid(rec)


def test_secret_not_kept(store, tmp_path):
    tokens = Tokens(store)
    rec, secret = tokens.create("ops", "admin")
    assert secret not in repr(tokens.list()) and "secret" not in str(describe(rec))
    with sqlite3.connect(tmp_path / "splitd.db") as db:
        assert secret not in "\n".join(db.iterdump())


def test_used_records_last_used(store):
    tokens = Tokens(store)
    rec, _ = tokens.create("ops", "admin")
    assert rec.last_used is None
    tokens.used(rec)
    assert tokens.list()[0].last_used is not None
    assert Tokens(store).list()[0].last_used is not None


@pytest.mark.parametrize("name, scope, volumes, error", [
    ("bad name!", "read", None, BadInput),
    ("t", "root", None, BadInput),
    ("t", ["read"], None, BadInput),
    ("t", "read", "db*", BadInput),         # a glob only for split tokens
    ("t", "admin", "db*", BadInput),
    ("t", "split", "", BadInput),
    ("t", "split", 5, BadInput),
    ("t", "split", "a\nb", BadInput),
])
def test_create_refuses(store, name, scope, volumes, error):
    with pytest.raises(error):
        Tokens(store).create(name, scope, volumes)


def test_create_twice_and_revoke_unknown(store):
    tokens = Tokens(store)
    tokens.create("t", "read")
    with pytest.raises(Conflict):
        tokens.create("t", "admin")
    with pytest.raises(NotFound):
        tokens.revoke("nope")


# -- scopes --------------------------------------------------------------------------------------

def test_scope_table():
    # Every method a read or split token may call exists (locate arrives with ports).
    assert set(METHOD_SCOPES) - set(METHODS) <= {"locate"}
    assert required_scope("volume.delete") == Scope.ADMIN
    assert required_scope("token.create") == Scope.ADMIN
    assert required_scope("no.such.method") == Scope.ADMIN
    assert ({m for m, s in METHOD_SCOPES.items() if s == Scope.SPLIT}
            == {"pair.split", "group.split", "pair.resync"})
    assert covers("admin", "split") and covers("split", "read") and not covers("read", "split")


def _pairs(*specs):
    """A stand-in for PairManager: pairs by name, with primary, secondary, group, state."""
    def pair(name, primary, group=None, state="pair"):
        return SimpleNamespace(name=name, primary=SimpleNamespace(name=primary),
                               secondary=SimpleNamespace(name=name), group=group, state=state)
    return SimpleNamespace(pairs={s[0]: pair(*s) for s in specs})


def _token(scope, volumes="*"):
    return SimpleNamespace(name="t", scope=scope, volumes=volumes)


def test_authorize():
    pairs = _pairs(("db-snap", "db", "g"), ("web-snap", "web", "g"), ("db2-snap", "db2", "h", "split"),
                   ("db3-snap", "db3", None, "error"))
    authorize(_token("read"), "pair.list", {}, pairs)
    with pytest.raises(Forbidden, match="needs scope split"):
        authorize(_token("read"), "pair.split", {"name": "db-snap"}, pairs)
    # A split token resyncs a split pair of its volumes, nothing else.
    authorize(_token("split"), "pair.resync", {"name": "db2-snap"}, pairs)
    with pytest.raises(Forbidden, match="may resync only a pair in state split"):
        authorize(_token("split"), "pair.resync", {"name": "db-snap"}, pairs)
    with pytest.raises(Forbidden, match="full resync, which needs scope admin"):
        authorize(_token("split"), "pair.resync", {"name": "db3-snap"}, pairs)
    with pytest.raises(Forbidden, match="needs scope admin"):
        authorize(_token("split"), "pair.restore", {"name": "db2-snap"}, pairs)
    split = _token("split", "db*")
    authorize(split, "pair.split", {"name": "db-snap"}, pairs)
    authorize(split, "group.split", {"name": "h"}, pairs)
    with pytest.raises(Forbidden, match="pair 'web-snap' has volume 'web'"):
        authorize(split, "pair.split", {"name": "web-snap"}, pairs)
    with pytest.raises(Forbidden, match="pair 'web-snap'"):
        authorize(split, "group.split", {"name": "g"}, pairs)
    # Names that are no pair's, or no name at all: the method refuses them itself.
    for params in ({"name": "nope"}, {"name": 5}, {}):
        authorize(split, "pair.split", params, pairs)
    authorize(_token("admin"), "pair.split", {"name": "web-snap"}, pairs)
