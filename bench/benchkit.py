"""What every bench section shares: its context (settings, and a clean-up
stack for the processes and directories it makes), splitd and other processes,
/proc figures, the CPU watch, fio helpers, the referee's table format, pair
helpers, the section registry and the run's JSON report.

A section is a module of bench/sections/ that defines

    SECTION = Section("name", "title", run)      # run(ctx) -> dict of figures

and is listed in SECTION_MODULES below, in the order the sections run. Its run()
prints its own table and returns its figures. Every process started with
ctx.spawn() or BenchSplitd and every directory from ctx.tempdir() is removed
when the section ends, whether it ends well, with an error or with Ctrl-C.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from harness.splitd import DaemonFailed, Splitd
from splitctl.client import AdminClient, AdminError

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SPLITD = VENV_BIN / "splitd"
SPLITCTL = VENV_BIN / "splitctl"
REFEREE = REPO.parent / "shared" / "bench" / "compare.sh"

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The sections, in the order they run (modules of bench/sections/).
SECTION_MODULES = ("foundation", "scale", "split", "paired_writes", "copy_engine", "pair_memory",
                   "prepare", "backup", "instant_restore")

NOTHING_RATE = 1                    # bytes/s: the engine copies (next to) nothing


class BenchError(Exception):
    """A section cannot go on; the message says why."""


def error_text(e: Exception) -> str:
    """What a section's ERROR line says about `e`: for an admin call, the
    method, the daemon's error code and its message."""
    if isinstance(e, AdminError):
        return f"{e.method}: {e.code}: {e.message}"
    return str(e)


# ---------------------------------------------------------------------------
# Signals: SIGTERM and SIGHUP end the run like Ctrl-C does, so that the same
# `finally` blocks clean up. While cleaning up, further signals are ignored
# (every wait in the clean-up is bounded).

_cleaning = threading.Event()


def _on_signal(signum, frame):
    if _cleaning.is_set():
        print(f"\n(signal {signum} ignored: cleaning up, please wait)", file=sys.stderr)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


# ---------------------------------------------------------------------------
# /proc helpers

