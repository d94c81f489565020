"""splitd-host prepare, end to end against the real daemon: ext4 on the
primary (nbdfuse + loop, through splitd-host attach), a writer writing and
fsyncing files, then freeze, split, thaw; the secondary read back through
the URI prepare answered must hold every file completed before the freeze,
and pass fsck. And each way it can fail, each leaving the filesystem
writable: every test ends asserting writes to it succeed.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agents.host.prepare import PrepareError, prepare
from agents.host.state import HostState
from tests.agents.host.conftest import (
    hook_script,
    journal,
    wait_frozen,
    wait_writable,
    writable,
)
from tests.pairs.helpers import wait_mirrored

pytestmark = pytest.mark.root


class Writer(threading.Thread):
    """Writes files of 4-64 KiB and fsyncs each; `done` holds (name, sha256,
    wall-clock time the fsync returned)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder = folder
        folder.mkdir()
        self.done: list[tuple[str, str, float]] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        try:
            while not self.halt.is_set():
                data = os.urandom(4096 * (1 + i % 16))
                name = f"f{i:06d}"
                fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.done.append((name, hashlib.sha256(data).hexdigest(), time.time()))
                i += 1
        except BaseException as e:
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "the writer is stuck (a frozen filesystem?)"
        assert self.error is None, f"the writer failed: {self.error!r}"


def test_prepare_end_to_end_with_a_writer(host, daemon, paired, tmp_path):
    mnt = paired
    writer = Writer(mnt / "w")
    writer.start()
    try:
        while len(writer.done) < 50:
            time.sleep(0.01)
        rc, answer, stderr = host.json("prepare", mnt / "w", "--port", "unix")
        count_after = len(writer.done)
        time.sleep(0.2)
        assert len(writer.done) > count_after, "the writer made no progress after the thaw"
    finally:
        writer.stop()
    assert answer["pair"] == "s" and answer["volume"] == "p" and answer["group"] is None, answer
    assert answer["uri"] == daemon.uri("s") and answer["port"] == "unix", answer
    assert answer["mountpoint"] == str(mnt) and answer["directory"] == str(mnt / "w")
    assert answer["state"] == "split" and answer["generation"] is not None, answer
    info = daemon.call("pair.show", name="s")
    assert answer["split_gen"] == info.get("split_gen"), (answer, info)
    assert 0 <= answer["freeze_ms"] <= answer["window_ms"] <= answer["prepare_ms"], answer
    assert answer["warnings"] == [] and answer["thawed_at_start"] == [], answer
    print(f"freeze {answer['freeze_ms']} ms, window {answer['window_ms']} ms, "
          f"prepare {answer['prepare_ms']} ms")
    before = [(n, h) for n, h, t in writer.done if t < answer["frozen_at"]]
    assert len(before) >= 50

    # The secondary through the URI prepare gave: clean, and every file whose
    # fsync returned before the freeze is there, whole.
    _, sec, _ = host.json("attach", "s", "--daemon", daemon.admin_socket, "--nbd",
                          answer["uri"], "--read-only")
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", sec["device"]], capture_output=True,
                          text=True, timeout=120)
    assert fsck.returncode == 0, f"fsck -n of the secondary: {fsck.stdout}{fsck.stderr}"
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-o", "ro,noload", sec["device"], ro], check=True, timeout=60)
    try:
        for name, digest in before:
            got = hashlib.sha256((ro / "w" / name).read_bytes()).hexdigest()
            assert got == digest, f"{name}, completed before the freeze, differs on the secondary"
    finally:
        subprocess.run(["umount", ro], check=True, timeout=60)
    host.run("detach", sec["device"])
    assert writable(mnt)


def test_prepare_through_a_bind_mount(host, daemon, paired, tmp_path):
    (paired / "sub").mkdir()
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", paired / "sub", bind], check=True, timeout=30)
    try:
        _, answer, _ = host.json("prepare", bind, "--port", "unix")
        assert answer["mountpoint"] == str(bind) and answer["pair"] == "s", answer
        assert writable(bind)
    finally:
        subprocess.run(["umount", bind], check=True, timeout=30)
    assert writable(paired)


