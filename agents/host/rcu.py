"""Expedited RCU grace periods for the length of a FIFREEZE.

Most of a FIFREEZE is not spent writing: it is spent waiting for RCU grace
periods. freeze_super() (fs/super.c) takes the superblock's three freeze
levels in turn (write, page fault, internal: sb_wait_write()), each a
percpu_down_write(), and each of those starts with rcu_sync_enter()
(kernel/rcu/sync.c), which waits for a whole grace period with
synchronize_rcu() ("synchronize_rcu() can be faster if rcu_expedited", says
its comment). A normal grace period lasts a few scheduler ticks: on a 2-CPU
VM with HZ=250, 12 ms at the median, so 3 x 12 ms of the freeze, two of
them with writers already blocked. With /sys/kernel/rcu_expedited set,
synchronize_rcu() forces the grace period with an IPI to each CPU and
returns in tens of microseconds. The kernel does the same for itself
around suspend and hibernation (rcu_pm_notify() in kernel/rcu/tree.c calls
rcu_expedite_gp()), which freeze filesystems too.

The knob is host-wide, so it is set only for the FIFREEZE call and put back
as soon as it returns:

    with expedited(state_dir) as on:    # on: grace periods are expedited now
        fcntl.ioctl(fd, FIFREEZE, 0)

- Only a knob found at 0 is set and later put back to 0; one set by the
  administrator (1) is left alone, and so is a host where rcu_normal
  forces normal grace periods anyway (then `on` is False).
- Threads of one process share one count: the last one out puts it back.
  (Two agent processes on one host: one may put it back while the other
  freezes; that freeze is then only slower.)
- A process killed between setting and putting back leaves a marker,
  STATE_DIR/rcu-expedited ({"pid", "boot_id"}): its watchdog, seeing its
  agent go, and the next agent to start or `thaw-all` put the knob back
  (restore_leftover). The knob does not outlive a reboot, so a marker of
  another boot is only removed.
- A knob that cannot be read or written (no such file, a read-only /sys in
  a container, not root) is no error: the freeze is only slower.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["KNOB", "RCU_NORMAL", "MARKER", "expedited", "restore_leftover", "read_knob"]

KNOB = "/sys/kernel/rcu_expedited"
RCU_NORMAL = "/sys/kernel/rcu_normal"      # 1: every expedited grace period is a normal one
MARKER = "rcu-expedited"
BOOT_ID = "/proc/sys/kernel/random/boot_id"

_lock = threading.Lock()
_users = 0
_marker: Path | None = None     # set while this process holds the knob at 1


def read_knob(path: str = KNOB) -> str | None:
    """The knob's value ("0", "1"), or None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write_knob(value: str) -> bool:
    try:
        fd = os.open(KNOB, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, value.encode())
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _boot_id() -> str | None:
    return read_knob(BOOT_ID)


def _enter(state_dir: Path) -> bool:
    global _users, _marker
    with _lock:
        if _users == 0 and read_knob() == "0" and read_knob(RCU_NORMAL) != "1":
            marker = state_dir / MARKER
            try:
                # Before the knob: a crash in between leaves a marker and a
                # knob at 0, which restore_leftover finds harmless.
                marker.write_text(json.dumps({"pid": os.getpid(), "boot_id": _boot_id()}))
            except OSError:
                pass
            else:
                if _write_knob("1"):
                    _marker = marker
                else:
                    with contextlib.suppress(OSError):
                        marker.unlink()
        _users += 1
        return _marker is not None or (read_knob() == "1" and read_knob(RCU_NORMAL) != "1")


def _exit() -> None:
    global _users, _marker
    with _lock:
        _users -= 1
        if _users == 0 and _marker is not None:
            if _write_knob("0"):
                with contextlib.suppress(OSError):
                    _marker.unlink()
            _marker = None      # not put back: the marker stays for restore_leftover


@contextlib.contextmanager
def expedited(state_dir: str | os.PathLike) -> Iterator[bool]:
    """Grace periods expedited for the block (see the module); yields
    whether they are."""
    on = _enter(Path(state_dir))
    try:
        yield on
    finally:
        _exit()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def restore_leftover(state_dir: str | os.PathLike, gone_pid: int | None = None) -> str | None:
    """Put the knob back to 0 if a marker in `state_dir` says an agent set
    it and is gone (dead, or `gone_pid`: the agent a watchdog saw go). What
    was done, for a log line, or None if there was no such marker."""
    marker = Path(state_dir) / MARKER
    try:
        data = json.loads(marker.read_text())
        pid, boot_id = int(data["pid"]), data.get("boot_id")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        pid, boot_id = 0, None      # unreadable: nobody can be using it
    if pid == os.getpid():
        if _marker is not None:
            return None             # ours, held now
    elif pid != gone_pid and _alive(pid) and boot_id == _boot_id():
        return None                 # its agent is alive: it puts the knob back itself
    if boot_id != _boot_id():
        result = f"{KNOB}: a marker of agent pid {pid} from another boot, removed"
    elif read_knob() != "1":
        result = f"{KNOB} was already back to {read_knob()} (agent pid {pid} had set it)"
    elif _write_knob("0"):
        result = f"{KNOB} put back to 0 (agent pid {pid} had set it and is gone)"
    else:
        return f"{KNOB}: cannot put it back to 0 (agent pid {pid} had set it)"
    with contextlib.suppress(OSError):
        marker.unlink()
    return result