def proc_stat(pid: int) -> tuple[str, int, int, int, int, int, int, int] | None:
    """(comm, ppid, pgrp, utime, stime, cutime, cstime, starttime) in ticks, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces or parentheses.
    lparen, rparen = raw.index("("), raw.rindex(")")
    comm = raw[lparen + 1:rparen]
    rest = raw[rparen + 2:].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    return (comm, int(rest[1]), int(rest[2]), int(rest[11]), int(rest[12]),
            int(rest[13]), int(rest[14]), int(rest[19]))


def proc_status_kib(pid: int, key: str) -> int | None:
    """A 'kB' line of /proc/PID/status (VmRSS, VmHWM, ...) in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process and its reaped children."""
    st = proc_stat(pid)
    if st is None:
        return None
    return sum(st[3:7]) / CLK_TCK


# ---------------------------------------------------------------------------
# Processes and temporary directories that must not outlive a section.

class Spawned:
    """A child started in a session of its own, so its whole group can be ended."""

    def __init__(self, name: str, args: list[str], log_path: Path | None = None, **kw):
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else None
        if self._log is not None:
            kw.setdefault("stdout", self._log)
            kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        self.proc = subprocess.Popen(self.args, start_new_session=True, **kw)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> int | None:
        """Signal the process group, wait up to `grace` s, then SIGKILL the group."""
        if self.proc.poll() is None:
            self._signal_group(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
        # Whatever the leader left behind in its group goes too.
        self._signal_group(signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # pgid == pid: start_new_session
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Context:
    """What a section gets: settings, and a clean-up stack for what it starts."""

    def __init__(self, rt: int, verbose: bool, builtin_referee: bool = False,
                 options: dict | None = None):
        self.rt = rt
        # Section-specific options from the command line (None: not given).
        self.options = dict(options or {})
        self.builtin_referee = builtin_referee
        self.verbose = verbose
        self._undo: list[tuple[str, Callable[[], None]]] = []

    # -- clean-up stack ---------------------------------------------------------

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        self._undo.append((what, fn))

    def cleanup(self) -> None:
        """Undo everything deferred, newest first; one failure does not stop the rest."""
        _cleaning.set()
        try:
            while self._undo:
                what, fn = self._undo.pop()
                try:
                    fn()
                except Exception as e:  # keep cleaning
                    print(f"  clean-up of {what} failed: {e}", file=sys.stderr)
        finally:
            _cleaning.clear()

    # -- resources ----------------------------------------------------------------

    def tempdir(self, parent: str, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.defer(f"temp dir {path}", lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def spawn(self, name: str, args: list, log_path: Path | None = None, **kw) -> Spawned:
        p = Spawned(name, args, log_path, **kw)
        self.defer(f"{name} (pid {p.pid})", p.stop)
        return p

    def note(self, msg: str) -> None:
        if self.verbose:
            print(f"  .. {msg}", file=sys.stderr, flush=True)


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             alive: Spawned | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive.alive():
            raise BenchError(f"{alive.name} exited with status {alive.proc.returncode} "
                             f"while waiting for {what}\n{alive.log_tail()}")
        if cond():
            return
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------
# splitd (harness/splitd.py), started the bench's way

class BenchSplitd(Splitd):
    """splitd on `base` (no TCP listener), in a session of its own, stopped
    when the section ends; admin calls through splitctl's client
    (d.admin() for a kept-open connection)."""

    def __init__(self, ctx: Context, base: Path, what: str = "splitd"):
        super().__init__(base, new_session=True)
        self.what = what
        ctx.defer(what, self.stop)

    def start(self, timeout: float = 30.0) -> Self:
        waiting = "splitd to answer on its admin socket"
        try:
            return super().start(timeout)
        except DaemonFailed as e:
            self.stop()
            if e.returncode is None:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {waiting}") from None
            raise BenchError(f"splitd exited with status {e.returncode} while waiting for "
                             f"{waiting}\n{self.log_tail()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        running = self.proc is not None
        rc = super().stop(sig, timeout)
        if running and rc != 0:
            print(f"  note: splitd exited with status {rc}", file=sys.stderr)
        return rc

    def rss_mib(self) -> float:
        return (proc_status_kib(self.pid, "VmRSS") or 0) / 1024

    def hwm_mib(self) -> float:
        return (proc_status_kib(self.pid, "VmHWM") or 0) / 1024


# ---------------------------------------------------------------------------
# Watching splitd's CPU while fio runs against it

class CpuWatch(threading.Thread):
    """Samples splitd's CPU time and notices which fio workload runs against it.

    Every `interval` s: splitd's own user+sys (plus its reaped children) and any
    live descendants' user+sys; and the --rw of any fio process whose --uri is
    splitd's. The CPU used between two samples is charged to the workload that
    was running at either end of the interval, else to 'other' (the peers' turns,
    set-up). Also remembers where the referee script put its temp directory
    (from the nbdkit it started), to remove it if the script is killed.
    """

    def __init__(self, pid: int, uri: str, parent_pid: int | None = None,
                 interval: float = 0.1):
        super().__init__(daemon=True, name="cpu-watch")
        self.pid = pid
        self.uri_arg = f"--uri={uri}"
        self.parent_pid = parent_pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.peer_tmp: str | None = None
        self.start_cpu: float | None = None
        self.end_cpu: float | None = None
        self._cmdlines: dict[tuple[int, int], list[str]] = {}

    def _sample(self) -> tuple[float | None, str | None]:
        table = {}
        for p in all_pids():
            st = proc_stat(p)
            if st is not None:
                table[p] = st
        own = table.get(self.pid)
        if own is None:
            return None, None
        total = sum(own[3:7])
        # Live descendants (splitd is one process today; this keeps the figure
        # honest if it ever forks workers).
        children: dict[int, list[int]] = {}
        for p, st in table.items():
            children.setdefault(st[1], []).append(p)
        todo = list(children.get(self.pid, []))
        while todo:
            c = todo.pop()
            total += table[c][3] + table[c][4]
            todo.extend(children.get(c, []))
        active = None
        for p, st in table.items():
            if st[0] not in ("fio", "nbdkit"):
                continue
            key = (p, st[7])
            if key not in self._cmdlines:
                self._cmdlines[key] = proc_cmdline(p)
            args = self._cmdlines[key]
            if st[0] == "fio" and self.uri_arg in args:
                active = next((a[5:] for a in args if a.startswith("--rw=")), "?")
            elif (st[0] == "nbdkit" and self.peer_tmp is None and self.parent_pid
                  and st[1] == self.parent_pid and "-U" in args):
                i = args.index("-U")
                if i + 1 < len(args):
                    self.peer_tmp = os.path.dirname(args[i + 1])
        return total / CLK_TCK, active

    def run(self) -> None:
        prev_cpu, prev_active = self._sample()
        self.start_cpu = prev_cpu
        prev_t = time.monotonic()
        while not self.stop_event.wait(self.interval):
            cpu, active = self._sample()
            now = time.monotonic()
            if cpu is None:
                break
            slot = active or prev_active or "other"
            if prev_cpu is not None:
                self.cpu[slot] = self.cpu.get(slot, 0.0) + (cpu - prev_cpu)
            self.wall[slot] = self.wall.get(slot, 0.0) + (now - prev_t)
            self.end_cpu = cpu
            prev_cpu, prev_active, prev_t = cpu, active, now

    def finish(self) -> None:
        self.stop_event.set()
        self.join(5)


# ---------------------------------------------------------------------------
# fio result lines, as the referee's fio_line.py / ratio.py print them

LINE_RE = re.compile(r"^(?P<label>\S+)\s+(?P<rw>\S+)\s+bs=(?P<bs>\S+)\s+qd=(?P<qd>\S+)\s+"
                     r"(?P<mibs>[\d.]+) MiB/s\s+(?P<iops>[\d.]+) IOPS p50=\s*(?P<p50>[\d.]+)us")
FAILED_RE = re.compile(r"^(?P<label>\S+)\s+(?P<rw>\S+)\s+bs=(?P<bs>\S+)\s+qd=(?P<qd>\S+)\s+FAILED")
RATIO_RE = re.compile(r"ratio server/best-peer = (?P<ratio>[\d.]+)")
MIN_RE = re.compile(r"min ratio server/best-peer over (?P<n>\d+) workloads = (?P<ratio>[\d.]+)")


def fio_line(label: str, rw: str, bs: str, qd: str, fio_json: str) -> str:
    """The same one-line summary the referee's fio_line.py prints."""
    try:
        job = json.loads(fio_json[fio_json.index("{"):])["jobs"][0]
        r = job["read" if "read" in rw else "write"]
    except (ValueError, KeyError, IndexError):
        return f"{label:14s} {rw:10s} bs={bs:3s} qd={qd:3s} FAILED"
    p50 = r["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1000
    return (f"{label:14s} {rw:10s} bs={bs:3s} qd={qd:3s} {r['bw'] / 1024:9.1f} MiB/s "
            f"{r['iops']:9.0f} IOPS p50={p50:8.1f}us")


def ratio_table(lines: list[str]) -> list[str]:
    """The same ratio lines the referee's ratio.py appends, groups of three."""
    out, ratios = [], []
    for i in range(0, len(lines), 3):
        group = lines[i:i + 3]
        out.extend(group)
        try:
            iops = [float(line.split("IOPS")[0].split()[-1]) for line in group]
            ratio = iops[0] / max(iops[1:])
        except (ValueError, IndexError, ZeroDivisionError):
            ratio = 0.0
        ratios.append(ratio)
        out.append(f"{'':14s} ratio server/best-peer = {ratio:.2f}")
    out.append(f"min ratio server/best-peer over {len(ratios)} workloads = "
               f"{min(ratios) if ratios else 0:.2f}")
    return out


def parse_table(lines: list[str]) -> dict:
    """Figures out of the referee's table: per workload, each server's numbers and the ratio."""
    workloads: list[dict] = []
    min_ratio = None
    for line in lines:
        m = LINE_RE.match(line) or FAILED_RE.match(line)
        if m:
            key = f"{m['rw']} bs={m['bs']} qd={m['qd']}"
            if not workloads or workloads[-1]["workload"] != key:
                workloads.append({"workload": key, "rw": m["rw"], "bs": m["bs"],
                                  "qd": int(m["qd"]), "servers": {}})
            fig = None
            if "mibs" in m.groupdict():
                fig = {"mib_s": float(m["mibs"]), "iops": float(m["iops"]),
                       "p50_us": float(m["p50"])}
            label = "splitd" if m["label"] == "server" else m["label"]
            workloads[-1]["servers"][label] = fig
            continue
        m = MIN_RE.search(line)
        if m:
            min_ratio = float(m["ratio"])
            continue
        m = RATIO_RE.search(line)
        if m and workloads:
            workloads[-1]["ratio"] = float(m["ratio"])
    return {"workloads": workloads, "min_ratio": min_ratio}


# ---------------------------------------------------------------------------
# Helpers of more than one section

def make_random_image(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; returns their SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MiB))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def need_free(path: str, gib: float, why: str) -> None:
    free = shutil.disk_usage(path).free
    if free < gib * GiB:
        raise BenchError(f"{path} has {free / GiB:.1f} GiB free; this section needs "
                         f"{gib:.1f} GiB ({why})")