def test_prepare_again_with_resync_keeps_the_delta_chain(host, daemon, paired):
    """The nightly case: the previous prepare left the pair split. Without
    --resync: refused, naming the option, nothing frozen. With it: resynced
    before the freeze, split again, the next split generation, its delta
    based on the previous split (an incremental of it)."""
    _, first, _ = host.json("prepare", paired, "--port", "unix")
    (paired / "more").write_bytes(os.urandom(1 << 20))
    rc, err, _ = host.json("prepare", paired, "--port", "unix", check=False)
    assert rc == 1 and err["error"]["code"] == "pair-state", err
    assert "is in state split" in err["error"]["message"], err
    assert "add --resync (splitctl backup prepare --resync" in err["error"]["message"], err
    assert not journal(host)
    _, second, _ = host.json("prepare", paired, "--port", "unix", "--resync")
    assert second["resynced"] == ["s"] and second["state"] == "split", second
    assert second["split_gen"] == first["split_gen"] + 1, (first, second)
    assert second["delta_base"] == first["split_gen"], (first, second)
    _, third, _ = host.json("prepare", paired, "--port", "unix", "--resync")
    assert third["split_gen"] == second["split_gen"] + 1, third
    assert third["delta_base"] == second["split_gen"], third
    assert writable(paired)


def test_a_pair_in_a_group_splits_the_group(host, daemon, tmp_path):
    daemon.create_volume("p", "64M")
    daemon.create_volume("q", "64M")
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True, group="g")
    daemon.call("pair.create", primary="q", secondary="t", create_secondary=True, group="g")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _, att, _ = host.json("attach", "p", "--daemon", daemon.admin_socket, "--port", "unix")
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    subprocess.run(["mount", att["device"], mnt], check=True, timeout=60)
    try:
        _, answer, _ = host.json("prepare", mnt, "--port", "unix")
        assert answer["group"] == "g" and answer["pair"] == "s", answer
        assert daemon.call("pair.show", name="t")["state"] == "split"
        # Again with --resync: every member resynced first, the group split.
        _, again, _ = host.json("prepare", mnt, "--port", "unix", "--resync")
        assert sorted(again["resynced"]) == ["s", "t"], again
        assert again["split_gen"] == answer["split_gen"] + 1, again
        t = daemon.call("pair.show", name="t")
        assert t["state"] == "split" and t["delta_base"] == answer["split_gen"], t
        assert writable(mnt)
    finally:
        subprocess.run(["umount", mnt], check=True, timeout=60)


def test_a_directory_not_on_a_splitd_volume_is_refused(host, daemon, paired, tmp_path):
    rc, err, _ = host.json("prepare", tmp_path, "--port", "unix", check=False)
    assert rc == 1 and err["error"]["code"] == "not-splitd", err
    message = err["error"]["message"]
    assert message.startswith(f"{tmp_path} is on ") and "not on a splitd volume" in message
    assert "mounted at" in message and f"volume p of {daemon.admin_socket} at {paired}" in message
    rc, err, _ = host.json("prepare", tmp_path / "nope", "--port", "unix", check=False)
    assert rc == 1 and err["error"]["code"] == "not-found", err
    assert writable(paired)


def test_a_filesystem_that_refuses_to_freeze(host, daemon, paired):
    """Frozen by someone else (fsfreeze): FIFREEZE says EBUSY. Refused, and
    that freeze is not ours to thaw: it is still frozen afterwards."""
    subprocess.run(["fsfreeze", "-f", paired], check=True, timeout=30)
    try:
        rc, err, _ = host.json("prepare", paired, "--port", "unix", check=False)
        assert rc == 1 and err["error"]["code"] == "freeze-failed", err
        assert "already frozen" in err["error"]["message"], err
        assert not writable(paired, timeout=0.5), "prepare thawed a freeze it did not make"
    finally:
        subprocess.run(["fsfreeze", "-u", paired], check=True, timeout=30)
    wait_writable(paired, 5)
    assert daemon.call("pair.show", name="s")["state"] == "pair"


