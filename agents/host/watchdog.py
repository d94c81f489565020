"""The watchdog: a separate process that thaws a filesystem left frozen.

A frozen filesystem blocks every writer on it: the application stops. So
whatever the agent does (hangs on a daemon that does not answer, is killed
with -9, crashes), a filesystem it froze is thawed:

- by the watchdog, when the deadline given at arm() passes (default 10 s).
  It is its own process in its own session: a hung agent cannot stop it, and
  a signal to the agent's process group (Ctrl-C, kill -- -PGID) does not
  reach it. It talks to the agent over a socketpair, one JSON line each way.
- by the watchdog at once, when the agent goes away (its end of the
  socketpair closes: exit, crash, kill -9) with something armed. Waiting for
  the deadline would only keep the application stopped longer: nobody is
  left to finish the split and thaw, and nobody will be told the backup was
  prepared, so nothing trusts an image taken after that. It then exits.
- from the journal, by the next agent that starts (HostState.open) or by
  `splitd-host thaw-all` (the unit's ExecStopPost=), when the watchdog died
  too (systemd stops the whole cgroup, both processes, at once). arm()
  returns only once the journal entry is on disk (written whole, fsynced,
  directory fsynced), before the agent freezes; disarm() removes it after
  the thaw.

The same goes for the RCU knob an agent sets for the length of a FIFREEZE
(agents/host/rcu.py): the watchdog, seeing its agent go or being stopped,
puts it back if the agent left its marker (restore_leftover), and so do
thaw_leftovers' callers (the next agent, thaw-all).

Journal: STATE_DIR/frozen/WATCHDOGPID-MAJOR-MINOR.json, one per frozen
filesystem: {"mountpoint", "devno", "frozen_at", "timeout", "agent_pid",
"watchdog_pid"}.

Protocol, agent -> watchdog, one JSON object per line, each answered in turn:
    {"op": "arm", "mountpoint": M, "timeout": S, "agent_pid": P} -> {"ok": true}
    {"op": "disarm", "mountpoint": M, "thaw": B} -> {"ok": true, "fired": {...} | null}
    {"op": "ping"} -> {"ok": true}
Errors: {"ok": false, "error": "one line"}. The watchdog's first line is
{"ready": true, "pid": PID}.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.host.freeze import open_mountpoint, thaw_fd
from agents.host.mounts import device_number
from agents.host.rcu import restore_leftover
from agents.host.state import read_json, remove_durably, write_json

__all__ = ["Watchdog", "WatchdogError", "thaw_leftovers"]

MAX_LINE = 1 << 16
REPLY_TIMEOUT = 10.0
RETRY_S = 0.2


class WatchdogError(Exception):
    pass


def _log(message: str) -> None:
    print(f"splitd-host watchdog[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


# -- the watchdog process ----------------------------------------------------------------

@dataclass
class _Armed:
    fd: int
    devno: tuple[int, int]
    deadline: float
    journal: Path
    entry: dict


class _Process:
    def __init__(self, sock: socket.socket, state_dir: Path):
        self.sock = sock
        self.state_dir = state_dir
        self.agent_pid = os.getppid()   # the agent that started us
        self.journal_dir = state_dir / "frozen"
        self.armed: dict[str, _Armed] = {}
        self.fired: dict[str, dict] = {}

    def run(self) -> None:
        self.send({"ready": True, "pid": os.getpid()})
        buf = b""
        while True:
            now = time.monotonic()
            for mountpoint, a in list(self.armed.items()):
                if now >= a.deadline:
                    report = self.thaw(mountpoint, "deadline passed", retry=True)
                    if mountpoint not in self.fired or report["result"] == "thawed":
                        self.fired[mountpoint] = report
            wait = min((a.deadline - now for a in self.armed.values()), default=None)
            ready, _, _ = select.select([self.sock], [], [], None if wait is None else max(wait, 0))
            if not ready:
                continue
            data = self.sock.recv(MAX_LINE)
            if not data:
                if self.armed:
                    _log(f"the agent went away with {len(self.armed)} filesystem(s) frozen: "
                         "thawing now")
                self.thaw_all("the agent went away")
                self.restore_rcu(self.agent_pid)
                return
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                self.send(self.handle(line))
            if len(buf) > MAX_LINE:
                self.thaw_all("the agent sent a line too long")
                return

    def send(self, message: dict) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(json.dumps(message).encode() + b"\n")

    def handle(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "ping":
                return {"ok": True}
            mountpoint = str(req["mountpoint"])
            if op == "arm":
                self.arm(mountpoint, float(req["timeout"]), int(req.get("agent_pid", 0)))
                return {"ok": True}
            if op == "disarm":
                return {"ok": True, "fired": self.disarm(mountpoint, bool(req.get("thaw")))}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        except (OSError, WatchdogError) as e:
            return {"ok": False, "error": str(e)}

    def arm(self, mountpoint: str, timeout: float, agent_pid: int) -> None:
        if mountpoint in self.armed:
            raise WatchdogError(f"{mountpoint} is already armed")
        self.fired.pop(mountpoint, None)
        fd = open_mountpoint(mountpoint)
        try:
            devno = device_number(os.fstat(fd).st_dev)
            entry = {"mountpoint": mountpoint, "devno": list(devno), "frozen_at": time.time(),
                     "timeout": timeout, "agent_pid": agent_pid, "watchdog_pid": os.getpid()}
            journal = self.journal_dir / f"{os.getpid()}-{devno[0]}-{devno[1]}.json"
            write_json(journal, entry)
        except BaseException:
            os.close(fd)
            raise
        self.armed[mountpoint] = _Armed(fd, devno, time.monotonic() + timeout, journal, entry)

    def disarm(self, mountpoint: str, thaw: bool) -> dict | None:
        if mountpoint in self.armed:
            if thaw:
                self.thaw(mountpoint, "the agent could not thaw")
            else:
                a = self.armed.pop(mountpoint)
                os.close(a.fd)
                remove_durably(a.journal)
        return self.fired.pop(mountpoint, None)

    def thaw(self, mountpoint: str, why: str, retry: bool = False) -> dict:
        """FITHAW through the fd opened at arm (the path may be covered by
        now). retry: a filesystem not frozen yet stays armed and is tried
        again every RETRY_S: an agent stuck inside a FIFREEZE that is still
        writing out (a slow device) would otherwise freeze it after our
        thaw, with nobody left to watch. (When the agent is gone, its
        FIFREEZE has returned: a process leaves only after its ioctl does.)"""
        a = self.armed[mountpoint]
        frozen_s = time.time() - a.entry["frozen_at"]
        try:
            was_frozen = thaw_fd(a.fd)
            if not was_frozen and retry:
                a.deadline = time.monotonic() + RETRY_S
                return {"mountpoint": mountpoint, "why": why, "result": "was not frozen"}
        except OSError as e:
            _log(f"cannot thaw {mountpoint}: {e.strerror or e}; left in the journal for thaw-all")
            del self.armed[mountpoint]
            os.close(a.fd)
            return {"mountpoint": mountpoint, "why": why, "result": f"failed: {e.strerror or e}"}
        del self.armed[mountpoint]
        os.close(a.fd)
        remove_durably(a.journal)
        result = "thawed" if was_frozen else "was not frozen"
        if was_frozen:
            _log(f"thawed {mountpoint} after {frozen_s:.1f} s: {why}")
        return {"mountpoint": mountpoint, "why": why, "result": result,
                "frozen_ms": round(frozen_s * 1000, 1)}

    def thaw_all(self, why: str) -> None:
        for mountpoint in list(self.armed):
            self.thaw(mountpoint, why)

    def restore_rcu(self, gone_pid: int | None) -> None:
        done = restore_leftover(self.state_dir, gone_pid)
        if done:
            _log(done)


def _main(argv: list[str]) -> int:
    state_dir, fd = Path(argv[0]), int(argv[1])
    sock = socket.socket(fileno=fd)
    proc = _Process(sock, state_dir)

    def terminate(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    try:
        proc.run()
    finally:
        proc.thaw_all("the watchdog was stopped")
        proc.restore_rcu(None)
    return 0


# -- the agent's side --------------------------------------------------------------------

def _package_root() -> str:
    import agents
    return str(Path(agents.__file__).resolve().parent.parent)


class Watchdog:
    """The agent's handle on its watchdog process. Thread-safe: one request
    at a time."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.stop()
        (self.state_dir / "frozen").mkdir(mode=0o700, parents=True, exist_ok=True)
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agents.host.watchdog", str(self.state_dir),
                 str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, close_fds=True)
        finally:
            theirs.close()
        ours.settimeout(REPLY_TIMEOUT)
        self._sock, self._buf = ours, b""
        hello = self._read()
        if not hello.get("ready"):
            raise WatchdogError(f"the watchdog did not start: {hello}")

    def arm(self, mountpoint: str, timeout: float) -> None:
        self._request({"op": "arm", "mountpoint": mountpoint, "timeout": timeout,
                       "agent_pid": os.getpid()})

    def disarm(self, mountpoint: str, thaw: bool = False) -> dict | None:
        """Forget `mountpoint` (thaw: FITHAW it first). The watchdog's report
        if its deadline passed and it thawed, else None."""
        return self._request({"op": "disarm", "mountpoint": mountpoint, "thaw": thaw}).get("fired")

    def ping(self) -> None:
        self._request({"op": "ping"})

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()      # EOF: it thaws what is armed, and exits
            self._sock = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait()
            self.proc = None

    def _request(self, message: dict) -> dict:
        with self._lock:
            if self._sock is None or not self.alive:
                raise WatchdogError("the watchdog is not running")
            try:
                self._sock.sendall(json.dumps(message).encode() + b"\n")
                reply = self._read()
            except OSError as e:
                raise WatchdogError(f"lost the watchdog: {e.strerror or e}") from None
        if not reply.get("ok"):
            raise WatchdogError(f"watchdog: {reply.get('error')}")
        return reply

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                data = self._sock.recv(MAX_LINE)
            except OSError as e:
                raise WatchdogError(f"the watchdog did not answer: {e.strerror or e}") from None
            if not data:
                raise WatchdogError("the watchdog exited")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)