def fio_run(uri: str, rw: str, bs: str, iodepth: int, runtime: int, *extra: str) -> dict:
    """One time-based fio job over NBD; its figures (IOPS, MiB/s, clat percentiles)."""
    args = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", "--size=1g", "--time_based", f"--runtime={runtime}",
            "--output-format=json", *extra]
    cp = subprocess.run(args, capture_output=True, text=True, timeout=runtime + 120,
                        stdin=subprocess.DEVNULL)
    try:
        job = json.loads(cp.stdout[cp.stdout.index("{"):])["jobs"][0]
        r = job["read" if "read" in rw else "write"]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {rw} on {uri} failed (status {cp.returncode}): "
                         f"{cp.stderr.strip()[-600:]}") from None
    if job.get("error") or cp.returncode != 0 or not r.get("total_ios"):
        raise BenchError(f"fio {rw} on {uri}: status {cp.returncode}, error {job.get('error')}, "
                         f"{r.get('total_ios')} I/Os: {cp.stderr.strip()[-600:]}")
    clat = r["clat_ns"]
    pct = clat.get("percentile", {})
    return {"iops": round(r["iops"], 1), "mib_s": round(r["bw"] / 1024, 1),
            "ios": r["total_ios"], "runtime_s": round(job["job_runtime"] / 1000, 2),
            "clat_mean_us": round(clat["mean"] / 1000, 1),
            "clat_p50_us": round(pct.get("50.000000", 0) / 1000, 1),
            "clat_p99_us": round(pct.get("99.000000", 0) / 1000, 1),
            "clat_max_us": round(clat["max"] / 1000, 1)}