def test_a_pre_freeze_hook_that_hangs_is_killed(host, daemon, paired, tmp_path):
    marker = tmp_path / "hook-child.pid"
    hook = hook_script(tmp_path, f'[ "$1" = freeze ] || exit 0\necho hook on "$2" >&2\n'
                                 f'sleep 60 & echo $! > {marker}\nwait')
    started = time.monotonic()
    rc, err, _ = host.json("prepare", paired, "--port", "unix", "--hook", hook,
                           "--hook-timeout", "1", check=False)
    took = time.monotonic() - started
    assert rc == 1 and err["error"]["code"] == "hook-failed", err
    assert "did not finish in 1 s" in err["error"]["message"], err
    assert f"hook on {paired}" in err["error"]["message"], err
    assert took < 10, took
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "the hook's child outlived the kill"
    assert daemon.call("pair.show", name="s")["state"] == "pair"
    assert writable(paired)


def test_hooks_run_around_the_freeze(host, daemon, paired, tmp_path):
    log = tmp_path / "hook.log"
    hook = hook_script(tmp_path, f'echo "$1 $2" >> {log}')
    _, answer, _ = host.json("prepare", paired, "--port", "unix", "--hook", hook)
    assert log.read_text() == f"freeze {paired}\nthaw {paired}\n"
    # Split already: refused before the hook and the freeze.
    rc, err, _ = host.json("prepare", paired, "--port", "unix", "--hook", hook, check=False)
    assert rc == 1 and err["error"]["code"] == "pair-state", err
    assert "splitctl pair resync s" in err["error"]["message"], err
    assert log.read_text() == f"freeze {paired}\nthaw {paired}\n"
    daemon.call("pair.resync", name="s")
    wait_mirrored(daemon, "s")
    failing = hook_script(tmp_path, '[ "$1" = thaw ] && { echo cannot resume >&2; exit 3; }\n'
                                    'exit 0')
    _, answer, _ = host.json("prepare", paired, "--port", "unix", "--hook", failing)
    assert answer["warnings"] and "exited 3: cannot resume" in answer["warnings"][0], answer
    assert writable(paired)


def test_kill9_of_the_agent_while_frozen(host, stalling):
    """The split hangs inside the window; the agent is killed with -9. The
    watchdog sees its agent go and thaws at once, well within its timeout;
    nothing is left in the journal."""
    mnt, proxy = stalling
    proxy.stall.set()
    agent = host.popen("prepare", mnt, "--port", "unix", "--timeout", "8")
    entry = wait_frozen(host, agent, mnt)
    assert entry["agent_pid"] == agent.pid and entry["mountpoint"] == str(mnt), entry
    assert proxy.held.wait(10)
    os.killpg(agent.pid, signal.SIGKILL)    # its whole process group: not the watchdog's
    agent.wait(10)
    thawed_in = wait_writable(mnt, 8)
    print(f"thawed {thawed_in:.2f} s after kill -9 of the agent")
    assert thawed_in < 8
    assert not journal(host)
    _, report, _ = host.json("thaw-all")
    assert report == {"thawed": []}
    assert writable(mnt)


def test_a_hung_agent_is_thawed_at_the_deadline(host, stalling):
    """The agent is stopped (SIGSTOP) inside the window: its socket stays
    open, so the watchdog waits for the deadline, then thaws. The agent,
    continued, reports that the watchdog thawed first."""
    mnt, proxy = stalling
    proxy.stall.set()
    agent = host.popen("prepare", mnt, "--port", "unix", "--timeout", "2", "--json")
    entry = wait_frozen(host, agent, mnt)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        since = time.time() - entry["frozen_at"]
        thawed_in = since + wait_writable(mnt, 6)
        assert 1.5 < thawed_in < 4, thawed_in
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    out, _ = agent.communicate(timeout=30)
    error = json.loads(out)["error"]
    assert agent.returncode == 1 and error["code"] == "watchdog-thawed", out
    assert "the watchdog thawed" in error["message"] and "failed after the freeze" in error["message"]
    assert not journal(host)
    assert writable(mnt)


