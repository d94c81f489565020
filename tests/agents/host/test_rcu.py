"""RCU grace periods expedited for the FIFREEZE call (agents/host/rcu.py), on
a real ext4 over splitd: the freeze gets shorter, the host-wide knob
(/sys/kernel/rcu_expedited) is set only if it was 0 and put back as soon as
FIFREEZE returns, and what a dead agent left set is put back by its
watchdog, the next agent or thaw-all.

The knob is host-wide: every test here leaves it at 0, as it found it (the
`knob` fixture skips where it is not 0 or cannot be written).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from agents.host.freeze import frozen
from agents.host.rcu import BOOT_ID, KNOB, MARKER, RCU_NORMAL, read_knob
from agents.host.watchdog import Watchdog
from tests.agents.host.conftest import writable

pytestmark = pytest.mark.root


def _set(value: str) -> None:
    with open(KNOB, "w") as f:
        f.write(value)


@pytest.fixture
def knob():
    if read_knob() != "0" or read_knob(RCU_NORMAL) == "1":
        pytest.skip(f"{KNOB} is {read_knob()!r} and {RCU_NORMAL} {read_knob(RCU_NORMAL)!r}: "
                    "these tests need normal grace periods to start from")
    if not os.access(KNOB, os.W_OK):
        pytest.skip(f"{KNOB} cannot be written here")
    yield
    left = read_knob()
    if left != "0":
        _set("0")


@pytest.fixture
def watchdog(host):
    w = Watchdog(host.state_dir)
    w.start()
    yield w
    w.stop()


def _marker(host, pid: int, boot_id: str | None = None) -> None:
    host.state_dir.mkdir(parents=True, exist_ok=True)
    (host.state_dir / MARKER).write_text(json.dumps(
        {"pid": pid, "boot_id": boot_id or open(BOOT_ID).read().strip()}))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_the_freeze_is_expedited_and_the_knob_put_back_at_once(host, paired, watchdog, knob):
    """Inside the window (FIFREEZE has returned, the split would run now)
    the knob is back to 0 and the marker gone; the filesystem is frozen."""
    with frozen(str(paired), watchdog, 5.0, expedite=host.state_dir) as window:
        assert read_knob() == "0"
        assert not (host.state_dir / MARKER).exists()
        assert not writable(paired, timeout=0.3)
    assert window.expedited and window.thawed
    assert writable(paired)


def test_expedited_freezes_are_shorter(host, paired, watchdog, knob):
    """FIFREEZE waits for three grace periods (rcu_sync_enter of each freeze
    level); expedited, they take microseconds. Freezes 0.3 s apart: one
    right after a thaw would find the previous grace period still counted
    (rcu_sync's GP_EXIT state) and skip the waits either way. The fastest
    of five each, interleaved: the shared machine's load spikes fall on
    both."""
    normal, fast = [], []
    for _ in range(5):
        for expedite, into in ((None, normal), (host.state_dir, fast)):
            time.sleep(0.3)
            with frozen(str(paired), watchdog, 5.0, expedite=expedite) as window:
                pass
            assert window.expedited == (expedite is not None)
            into.append(window.freeze_ms)
    print(f"FIFREEZE ms, normal: {sorted(normal)}; expedited: {sorted(fast)}")
    assert min(fast) < min(normal) / 2, (fast, normal)
    assert read_knob() == "0"


def test_a_knob_someone_else_set_is_left_alone(host, paired, watchdog, knob):
    _set("1")
    with frozen(str(paired), watchdog, 5.0, expedite=host.state_dir) as window:
        pass
    assert window.expedited
    assert read_knob() == "1" and not (host.state_dir / MARKER).exists()


def test_prepare_says_whether_it_expedited_and_no_expedite(host, daemon, paired, knob):
    _, answer, _ = host.json("prepare", paired, "--port", "unix")
    assert answer["expedited"] is True and read_knob() == "0", answer
    _, answer, _ = host.json("prepare", paired, "--port", "unix", "--resync", "--no-expedite")
    assert answer["expedited"] is False and read_knob() == "0", answer
    assert writable(paired)


def test_the_watchdog_puts_back_the_knob_of_an_agent_that_went_away(host, watchdog, knob):
    """The agent (this process, the watchdog's parent) set the knob and went
    away before it put it back (its socket closes: exit, crash, kill -9)."""
    _marker(host, os.getpid())
    _set("1")
    watchdog.stop()
    assert read_knob() == "0" and not (host.state_dir / MARKER).exists()


def test_thaw_all_puts_back_only_a_dead_agents_knob(host, knob):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _marker(host, sleeper.pid)      # a live agent: it puts it back itself
        _set("1")
        _, report, _ = host.json("thaw-all")
        assert report == {"thawed": []} and read_knob() == "1"
        assert (host.state_dir / MARKER).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    _, report, _ = host.json("thaw-all")
    assert report["rcu"] == (f"{KNOB} put back to 0 (agent pid {sleeper.pid} had set it and "
                             "is gone)"), report
    assert read_knob() == "0" and not (host.state_dir / MARKER).exists()

    # A marker of another boot: the knob it set died with that boot; one
    # at 1 now is someone else's.
    _marker(host, _dead_pid(), boot_id="00000000-0000-0000-0000-000000000000")
    _set("1")
    _, report, _ = host.json("thaw-all")
    assert "from another boot, removed" in report["rcu"] and read_knob() == "1", report
    assert not (host.state_dir / MARKER).exists()


def test_the_next_agent_puts_back_a_dead_agents_knob(host, daemon, paired, knob):
    dead = _dead_pid()
    _marker(host, dead)
    _set("1")
    _, answer, stderr = host.json("prepare", paired, "--port", "unix")
    assert f"{KNOB} put back to 0 (agent pid {dead} had set it and is gone)" in stderr, stderr
    assert answer["expedited"] is True and read_knob() == "0", answer
    assert not (host.state_dir / MARKER).exists()
