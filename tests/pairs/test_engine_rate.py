"""The copy engine's rate limit must not hold what it does not govern
(DESIGN.md "Copy engine": rate limit per pair, "changeable live"; "never
starves client I/O"; "Split": the `wait` policy holds a read "until the copy
engine has copied that region" -- regions a reader waits on go first).

- A `wait` read of a pending region is answered promptly even when the pair
  has used up its rate.
- Raising a pair's rate (or lifting it) takes effect at once, whatever the
  engine was waiting for under the old rate.
"""
from __future__ import annotations

import random
import threading
import time

import pytest

from tests.pairs.helpers import MiB, log_tail, show, wait_until

nbd = pytest.importorskip("nbd")

SIZE = 64 * MiB


def setup_split(daemon, policy: str, rate: int) -> None:
    daemon.create_volume("p", SIZE)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("p"))
    rng = random.Random(1)
    for off in range(0, SIZE, 4 * MiB):
        h.pwrite(rng.randbytes(4 * MiB), off)
    h.shutdown()
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True,
                read_policy=policy, rate=rate)
    time.sleep(0.3)
    info = daemon.call("pair.split", name="s")
    assert info["pending"] > 900, info


def test_wait_read_is_not_held_by_the_rate_limit(daemon):
    setup_split(daemon, "wait", rate=256 * 1024)
    s = nbd.NBD()
    s.connect_uri(daemon.uri("s"))
    s.pread(4 * MiB, 16 * MiB)              # 64 regions the reader waits for
    done = threading.Event()
    # One more pending region, in a thread: a held read must fail the test in
    # seconds, not block it (the daemon's stop at teardown ends the read).
    def read() -> None:
        try:
            s.pread(4096, 60 * MiB)
            done.set()
        except nbd.Error:
            pass

    reader = threading.Thread(target=read, daemon=True)
    t0 = time.monotonic()
    reader.start()
    done.wait(3.0)
    held = time.monotonic() - t0
    info = show(daemon, "s")
    assert done.is_set(), (f"a 4 KiB `wait` read of one pending region is still held after "
                           f"{held:.1f} s (pending {info['pending']}, rate {info['rate']} B/s)"
                           f"{log_tail(daemon)}")


def test_raising_the_rate_takes_effect_at_once(daemon):
    setup_split(daemon, "copy-on-read", rate=1)
    time.sleep(1.5)          # the bucket fills to one byte: one region, then a long wait
    before = show(daemon, "s")
    daemon.call("pair.set", name="s", rate=0)
    wait_until(daemon, "s", "pending = 0 after lifting the rate",
               lambda i: i["pending"] == 0, timeout=5)
    assert before["pending"] > 900, before