def nbd_fill(uri: str, image: Path) -> float:
    """Write an image into an export through NBD; returns the seconds it took."""
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", "--flush", image, uri], check=True, timeout=600,
                   stdin=subprocess.DEVNULL)
    return time.monotonic() - t0


def tmpfs_seek_hole_ms(path: Path) -> float:
    """One SEEK_HOLE from offset 0 of a file: on tmpfs it walks the pages to the
    first hole, so on a fully written file it costs O(file size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        os.lseek(fd, 0, os.SEEK_HOLE)
        return (time.perf_counter() - t0) * 1000
    finally:
        os.close(fd)


def wait_pair_state(a: AdminClient, name: str, state: str, timeout: float,
                    poll: float = 0.01) -> tuple[float, dict]:
    """Poll pair.show until the pair is in `state`; (seconds waited, last pair.show)."""
    t0 = time.monotonic()
    while True:
        p = a.call("pair.show", name=name)
        if p["state"] == state:
            return time.monotonic() - t0, p
        if p["state"] == "error":
            raise BenchError(f"pair {name} went to state error: {p.get('reason')}")
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"pair {name} still in state {p['state']} after {timeout:.0f} s "
                             f"({p['remaining']} regions left), waiting for {state}")
        time.sleep(poll)


def split_all_pending(a: AdminClient, name: str) -> dict:
    """Split the pair so that every region is pending: resync first if it is split
    (resync = pending | changed, which is every region once each was pending or
    changed), then split. The engine must be held back (rate 1 B/s)."""
    p = a.call("pair.show", name=name)
    if p["state"] == "split":
        a.call("pair.resync", name=name)
    p = a.call("pair.split", name=name)
    if p["pending"] < 0.99 * p["regions"]:
        raise BenchError(f"pair {name} split with {p['pending']} of {p['regions']} regions "
                         "pending, expected (nearly) all of them")
    return p


# ---------------------------------------------------------------------------
# The section registry, the environment, the JSON report

@dataclass
class Section:
    name: str
    title: str
    run: Callable[[Context], dict]


def load_sections() -> list[Section]:
    """Every section, in the order they run."""
    return [importlib.import_module(f"sections.{m}").SECTION for m in SECTION_MODULES]


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def environment() -> dict:
    def out(args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30,
                                  cwd=REPO).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None
    dirty = out(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "worktree_modified": dirty is not None,
        "splitd": out([str(SPLITD), "--version"]), "fio": out(["fio", "--version"]),
        "nbdkit": out(["nbdkit", "--version"]), "qemu_nbd": out(["qemu-nbd", "--version"]),
        "python": platform.python_version(), "loadavg_at_start": loadavg(),
    }


def write_json(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures written to {path}")
