"""A directory store on a disk that loses power (harness/powerloss: ext4 on
a disk whose unflushed writes are lost at a cut) while a writer commits
snapshot after snapshot, three quarters of each one's chunks new, the rest
reused; three cuts in a row.

After the cut and a remount (journal replay, e2fsck -fn clean): every
snapshot whose commit returned before the cut is there and checks clean
(its manifest, index and every chunk it names, re-hashed), and every chunk
file in the store, named by a snapshot or not, holds the content its name
says. A snapshot committed after the cut may be there or not, never broken.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from agents.store import init_dir, open_dir
from agents.store.envelope import KIND_CHUNK, open_sealed
from agents.store.names import chunk_id_of
from tests.powerloss.test_powerloss import power_disk  # noqa: F401  (the fixture)

pytestmark = pytest.mark.root

CS = 256 * 1024
CHUNKS = 32

# The writer: one snapshot after another; a line per commit once commit()
# has returned (so the snapshot is durable, by the store's promise).
WRITER = f"""
import random, sys
from agents.store import open_dir
s = open_dir(sys.argv[1])
for n in range(int(sys.argv[2]), 10 ** 6):
    rnd = random.Random(n)
    image = b"".join(rnd.randbytes({CS}) if i % 4 else random.Random(i + n // 4).randbytes({CS})
                     for i in range({CHUNKS}))
    w = s.writer(len(image))
    for off in range(0, len(image), {CS}):
        w.add(off, image[off:off + {CS}])
    print(w.commit(), flush=True)
"""


def chunk_files_match_their_names(store) -> list[str]:
    """Chunk files whose content is not what their name says."""
    bad = []
    for name in store.backend.list("chunks/"):
        cid = chunk_id_of(name)
        try:
            data = open_sealed(store.keys, KIND_CHUNK, name, store.backend.get(name), CS)
            ok = store.chunk_id(data) == cid
        except Exception as e:         # CorruptObject, or worse: both are a failure
            ok, name = False, f"{name}: {e}"
        if not ok:
            bad.append(name)
    return bad


def files(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def run_until_cut(disk, root: str, first: int, rnd: random.Random, keep: float
                  ) -> tuple[list[str], set[str]]:
    """The writer (snapshots from number `first` on) until a cut a random
    moment into a commit, after at least two were committed; it goes on
    writing into the dead disk for a moment, then kill -9. Returns the
    snapshots committed before the cut and the store's files as the
    writer saw them at the end (the page cache's view)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, root, str(first)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    lock = threading.Lock()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with lock:
                lines.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while len(lines) < 2:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the writer committed fewer than 2 in 120 s"
            time.sleep(0.005)
        # Just after a commit: the next snapshot's chunks are being written.
        n = len(lines)
        while len(lines) == n and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.05))
        with lock:
            committed = list(lines)
            disk.cut(keep=keep, seed=rnd.randrange(1 << 30))
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return committed, files(root)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_power_cuts_while_committing(power_disk, keep):  # noqa: F811  (the fixture)
    root = str(power_disk.mnt / "store")
    init_dir(root, chunk_size=CS).close()
    rnd = random.Random(int(keep * 10) + 20261202)
    before: set[str] = set()
    lost = 0
    for cut in range(3):
        committed, seen = run_until_cut(power_disk, root, 1000 * cut, rnd, keep)
        power_disk.down()
        power_disk.up()                         # journal replay; e2fsck -fn must be clean
        before |= set(committed)
        with open_dir(root) as store:
            lost += len(seen - files(root))
            have = set(store.snapshot_ids())
            assert before <= have, f"cut {cut}: committed before a cut, lost: {before - have}"
            report = store.check(read_data=True)
            assert report.ok, (cut, report.to_json())
            assert chunk_files_match_their_names(store) == [], cut
    assert lost > 0, "no cut lost a file the writer had made: the test tested nothing"
