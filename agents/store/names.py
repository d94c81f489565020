"""Object names within a store (store.py lists them all) and snapshot ids."""
from __future__ import annotations

import re
import time
import uuid

_SNAPSHOT_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")


def chunk_name(cid: bytes) -> str:
    h = cid.hex()
    return f"chunks/{h[:2]}/{h}"


def index_name(sid: str) -> str:
    return f"indexes/{sid}"


def manifest_name(sid: str) -> str:
    return f"snapshots/{sid}"


def new_snapshot_id(now: float) -> str:
    """Ids sort by creation time: "20261202T130501Z-1a2b3c4d"."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + uuid.uuid4().hex[:8]


def valid_snapshot_id(sid: str) -> bool:
    return _SNAPSHOT_ID.fullmatch(sid) is not None
