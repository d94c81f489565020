"""volumes/store.py: a commit made with durable=False (a split) counts as
synced only once the WAL really was synced after it. SQLite syncs in C, so
the test watches the real system calls with strace."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

_SCRIPT = textwrap.dedent("""
    import os, sys
    from volumes.store import MetadataStore
    s = MetadataStore(sys.argv[1])
    s.add_volume("v", 4096, 4096, False)
    with s.transaction(durable=False) as db:         # a split's commit: not synced
        db.execute("UPDATE volumes SET size = 8192 WHERE name = 'v'")
    seq = s.last_commit
    os.write(2, b"MARK-NOSYNC-COMMITTED\\n")
    s.set_volume_size("v", 8192)                      # durable, but changes nothing
    os.write(2, b"MARK-SYNCED=%d\\n" % s.synced(seq))
""")


def test_a_durable_commit_that_changes_nothing_still_syncs_an_unsynced_commit(tmp_path):
    """A durable commit that changes no page writes nothing to the WAL and
    SQLite then syncs nothing: it must not mark an earlier unsynced commit
    (a split) as durable unless the WAL is synced after it. Otherwise a P
    write after the split runs with the split still in the page cache, and a
    power cut takes the pair back to `pair` with that write on P alone."""
    db = tmp_path / "meta.db"
    trace = tmp_path / "trace"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                    "trace=openat,fsync,fdatasync,pwrite64,write",
                    sys.executable, "-c", _SCRIPT, str(db)], check=True, env=env)
    text = trace.read_text()
    after = text.split("MARK-NOSYNC-COMMITTED", 1)[1]
    synced = re.search(r"MARK-SYNCED=(\d)", after)
    assert synced, text[-2000:]
    if synced.group(1) == "0":
        return      # not claimed durable: fine
    wal_fds = set(re.findall(r'openat\([^"]*"[^"]*-wal", [^)]*\) = (\d+)', text))
    syncs = re.findall(r"f(?:data)?sync\((\d+)\)", after.split("MARK-SYNCED", 1)[0])
    assert wal_fds & set(syncs), \
        "an unsynced commit was reported durable although its WAL was never synced after it"