def test_a_split_delivered_after_the_agent_gave_up_is_refused(host, stalling, daemon):
    """The daemon stops answering inside the window; the agent gives up on
    the split at its deadline, thaws and reports split-failed. The request
    it gave up on then reaches the daemon all the same (the proxy passes it
    on late, as a healed partition would): the daemon refuses it, its
    deadline (not_after) having passed, and the pair stays unsplit."""
    mnt, proxy = stalling
    proxy.stall.set()
    agent = host.popen("prepare", mnt, "--port", "unix", "--timeout", "2", "--json")
    out, _ = agent.communicate(timeout=30)
    error = json.loads(out)["error"]
    assert agent.returncode == 1 and error["code"] == "split-failed", out
    assert "pair.split s failed after the freeze (thawed)" in error["message"], out
    assert writable(mnt) and not journal(host)
    assert proxy.held.is_set()
    proxy.deliver.set()
    assert proxy.delivered.wait(10)
    time.sleep(1)       # the daemon reads it and answers (to nobody)
    assert daemon.call("pair.show", name="s")["state"] == "pair"
    assert "deadline passed" in daemon.log(), "the daemon never saw the late split"


def _freeze_and_kill_both(host, mnt, proxy) -> int:
    """An agent frozen inside a held split; it and its watchdog killed -9
    (as systemd stops the unit's cgroup). Returns the agent's pid."""
    proxy.stall.set()
    agent = host.popen("prepare", mnt, "--port", "unix", "--timeout", "8")
    entry = wait_frozen(host, agent, mnt)
    assert proxy.held.wait(10)
    os.kill(entry["watchdog_pid"], signal.SIGKILL)
    agent.kill()
    agent.wait(10)
    time.sleep(0.3)
    assert not writable(mnt, timeout=0.5), "thawed without an agent or a watchdog?"
    proxy.stall.clear()
    return agent.pid


def test_kill9_of_agent_and_watchdog_a_new_agent_thaws(host, stalling):
    """The filesystem stays frozen until the next agent, which thaws it from
    the journal at start and says so."""
    mnt, proxy = stalling
    agent_pid = _freeze_and_kill_both(host, mnt, proxy)
    _, answer, stderr = host.json("prepare", mnt, "--port", "unix")
    assert f"{mnt} was left frozen by agent pid {agent_pid}" in stderr, stderr
    [thawed] = answer["thawed_at_start"]
    assert thawed["result"] == "thawed" and thawed["mountpoint"] == str(mnt), thawed
    assert not journal(host)
    assert writable(mnt)


def test_thaw_all_thaws_what_a_dead_agent_left(host, stalling):
    mnt, proxy = stalling
    agent_pid = _freeze_and_kill_both(host, mnt, proxy)
    _, report, _ = host.json("thaw-all")
    [thawed] = report["thawed"]
    assert thawed["result"] == "thawed" and thawed["agent_pid"] == agent_pid, thawed
    assert writable(mnt)
    assert host.json("thaw-all")[1] == {"thawed": []}


def test_a_split_that_hangs_is_thawed_at_the_timeout(host, stalling):
    """The daemon stops answering inside the window: the agent gives up at
    the split's deadline, 0.5 s short of the timeout, and thaws before the
    watchdog would (or the watchdog does, if the agent is starved), and
    says why."""
    mnt, proxy = stalling
    proxy.stall.set()
    started = time.monotonic()
    rc, err, _ = host.json("prepare", mnt, "--port", "unix", "--timeout", "2", check=False)
    took = time.monotonic() - started
    assert rc == 1 and err["error"]["code"] in ("split-failed", "watchdog-thawed"), err
    assert 1.5 <= took < 10, took
    assert writable(mnt)
    assert not journal(host)


def test_the_library_restarts_a_dead_watchdog(host, daemon, paired):
    """prepare() as the service calls it, in this process: a watchdog that
    died since is started again before anything is frozen."""
    with HostState.open(host.state_dir) as state:
        old = state.watchdog.pid
        os.kill(old, signal.SIGKILL)
        state.watchdog.proc.wait(10)
        answer = prepare(state, str(paired), "unix", timeout=5)
        assert answer["pair"] == "s" and state.watchdog.alive and state.watchdog.pid != old
        with pytest.raises(PrepareError) as e:
            prepare(state, str(paired), "unix")
        assert e.value.code == "pair-state", e.value
    assert writable(paired)


