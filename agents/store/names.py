"""Object names within a store (store.py lists them all) and snapshot ids."""
from __future__ import annotations

import re
import time
import uuid

_SNAPSHOT_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}")


def chunk_name(cid: bytes) -> str:
    h = cid.hex()
    return f"chunks/{h[:2]}/{h}"


def chunk_id_of(name: str) -> bytes | None:
    """The id a "chunks/ab/ab12..." name stands for; None for anything else
    (a foreign file: gc never deletes what it does not understand)."""
    prefix, _, h = name.rpartition("/")
    if len(h) != 64 or prefix != f"chunks/{h[:2]}":
        return None
    try:
        return bytes.fromhex(h)
    except ValueError:
        return None


def index_name(sid: str) -> str:
    return f"indexes/{sid}"


def manifest_name(sid: str) -> str:
    return f"snapshots/{sid}"


def new_snapshot_id(now: float) -> str:
    """Ids sort by creation time (to the millisecond): "20261202T130501.042Z-1a2b3c4d"."""
    ms = int(now * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{ms:03d}Z-" + uuid.uuid4().hex[:8]


def iso_time(now: float) -> str:
    """UTC, to the microsecond: "2026-12-02T13:05:01.042113Z" (manifests' times)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1e6) % 1000000:06d}Z"


def valid_snapshot_id(sid: str) -> bool:
    return _SNAPSHOT_ID.fullmatch(sid) is not None
