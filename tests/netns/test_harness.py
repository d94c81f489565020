"""harness/netns.py itself: what close() takes away, even after a failure
inside the `with`, and processes that nobody tracked (started in the
background by a command run there)."""
from __future__ import annotations

import os
import time

import pytest

from harness.netns import Namespaces, unavailable


@pytest.fixture(autouse=True)
def _root():
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_close_takes_everything_even_after_a_failure():
    n = Namespaces(["a", "b"], [("a", "b")])
    with pytest.raises(RuntimeError, match="the test failed"):
        with n:
            tracked = n.popen("a", ["sleep", "600"])
            # A daemon-like grandchild in its own session, that nobody tracks.
            cp = n.run("b", ["sh", "-c", "setsid sleep 600 > /dev/null 2>&1 & echo $!"], check=True)
            stray = int(cp.stdout)
            assert {tracked.pid} <= set(n.pids("a")) and stray in n.pids("b")
            assert n.run("a", ["ip", "-br", "addr", "show", n.ifname("a", "b")],
                         check=True).stdout.split()[2] == f"{n.addr('a', 'b')}/29"
            raise RuntimeError("the test failed")
    deadline = time.monotonic() + 5
    while (alive(tracked.pid) or alive(stray)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(tracked.pid) and not alive(stray)
    assert not any(os.path.exists(n.path(x)) for x in ("a", "b"))
    assert n.close() == []      # twice is harmless


def test_names_are_unique_per_run():
    one, two = (Namespaces(["storage"], []) for _ in range(2))
    assert one.full["storage"] != two.full["storage"]
    assert len(Namespaces(["a", "b"], [("a", "b")]).ifname("a", "b")) <= 15