def test_the_daemon_unreachable(host, daemon, paired, tmp_path):
    """An attachment whose daemon does not answer: refused before any freeze."""
    daemon.create_volume("q", "64M")
    _, att, _ = host.json("attach", "q", "--daemon", tmp_path / "no-such.sock", "--nbd",
                          daemon.uri("q"))
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    subprocess.run(["mount", att["device"], mnt2], check=True, timeout=60)
    try:
        rc, err, _ = host.json("prepare", mnt2, "--port", "unix", check=False)
        assert rc == 4 and err["error"]["code"] == "daemon-unreachable", err
        assert "no-such.sock" in err["error"]["message"], err
        assert writable(mnt2)
    finally:
        subprocess.run(["umount", mnt2], check=True, timeout=60)


def test_a_split_failing_after_the_freeze(host, daemon, paired, tmp_path):
    """The pair is deleted between locate and split (by the pre-freeze
    hook): pair.split fails inside the window; thawed, with the daemon's
    message."""
    env = f"SPLITD_ADMIN_SOCKET={daemon.admin_socket}"
    splitctl = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "splitctl"
    if not splitctl.exists():
        splitctl = Path(__import__("sys").executable).parent / "splitctl"
    hook = hook_script(tmp_path, f'[ "$1" = freeze ] && {env} {splitctl} pair delete s '
                                 f'>/dev/null\nexit 0')
    rc, err, _ = host.json("prepare", paired, "--port", "unix", "--hook", hook, check=False)
    assert rc == 1 and err["error"]["code"] == "split-failed", err
    assert "after the freeze (thawed)" in err["error"]["message"], err
    assert "'s'" in err["error"]["message"] or " s " in err["error"]["message"], err
    assert writable(paired)
    assert not journal(host)


def test_a_pair_in_error_is_refused(host, daemon, tmp_path):
    """Split with regions still to copy, then the pending bitmap is lost
    while the daemon is down (tests/pairs/test_restart.py): the pair comes
    back in error; prepare refuses it with the reason, freezing nothing."""
    daemon.create_volume("p", "64M")
    with open("/dev/urandom", "rb") as rnd:
        subprocess.run(["nbdcopy", "-", daemon.uri("p")], input=rnd.read(64 << 20), check=True,
                       timeout=120)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True, rate=1 << 20)
    time.sleep(0.3)
    daemon.call("pair.split", name="s")
    daemon.stop()
    for f in (daemon.data_dir / "pairs" / "s").glob("diff.*.bm"):
        f.unlink()
    daemon.start()
    info = daemon.call("pair.show", name="s")
    if info["state"] != "error":
        pytest.skip(f"the pair did not come back in error: {info['state']}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _, att, _ = host.json("attach", "p", "--daemon", daemon.admin_socket, "--port", "unix")
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    subprocess.run(["mount", att["device"], mnt], check=True, timeout=60)
    try:
        rc, err, _ = host.json("prepare", mnt, "--port", "unix", check=False)
        assert rc == 1 and err["error"]["code"] == "pair-error", err
        assert info["reason"].split()[0] in err["error"]["message"], (info, err)
        assert "splitctl pair resync s" in err["error"]["message"], err
        # --resync is not a full resync: that stays the admin's decision.
        rc, err, _ = host.json("prepare", mnt, "--port", "unix", "--resync", check=False)
        assert rc == 1 and err["error"]["code"] == "pair-error", err
        assert daemon.call("pair.show", name="s")["state"] == "error"
        assert writable(mnt)
    finally:
        subprocess.run(["umount", mnt], check=True, timeout=60)


def test_one_prepare_per_filesystem(host, daemon, paired, tmp_path):
    started = tmp_path / "hook-started"
    hook = hook_script(tmp_path, f'[ "$1" = freeze ] && touch {started} && sleep 2\nexit 0')
    first = host.popen("prepare", paired, "--port", "unix", "--hook", hook)
    try:
        deadline = time.monotonic() + 15
        while not started.exists():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.02)
        rc, err, _ = host.json("prepare", paired, "--port", "unix", check=False)
        assert rc == 1 and err["error"]["code"] == "busy", err
    finally:
        out, errs = first.communicate(timeout=30)
    assert first.returncode == 0, errs
    assert writable(paired)
