"""The backup agent when things go wrong: the daemon killed mid-backup (the
run fails with the reason, nothing committed, the next run reuses what was
stored); two runs into one store at once; the progress bar, drawn on a
terminal only."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import time

import pytest

from harness.splitd import BIN
from tests.agents.backup.helpers import MiB, backup, backup_fails, write_blocks

pytest.importorskip("nbd")

SIZE = 192 * MiB


def splitctl_env(daemon) -> dict[str, str]:
    return dict(os.environ, SPLITD_ADMIN_SOCKET=str(daemon.admin_socket))


def test_daemon_killed_mid_backup(daemon, tmp_path):
    daemon.create_volume("v", SIZE)
    write_blocks(daemon, "v", list(range(0, SIZE, 16 * MiB)), seed=7, length=16 * MiB)
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    proc = subprocess.Popen([str(BIN / "splitctl"), "backup", "run", "--volume", daemon.uri("v"),
                             "--to", str(store), "--connections", "1", "--json"],
                            env=splitctl_env(daemon), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not any((store / "chunks").rglob("*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        daemon.kill9()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    message = json.loads(out)["error"]["message"]
    assert "nothing committed" in message and err.count("\n") == 1, (message, err)
    assert backup(daemon, "list", "--store", str(store))["snapshots"] == []
    stored = sum(1 for p in (store / "chunks").rglob("*") if p.is_file())
    assert stored > 0

    daemon.start()
    r = backup(daemon, "run", "--volume", daemon.uri("v"), "--to", str(store))
    assert r["new_bytes"] <= SIZE - stored * 4 * MiB, ("the chunks of the failed run were not "
                                                       f"reused: {r}")
    assert backup(daemon, "check", "--store", str(store))["ok"]


def test_progress_on_a_terminal_only(daemon, tmp_path):
    daemon.create_volume("v", 16 * MiB)
    write_blocks(daemon, "v", [0], seed=1, length=8 * MiB)
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    # Not a terminal: only the result on stdout, nothing on stderr.
    cp = daemon.splitctl("backup", "run", "--volume", daemon.uri("v"), "--to", str(store))
    assert cp.stderr == "" and cp.stdout.splitlines()[0].count("-") == 1, cp
    # A terminal: the bar (bytes, rate, ETA) on it.
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([str(BIN / "splitctl"), "backup", "run", "--volume", daemon.uri("v"),
                               "--to", str(store)], env=splitctl_env(daemon), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=follower, timeout=60)
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            seen += data
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "backup [" in text and "ETA" in text and "/s" in text, text


def test_two_backups_into_one_store_at_once(daemon, tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        daemon.create_volume(name, 64 * MiB)
        write_blocks(daemon, name, [0], seed=seed, length=32 * MiB)
    store = tmp_path / "store"
    backup(daemon, "init", str(store))
    procs = [subprocess.Popen([str(BIN / "splitctl"), "backup", "run", "--volume", daemon.uri(name),
                               "--to", str(store), "--json"], env=splitctl_env(daemon),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    made = {json.loads(out)["snapshot"] for out, _ in results}
    assert {m["id"] for m in backup(daemon, "list", "--store", str(store))["snapshots"]} == made
    assert backup(daemon, "check", "--store", str(store))["ok"]


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs of our own (root), 40 MiB of it taken by a ballast file
    that the test removes to free space; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", f"backup-full-{os.getpid()}", str(mnt)],
                   check=True)
    try:
        with open(mnt / "ballast", "wb") as f:
            f.write(bytes(40 * MiB))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.root
def test_store_disk_full_mid_backup(daemon, small_fs):
    """The store's filesystem fills mid-run: exit 1, one line naming the full
    filesystem first, no snapshot, a clean check; once space is freed the
    next run completes and reuses the chunks the failed one stored."""
    size = 48 * MiB                 # random: does not compress; more than the 24 MiB left
    daemon.create_volume("v", size)
    write_blocks(daemon, "v", list(range(0, size, 16 * MiB)), seed=3, length=16 * MiB)
    store = small_fs / "store"
    backup(daemon, "init", str(store))
    code, error, err = backup_fails(daemon, "run", "--volume", daemon.uri("v"), "--to", str(store))
    assert code == 1 and err.count("\n") == 1, (code, error, err)
    assert error["code"] == "no-space", error
    assert error["message"].startswith(f"filesystem {small_fs} is full"), error
    assert "nothing committed" in error["message"], error
    assert backup(daemon, "list", "--store", str(store))["snapshots"] == []
    assert backup(daemon, "check", "--store", str(store))["ok"]
    stored = [p for p in (store / "chunks").rglob("*") if p.is_file()]
    assert stored and not [p for p in store.rglob(".tmp-*")], "no chunk stored, or temporaries left"

    (small_fs / "ballast").unlink()
    r = backup(daemon, "run", "--volume", daemon.uri("v"), "--to", str(store))
    assert r["new_bytes"] == size - len(stored) * 4 * MiB, (r, len(stored))
    assert backup(daemon, "check", "--store", str(store))["ok"]
    assert backup(daemon, "verify", r["snapshot"], "--store", str(store))["ok"]