# -- leftovers ---------------------------------------------------------------------------

def _is_live_watchdog(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"agents.host.watchdog" in f.read()
    except OSError:
        return False


def thaw_leftovers(state_dir: str | os.PathLike, include_live: bool = False) -> list[dict]:
    """Thaw every filesystem the journal says is frozen and whose watchdog is
    gone (include_live: whatever its watchdog; thaw-all after the service
    stopped). Each: the journal entry plus "result": "thawed", "was not
    frozen", "gone" (the mount point is no longer that filesystem) or
    "failed: REASON" (the entry is then kept)."""
    folder = Path(state_dir) / "frozen"
    report = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        entry = read_json(path)
        if not isinstance(entry, dict) or "mountpoint" not in entry:
            remove_durably(path)
            continue
        if not include_live and _is_live_watchdog(int(entry.get("watchdog_pid", 0))):
            continue
        report.append(dict(entry, result=_thaw_entry(entry)))
        if not report[-1]["result"].startswith("failed"):
            remove_durably(path)
    return report


def _thaw_entry(entry: dict) -> str:
    try:
        fd = open_mountpoint(entry["mountpoint"])
    except OSError:
        return "gone"
    try:
        if list(device_number(os.fstat(fd).st_dev)) != list(entry.get("devno", [])):
            return "gone"
        return "thawed" if thaw_fd(fd) else "was not frozen"
    except OSError as e:
        return f"failed: {e.strerror or e}"
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
