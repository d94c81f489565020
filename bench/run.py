#!/usr/bin/env python3
"""splitd benchmarks: `make bench`, or `.venv/bin/python bench/run.py [options]`.

Sections (run in this order; pick some with --only a,b):
  foundation  splitd vs nbdkit (file plugin) vs qemu-nbd on tmpfs, four fio
              workloads, interleaved, with splitd's CPU time and peak RSS.
              Uses the referee script ../shared/bench/compare.sh when present,
              otherwise an equivalent built in here.
  scale       100 sparse 1 TiB volumes on an idle daemon: RSS after creation
              and after a restart, and how long `splitctl volume list` takes.
  split       pair.split round trip (100 x split + resync) of a 1 TiB pair with
              every region pending, rate 1 B/s: p50/p99/max, target p99 < 1 ms
              on tmpfs; also with the engine held back (information), and on
              /var/tmp, a disk (its own verdict, labelled).
  paired-writes
              fio 4 KiB randwrite qd16 on an unpaired volume, a primary in
              `pair` and a primary split with every region pending (2
              interleaved rounds, median): target pair/unpaired >= 0.7, on
              tmpfs, then on /var/tmp (disk, sync before each run; its own
              verdict, labelled).
  copy-engine the copy engine (pair.create --create-secondary until `pair`,
              and on until the copy is durable: the diff bitmap file all clear)
              vs `cp --sparse=always SRC DST && sync --data DST` of the same
              1 GiB: target (durable vs durable) >= 0.8 on tmpfs, and
              the same on /var/tmp (disk, labelled verdict); copy-on-read 4 KiB
              read latency (fio clat p50/p99) vs unpaired, on tmpfs.
  pair-memory daemon RSS with two 1 TiB volumes, then paired, then split:
              target delta < 16 MiB.

Options: --rt SECONDS per fio workload (default: $RT, else 6), --json FILE to
also write every figure as JSON, --builtin-referee to use the built-in logic
even when compare.sh exists, --list to show the sections, -v for progress.

To add a section: write `def section_NAME(ctx) -> dict` that prints its own
table and returns its figures, and add a Section(...) line to SECTIONS. Every
process started with ctx.spawn() and every directory from ctx.tempdir() is
removed when the section ends, whether it ends well, with an error or with
Ctrl-C.

Only the standard library is used.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SPLITD = VENV_BIN / "splitd"
SPLITCTL = VENV_BIN / "splitctl"
REFEREE = REPO.parent / "shared" / "bench" / "compare.sh"

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The referee's workloads: (fio --rw, --bs, --iodepth), in its order.
WORKLOADS = [("read", "1m", "8"), ("write", "1m", "8"),
             ("randread", "4k", "16"), ("randwrite", "4k", "16")]

# Targets of the idle-scale check.
SCALE_VOLUMES = 100
SCALE_VOLUME_SIZE = "1T"
RSS_TARGET_MIB = 80.0
LIST_TARGET_MS = 100.0


class BenchError(Exception):
    """A section cannot go on; the message says why."""


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

    def __init__(self, rt: int, verbose: bool, builtin_referee: bool = False):
        self.rt = rt
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
# splitd and its admin socket

class AdminError(Exception):
    pass


class Admin:
    """A blocking connection to splitd's admin socket: one JSON line each way."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.next_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, **params):
        return self.call_timed(method, **params)[0]

    def call_timed(self, method: str, **params):
        """(result, seconds from just before the send to the reply's last byte)."""
        self.next_id += 1
        line = json.dumps({"id": self.next_id, "method": method, "params": params}).encode() + b"\n"
        t0 = time.perf_counter()
        self.sock.sendall(line)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise AdminError(f"admin socket closed during {method}")
            self.buf += chunk
        elapsed = time.perf_counter() - t0
        raw, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(raw)
        if "error" in reply:
            err = reply["error"]
            raise AdminError(f"{method}: {err.get('code')}: {err.get('message')}")
        return reply["result"], elapsed


class Splitd:
    """One splitd on a data directory, with a Unix NBD socket and an admin socket."""

    def __init__(self, ctx: Context, base: Path):
        self.ctx = ctx
        self.base = base
        self.data_dir = base / "data"
        self.nbd_sock = base / "nbd.sock"
        self.admin_sock = base / "admin.sock"
        self.log_path = base / "splitd.log"
        self.proc: Spawned | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_sock}"

    def start(self, timeout: float = 30.0) -> Splitd:
        for p in (self.nbd_sock, self.admin_sock):
            p.unlink(missing_ok=True)
        self.proc = self.ctx.spawn("splitd", [
            SPLITD, "--data-dir", self.data_dir, "--listen", f"unix:{self.nbd_sock}",
            "--admin-socket", self.admin_sock, "--config", "/dev/null"], self.log_path)
        wait_for(self._answers, timeout, "splitd to answer on its admin socket", self.proc)
        return self

    def _answers(self) -> bool:
        if not (self.admin_sock.exists() and self.nbd_sock.exists()):
            return False
        try:
            self.call("status")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            rc = self.proc.stop()
            if rc not in (0, None):
                print(f"  note: splitd exited with status {rc}", file=sys.stderr)
            self.proc = None

    def restart(self) -> Splitd:
        self.stop()
        return self.start()

    def call(self, method: str, **params):
        with Admin(self.admin_sock) as a:
            return a.call(method, **params)

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
# Section: foundation

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


def nbd_sha256(uri: str, timeout: float) -> str:
    """Read a whole export through NBD (nbdcopy URI -) and hash it.

    --no-extents: with block-status queries nbdcopy takes ~18 s for a full 1 GiB
    tmpfs file against any server (nbdkit too; tmpfs's SEEK_HOLE scans to the end
    of the file), instead of ~0.2 s. We want every byte read anyway.
    """
    h = hashlib.sha256()
    p = subprocess.Popen(["nbdcopy", "--no-extents", uri, "-"], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while chunk := p.stdout.read(8 * MiB):
            h.update(chunk)
        rc = p.wait(timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.stdout.close()
    if rc != 0:
        raise BenchError(f"nbdcopy {uri} - exited with status {rc}")
    return h.hexdigest()


def run_referee(ctx: Context, uri: str, image: Path, workdir: Path,
                watch_pid: int) -> tuple[list[str], CpuWatch]:
    """Run ../shared/bench/compare.sh URI IMAGE; returns its lines and the CPU watch."""
    env = dict(os.environ, RT=str(ctx.rt))
    started = time.monotonic()
    with open(workdir / "compare.err", "wb") as err:
        script = ctx.spawn("compare.sh", ["bash", REFEREE, uri, image],
                           stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    # If the script is ended from outside its own trap, its temp dir is ours to remove.
    watch = CpuWatch(watch_pid, uri, parent_pid=script.pid)

    def drop_peer_tmp():
        if watch.peer_tmp and watch.peer_tmp.startswith("/dev/shm/compare.") \
                and os.path.isdir(watch.peer_tmp):
            shutil.rmtree(watch.peer_tmp, ignore_errors=True)
    ctx.defer("compare.sh temp dir", drop_peer_tmp)
    watch.start()
    # ratio.py prints only at the end, so the time limit is a timer, not a read timeout.
    limit = len(WORKLOADS) * 3 * (ctx.rt + 20) + 120
    timer = threading.Timer(limit, lambda: script.stop(grace=5))
    timer.daemon = True
    timer.start()
    ctx.defer("compare.sh timer", timer.cancel)
    lines = []
    for line in script.proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        print(line, flush=True)
    rc = script.proc.wait(60)
    timer.cancel()
    watch.finish()
    if not timer.is_alive() and rc != 0 and time.monotonic() - started >= limit:
        raise BenchError(f"compare.sh took longer than {limit} s and was stopped")
    if rc != 0:
        err = (workdir / "compare.err").read_text(errors="replace")
        raise BenchError(f"compare.sh exited with status {rc}\n{err}")
    return lines, watch


def run_builtin(ctx: Context, uri: str, image: Path, workdir: Path,
                watch_pid: int) -> tuple[list[str], CpuWatch]:
    """The referee's logic, for when compare.sh is not there."""
    qemu_img = workdir / "qemu.img"
    subprocess.run(["cp", "--sparse=always", image, qemu_img], check=True)
    nbdkit_sock, qemu_sock = workdir / "nbdkit.sock", workdir / "qemu.sock"
    nbdkit = ctx.spawn("nbdkit", ["nbdkit", "-f", "-U", nbdkit_sock, "file", image],
                       workdir / "nbdkit.log")
    qemu = ctx.spawn("qemu-nbd", ["qemu-nbd", "-k", qemu_sock, "-f", "raw", "-t", "-e", "8",
                                  qemu_img], workdir / "qemu-nbd.log")
    wait_for(nbdkit_sock.exists, 15, "nbdkit's socket", nbdkit)
    wait_for(qemu_sock.exists, 15, "qemu-nbd's socket", qemu)
    servers = [("server", uri), ("nbdkit", f"nbd+unix:///?socket={nbdkit_sock}"),
               ("qemu-nbd", f"nbd+unix:///?socket={qemu_sock}")]
    watch = CpuWatch(watch_pid, uri)
    watch.start()
    rows = []
    for rw, bs, qd in WORKLOADS:
        for label, u in servers:
            fio = subprocess.run(
                ["fio", "--name=j", "--ioengine=nbd", f"--uri={u}", f"--rw={rw}", f"--bs={bs}",
                 f"--iodepth={qd}", "--size=1g", "--time_based", f"--runtime={ctx.rt}",
                 "--ramp_time=1", "--output-format=json"],
                capture_output=True, text=True, timeout=ctx.rt + 120)
            rows.append(fio_line(label, rw, bs, qd, fio.stdout))
            ctx.note(rows[-1])
    watch.finish()
    lines = ratio_table(rows)
    for line in lines:
        print(line)
    return lines, watch


def section_foundation(ctx: Context) -> dict:
    for tool in ("fio", "nbdkit", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    free = shutil.disk_usage("/dev/shm").free
    if free < int(3.5 * GiB):
        raise BenchError(f"/dev/shm has {free / GiB:.1f} GiB free; this section needs 3.5 GiB "
                         "(splitd's volume, the peers' image and qemu-nbd's copy)")
    work = ctx.tempdir("/dev/shm", "splitd-bench.")
    image = work / "peer.img"
    ctx.note(f"writing 1 GiB of random data to {image}")
    digest = make_random_image(image, GiB)

    d = Splitd(ctx, work).start()
    ctx.defer("splitd", d.stop)
    d.call("volume.create", name="bench", size="1G")
    uri = d.uri("bench")

    ctx.note("filling the splitd volume through NBD (nbdcopy)")
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", "--flush", image, uri], check=True, timeout=600,
                   stdin=subprocess.DEVNULL)
    fill_s = time.monotonic() - t0
    t0 = time.monotonic()
    readback = nbd_sha256(uri, timeout=600)
    verify_s = time.monotonic() - t0
    if readback != digest:
        raise BenchError("the volume read back through NBD differs from the random image "
                         "written into it")
    print(f"fill: 1 GiB of random data written through NBD (nbdcopy --flush) in {fill_s:.2f} s "
          f"({1024 / fill_s:.0f} MiB/s; first touch of a fresh tmpfs file), read back and "
          f"verified in {verify_s:.2f} s ({1024 / verify_s:.0f} MiB/s)")

    referee = REFEREE.is_file() and not ctx.builtin_referee
    how = f"referee {REFEREE}" if referee else "built-in copy of the referee's logic"
    est = len(WORKLOADS) * 3 * (ctx.rt + 1.5)
    print(f"workloads: RT={ctx.rt} s each (+1 s ramp), interleaved; server = splitd; {how}")
    print(f"(about {est:.0f} s; the referee prints its table at the end)", flush=True)
    print()
    cpu0 = cpu_seconds(d.pid) or 0.0
    t0 = time.monotonic()
    runner = run_referee if referee else run_builtin
    lines, watch = runner(ctx, uri, image, work, d.pid)
    wall = time.monotonic() - t0
    cpu_total = (cpu_seconds(d.pid) or 0.0) - cpu0
    hwm, rss = d.hwm_mib(), d.rss_mib()
    figures = parse_table(lines)
    if len(figures["workloads"]) != len(WORKLOADS):
        raise BenchError(f"expected {len(WORKLOADS)} workloads in the table, "
                         f"found {len(figures['workloads'])}")

    print()
    print("splitd resources during the fio runs (CPU = user+sys from /proc/PID/stat; "
          "window = its fio job incl. ramp):")
    per = {}
    for rw, bs, qd in WORKLOADS:
        cpu, win = watch.cpu.get(rw, 0.0), watch.wall.get(rw, 0.0)
        w = next(x for x in figures["workloads"] if x["rw"] == rw)
        s = w["servers"].get("splitd") or {}
        # CPU per I/O ~ (CPU s per s of window) / (I/Os per s); the window also
        # holds fio's start-up, so this leans a little low.
        iops = s.get("iops", 0.0)
        per[rw] = {"cpu_s": round(cpu, 3), "window_s": round(win, 2),
                   "cpu_pct": round(100 * cpu / win, 1) if win else None,
                   "cpu_us_per_io": round(1e6 * cpu / win / iops, 1) if win and iops else None}
        us_io = f"~{per[rw]['cpu_us_per_io']:.1f} us CPU/IO" if win and iops else ""
        pct = f"{per[rw]['cpu_pct']:5.0f}%" if win else "    ?"
        print(f"  {rw:10s} bs={bs:3s} qd={qd:3s} {cpu:6.2f} s CPU in {win:5.1f} s = {pct} "
              f"of one core  {us_io}")
    other = watch.cpu.get("other", 0.0)
    print(f"  total      {cpu_total:6.2f} s CPU over {wall:.0f} s of runs "
          f"(of which {other:.2f} s outside splitd's own fio windows)")
    print(f"  peak RSS (VmHWM) {hwm:.1f} MiB; RSS at the end {rss:.1f} MiB")
    below = [w for w in figures["workloads"] if w.get("ratio") is not None and w["ratio"] < 1.0]
    if below:
        print("  below 1.0x: " + ", ".join(f"{w['workload']} ({w['ratio']:.2f}x)" for w in below))

    figures.update({
        "rt_s": ctx.rt, "referee": str(REFEREE) if referee else None,
        "fill_s": round(fill_s, 3), "verify_s": round(verify_s, 3),
        "splitd_cpu": {"per_workload": per, "total_s": round(cpu_total, 3),
                       "outside_windows_s": round(other, 3), "runs_wall_s": round(wall, 1)},
        "splitd_peak_rss_mib": round(hwm, 1), "splitd_end_rss_mib": round(rss, 1),
    })
    return figures


# ---------------------------------------------------------------------------
# Section: scale

def timed_runs(fn: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def section_scale(ctx: Context) -> dict:
    work = ctx.tempdir("/var/tmp", "splitd-bench-scale.")
    d = Splitd(ctx, work).start()
    ctx.defer("splitd", d.stop)
    rss_empty = d.rss_mib()

    names = [f"vol{i:03d}" for i in range(SCALE_VOLUMES)]
    t0 = time.monotonic()
    with Admin(d.admin_sock, timeout=120) as a:
        for name in names:
            a.call("volume.create", name=name, size=SCALE_VOLUME_SIZE)
    create_s = time.monotonic() - t0
    time.sleep(0.5)  # let anything the creates set off settle
    rss_created = d.rss_mib()

    d.restart()
    time.sleep(0.5)
    rss_restart = d.rss_mib()
    status = d.call("status")
    if status.get("volumes") != SCALE_VOLUMES:
        raise BenchError(f"after the restart splitd reports {status.get('volumes')} volumes, "
                         f"expected {SCALE_VOLUMES}")
    allocated = sum(v["allocated"] for v in d.call("volume.list")["volumes"])

    ctl = [str(SPLITCTL), "--socket", str(d.admin_sock)]

    def splitctl_list():
        cp = subprocess.run(ctl + ["volume", "list"], capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise BenchError(f"splitctl volume list exited {cp.returncode}: {cp.stderr.strip()}")
        if sum(1 for n in names if n in cp.stdout) != SCALE_VOLUMES:
            raise BenchError("splitctl volume list did not show every volume")

    def splitctl_version():
        subprocess.run(ctl + ["--version"], capture_output=True, check=True, timeout=60)

    def admin_round_trip():
        with Admin(d.admin_sock) as a:
            if len(a.call("volume.list")["volumes"]) != SCALE_VOLUMES:
                raise BenchError("volume.list did not return every volume")

    splitctl_list()  # warm the page cache for the interpreter and modules
    list_ms = timed_runs(splitctl_list, 10)
    version_ms = timed_runs(splitctl_version, 10)
    rtt_ms = timed_runs(admin_round_trip, 10)
    rss_after_lists = d.rss_mib()
    hwm = d.hwm_mib()

    list_med, rtt_med, ver_med = (statistics.median(x) for x in (list_ms, rtt_ms, version_ms))
    print(f"{SCALE_VOLUMES} volumes of {SCALE_VOLUME_SIZE}iB each (sparse) in {work}: "
          f"created in {create_s:.2f} s, {allocated / MiB:.1f} MiB allocated in all")
    print(f"  idle RSS, empty daemon          {rss_empty:6.1f} MiB")
    print(f"  idle RSS after creating them    {rss_created:6.1f} MiB   (target < {RSS_TARGET_MIB:.0f})"
          f"  {verdict(rss_created < RSS_TARGET_MIB)}")
    print(f"  idle RSS after a restart        {rss_restart:6.1f} MiB   (target < {RSS_TARGET_MIB:.0f})"
          f"  {verdict(rss_restart < RSS_TARGET_MIB)}")
    print(f"  RSS after the list runs         {rss_after_lists:6.1f} MiB   (VmHWM since restart "
          f"{hwm:.1f} MiB)")
    print(f"  splitctl volume list, median/10 {list_med:6.1f} ms    (target < {LIST_TARGET_MS:.0f})"
          f"  {verdict(list_med < LIST_TARGET_MS)}   [min {min(list_ms):.1f}, max {max(list_ms):.1f}]")
    print(f"  admin volume.list round trip    {rtt_med:6.2f} ms    (target < {LIST_TARGET_MS:.0f})"
          f"  {verdict(rtt_med < LIST_TARGET_MS)}   [in-process socket, connect+request+reply; "
          f"min {min(rtt_ms):.2f}, max {max(rtt_ms):.2f}]")
    print(f"  for scale: splitctl --version   {ver_med:6.1f} ms    (interpreter start-up alone)")
    return {
        "volumes": SCALE_VOLUMES, "volume_size": SCALE_VOLUME_SIZE,
        "create_s": round(create_s, 3), "allocated_bytes": allocated,
        "rss_empty_mib": round(rss_empty, 1),
        "rss_after_create_mib": round(rss_created, 1),
        "rss_after_restart_mib": round(rss_restart, 1),
        "rss_after_lists_mib": round(rss_after_lists, 1), "hwm_after_restart_mib": round(hwm, 1),
        "splitctl_list_ms": {"median": round(list_med, 2), "runs": [round(x, 2) for x in list_ms]},
        "admin_list_rtt_ms": {"median": round(rtt_med, 3), "runs": [round(x, 3) for x in rtt_ms]},
        "splitctl_version_ms": {"median": round(ver_med, 2)},
        "targets": {
            "rss_after_create": rss_created < RSS_TARGET_MIB,
            "rss_after_restart": rss_restart < RSS_TARGET_MIB,
            "splitctl_list": list_med < LIST_TARGET_MS,
            "admin_rtt": rtt_med < LIST_TARGET_MS,
        },
    }


# ---------------------------------------------------------------------------
# Pair sections: split latency, writes to paired primaries, the copy engine,
# the memory a pair costs.

SPLIT_ROUNDS = 100
SPLIT_P99_TARGET_MS = 1.0
PAIRED_WRITES_ROUNDS = 2
PAIRED_WRITES_TARGET = 0.7          # IOPS of a primary in `pair` / unpaired volume
COPY_ROUNDS = 2
COPY_ENGINE_TARGET = 0.8            # engine throughput / cp --sparse=always throughput
PAIR_MEMORY_TARGET_MIB = 16.0
PAIR_MEMORY_SIZE = "1T"
NOTHING_RATE = 1                    # bytes/s: the engine copies (next to) nothing


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


def wait_pair_state(a: Admin, name: str, state: str, timeout: float,
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


def split_all_pending(a: Admin, name: str) -> dict:
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


def runqueue_wait_ms(pid: int | str) -> float:
    """Time a process's main thread (or "thread-self") has spent runnable but
    waiting for a CPU (/proc/PID/schedstat, second field, ns), in ms; 0 where
    schedstats are off."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


def steal_seconds() -> float:
    """CPU time stolen by the hypervisor, all CPUs (/proc/stat, 8th field)."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def fmt_ms(x: float) -> str:
    return f"{x:7.3f}"


# -- section: split ----------------------------------------------------------------------------

def split_round_trips(ctx: Context, parent: str, hold_engine: bool = False) -> dict:
    """SPLIT_ROUNDS x (pair.split timed, pair.resync) on a fresh daemon in `parent`.

    With a sparse P the rate limit does not hold the engine back: a hole region
    costs no tokens, so it keeps punching holes in S at full speed. hold_engine
    writes 64 KiB of data at P's offset 0 first: the engine copies that region
    once its token bucket holds a byte, overdraws the bucket by 64 KiB, and then
    sleeps (at 1 B/s) for the rest of the run.
    """
    work = ctx.tempdir(parent, "splitd-bench-split.")
    d = Splitd(ctx, work).start()
    ctx.defer("splitd", d.stop)
    split_ms, resync_ms, pending, wait_ms = [], [], [], []
    with Admin(d.admin_sock, timeout=120) as a:
        a.call("volume.create", name="p", size="1T")
        a.call("volume.create", name="s", size="1T")
        if hold_engine:
            subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri={d.uri('p')}",
                            "--rw=write", "--bs=64k", "--size=64k", "--output=/dev/null"],
                           check=True, timeout=60, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL)
        created = a.call("pair.create", primary="p", secondary="s", rate=NOTHING_RATE)
        regions = created["regions"]
        # Past the engine's first second: held, it has taken its one region and
        # sleeps; not held, it has started on the holes.
        time.sleep(1.5)
        cpu0, t0, steal0 = cpu_seconds(d.pid) or 0.0, time.monotonic(), steal_seconds()
        for _ in range(SPLIT_ROUNDS):
            wait0 = runqueue_wait_ms(d.pid) + runqueue_wait_ms("thread-self")
            res, dt = a.call_timed("pair.split", name="s")
            wait_ms.append(runqueue_wait_ms(d.pid) + runqueue_wait_ms("thread-self") - wait0)
            if res["state"] != "split":
                raise BenchError(f"pair.split answered state {res['state']!r}")
            split_ms.append(dt * 1000)
            pending.append(res["pending"])
            _, dt = a.call_timed("pair.resync", name="s")
            resync_ms.append(dt * 1000)
        wall = time.monotonic() - t0
        cpu = (cpu_seconds(d.pid) or 0.0) - cpu0
        steal = steal_seconds() - steal0
        copied = a.call("pair.show", name="s")["copied_regions"]
    d.stop()
    # The split's time minus the time the daemon's main thread and this client
    # sat runnable but not running (another process had the CPU).
    own_ms = [max(0.0, t - w) for t, w in zip(split_ms, wait_ms, strict=True)]
    return {"data_dir": str(work / "data"), "engine_held": hold_engine, "regions": regions,
            "pending_min": min(pending), "pending_max": max(pending),
            "engine_copied_regions": copied,
            "p50_ms": round(percentile(split_ms, 50), 4),
            "p99_ms": round(percentile(split_ms, 99), 4),
            "max_ms": round(max(split_ms), 4), "mean_ms": round(statistics.mean(split_ms), 4),
            "first_ms": round(split_ms[0], 4),
            "own_p50_ms": round(percentile(own_ms, 50), 4),
            "own_p99_ms": round(percentile(own_ms, 99), 4),
            "own_max_ms": round(max(own_ms), 4),
            "runqueue_wait_over_0_5ms": sum(1 for w in wait_ms if w > 0.5),
            "runqueue_wait_ms": [round(x, 4) for x in wait_ms],
            "resync_p50_ms": round(percentile(resync_ms, 50), 3),
            "resync_max_ms": round(max(resync_ms), 3),
            "daemon_cpu_pct": round(100 * cpu / wall, 0) if wall else None,
            "steal_pct": round(100 * steal / wall / (os.cpu_count() or 1), 1) if wall else None,
            "split_ms": [round(x, 4) for x in split_ms]}


def section_split(ctx: Context) -> dict:
    print(f"pair of two 1 TiB volumes (P sparse, S existing: every region to copy), "
          f"rate {NOTHING_RATE} B/s; {SPLIT_ROUNDS} x (pair.split timed, pair.resync not timed);")
    print("time = admin round trip, one kept-open Unix socket, from send to the reply's end; "
          "first split 1.5 s after pair.create")
    out = {}
    variants = (("tmpfs", "/dev/shm", False, "tmpfs (/dev/shm)"),
                ("tmpfs_engine_held", "/dev/shm", True, "tmpfs, engine held (info)"),
                ("disk", "/var/tmp", False, "disk (/var/tmp)"))
    for key, parent, hold, what in variants:
        r = split_round_trips(ctx, parent, hold)
        out[key] = r
        line = (f"  {what:28s} p50 {fmt_ms(r['p50_ms'])} ms  p99 {fmt_ms(r['p99_ms'])} ms  "
                f"max {fmt_ms(r['max_ms'])} ms")
        if key == "tmpfs":
            ok = r["p99_ms"] < SPLIT_P99_TARGET_MS
            out["target_p99_ms"] = SPLIT_P99_TARGET_MS
            out["targets"] = {"p99": ok}
            line += f"   (target p99 < {SPLIT_P99_TARGET_MS:g} ms)  {verdict(ok)}"
        elif key == "disk":
            ok = r["p99_ms"] < SPLIT_P99_TARGET_MS
            r["targets"] = {"p99": ok}
            line += f"   (target p99 < {SPLIT_P99_TARGET_MS:g} ms, disk)  {verdict(ok)}"
        print(line)
        print(f"  {'':28s} first {r['first_ms']:.3f} ms, mean {r['mean_ms']:.3f} ms; resync p50 "
              f"{r['resync_p50_ms']:.1f} ms, max {r['resync_max_ms']:.1f} ms; daemon CPU "
              f"{r['daemon_cpu_pct']:.0f}% of a core; pending at the splits "
              f"{r['pending_min']}..{r['pending_max']} of {r['regions']}; engine copied "
              f"{r['engine_copied_regions']} regions")
        print(f"  {'':28s} minus run-queue waits of splitd and this client (another process "
              f"had the CPU; {r['runqueue_wait_over_0_5ms']} splits waited > 0.5 ms): p50 "
              f"{r['own_p50_ms']:.3f} ms, p99 {r['own_p99_ms']:.3f} ms, max {r['own_max_ms']:.3f} "
              f"ms; CPU steal {r['steal_pct']:.1f}%")
    if out["tmpfs"]["engine_copied_regions"] > 1:
        print(f"  note: at {NOTHING_RATE} B/s the engine still copied "
              f"{out['tmpfs']['engine_copied_regions']} regions of the sparse P (holes cost no "
              "rate tokens), so it was busy during the splits; 'engine held' = 64 KiB of data "
              "at P's start, which the engine copies once and then sleeps")
    return out


# -- section: paired-writes --------------------------------------------------------------------

def wait_drained(a: Admin, name: str, timeout: float) -> tuple[float, dict]:
    """Poll pair.show every 10 ms until the pair's diff is empty; (seconds, last show).
    On timeout returns the time waited and the last show (diff > 0)."""
    t0 = time.monotonic()
    while True:
        p = a.call("pair.show", name=name)
        if p["diff"] == 0 or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, p
        time.sleep(0.01)


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


PAIRED_WRITES_VARIANTS = (("tmpfs", "/dev/shm", "tmpfs (/dev/shm)"),
                          ("disk", "/var/tmp", "disk (/var/tmp)"))


PAIRED_WRITES_CASES = [("a", "unpaired", "unpaired volume"),
                       ("b", "pair", "primary, pair state (mirrored)"),
                       ("c", "split", "primary, split, every region pending")]


def paired_writes_run(ctx: Context, parent: str, image: Path, on_disk: bool) -> dict:
    """The three cases (a) unpaired, (b) primary in pair, (c) primary split with
    every region pending, on daemons whose data directories are in `parent`.
    on_disk: write back dirty pages (sync) after the fill and before each fio
    run, so that no run inherits another's writeback."""
    work = ctx.tempdir(parent, "splitd-bench-pw.")
    # (c) gets a daemon of its own: its pair, rate-limited to 1 B/s, overdraws its
    # token bucket on its first region and the engine then sleeps for hours
    # without waking for other pairs' work, which would stop b's mirroring.
    (work / "ab").mkdir()
    (work / "c").mkdir()
    d = Splitd(ctx, work / "ab").start()
    ctx.defer("splitd (a, b)", d.stop)
    dc = Splitd(ctx, work / "c").start()
    ctx.defer("splitd (c)", dc.stop)
    cases = PAIRED_WRITES_CASES
    sync_s: list[float] = []

    def settle():
        if on_disk:
            t0 = time.monotonic()
            os.sync()
            sync_s.append(time.monotonic() - t0)

    with Admin(d.admin_sock, timeout=120) as a, Admin(dc.admin_sock, timeout=120) as ac:
        admins = {"a": a, "b": a, "c": ac}
        daemons = {"a": d, "b": d, "c": dc}
        fill_s = 0.0
        for vol, _, _ in cases:
            admins[vol].call("volume.create", name=vol, size="1G")
            fill_s += nbd_fill(daemons[vol].uri(vol), image)
        ac.call("volume.create", name="c-s", size="1G")
        settle()
        a.call("pair.create", primary="b", secondary="b-s", create_secondary=True)
        ac.call("pair.create", primary="c", secondary="c-s", rate=NOTHING_RATE)
        copy_s, _ = wait_pair_state(a, "b-s", "pair", 600)
        seek_ms = tmpfs_seek_hole_ms(Path(a.call("volume.show", name="a")["path"]))
        print(f"  three 1 GiB volumes in {work}, filled with random data through NBD "
              f"({fill_s:.1f} s); b's secondary created and copied ({copy_s:.1f} s), state "
              f"pair; c paired with an existing secondary at {NOTHING_RATE} B/s (second daemon)"
              + ("; sync before each run" if on_disk else ""))
        runs: dict[str, list[dict]] = {k: [] for k, _, _ in cases}
        for rnd in range(PAIRED_WRITES_ROUNDS):
            order = cases if rnd % 2 == 0 else cases[::-1]
            for vol, kind, _ in order:
                extra = {}
                if kind == "split":
                    before = split_all_pending(ac, "c-s")
                    extra["pending_before"] = before["pending"]
                elif kind == "pair":
                    before = a.call("pair.show", name="b-s")
                settle()
                fig = fio_run(daemons[vol].uri(vol), "randwrite", "4k", 16, ctx.rt)
                if kind == "split":
                    after = ac.call("pair.show", name="c-s")
                    extra.update({"copy_on_write": after["copy_on_write"] - before["copy_on_write"],
                                  "pending_after": after["pending"], "regions": after["regions"],
                                  "state_after": after["state"]})
                elif kind == "pair":
                    after = a.call("pair.show", name="b-s")
                    catch_s, caught = wait_drained(a, "b-s", 30)
                    extra.update({"state_after": after["state"], "diff_after": after["diff"],
                                  "engine_copied_regions":
                                      after["copied_regions"] - before["copied_regions"],
                                  "catch_up_s": round(catch_s, 2),
                                  "diff_after_catch_up": caught["diff"]})
                fig.update(extra)
                runs[vol].append(fig)
                ctx.note(f"{parent} round {rnd + 1} {vol}: {fig}")
    d.stop()
    dc.stop()
    shutil.rmtree(work, ignore_errors=True)   # room (and memory) for the next variant
    med = {k: statistics.median(r["iops"] for r in v) for k, v in runs.items()}
    return {"data_dir": str(work), "fill_s": round(fill_s, 2), "copy_s": round(copy_s, 2),
            "runs": runs, "median_iops": {k: round(v, 1) for k, v in med.items()},
            "ratio_pair_over_unpaired": round(med["b"] / med["a"] if med["a"] else 0.0, 3),
            "ratio_split_over_unpaired": round(med["c"] / med["a"] if med["a"] else 0.0, 4),
            "seek_hole_ms": round(seek_ms, 2),
            "sync_before_runs_s": [round(x, 2) for x in sync_s]}


def print_paired_writes(r: dict, where: str) -> bool:
    runs, med = r["runs"], r["median_iops"]
    for vol, _kind, label in PAIRED_WRITES_CASES:
        rr = runs[vol]
        each = ", ".join(f"{x['iops']:.0f}" for x in rr)
        p50 = statistics.median(x["clat_p50_us"] for x in rr)
        p99 = statistics.median(x["clat_p99_us"] for x in rr)
        print(f"  ({vol}) {label:38s} {med[vol]:8.0f} IOPS  [{each}]  "
              f"clat p50 {p50:8.0f} us  p99 {p99:8.0f} us")
    ratio_b, ratio_c = r["ratio_pair_over_unpaired"], r["ratio_split_over_unpaired"]
    ok = ratio_b >= PAIRED_WRITES_TARGET
    print(f"  {where}: (b)/(a) = {ratio_b:.2f}   (target >= {PAIRED_WRITES_TARGET:g})  "
          f"{verdict(ok)}")
    print(f"  {where}: (c)/(a) = {ratio_c:.3f}  (for information)")
    rb, rc = runs["b"], runs["c"]
    print(f"  (b) per run: the engine copied {', '.join(str(x['engine_copied_regions']) for x in rb)}"
          f" regions during the run; diff at the end {', '.join(str(x['diff_after']) for x in rb)}"
          f" of 16384; caught up in {', '.join(format(x['catch_up_s'], '.2f') for x in rb)} s")
    if any(x["diff_after_catch_up"] for x in rb):
        print(f"  note: the mirror did not catch up within 30 s: diff still "
              f"{', '.join(str(x['diff_after_catch_up']) for x in rb)}")
    print(f"  (c) per run: {', '.join(str(x['copy_on_write']) for x in rc)} copy-on-write "
          f"regions (of {rc[0]['regions']}, {', '.join(str(x['pending_before']) for x in rc)} "
          f"pending at the split); still pending at the end "
          f"{', '.join(str(x['pending_after']) for x in rc)}")
    return ok


def section_paired_writes(ctx: Context) -> dict:
    for tool in ("fio", "nbdcopy"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    need_free("/dev/shm", 7, "a random image, three 1 GiB primaries and two secondaries")
    need_free("/var/tmp", 5.5, "the on-disk variant: three 1 GiB primaries and two secondaries")
    img_dir = ctx.tempdir("/dev/shm", "splitd-bench-pw-img.")
    image = img_dir / "fill.img"
    make_random_image(image, GiB)
    print(f"fio randwrite bs=4k qd=16, {ctx.rt} s each, no ramp; {PAIRED_WRITES_ROUNDS} "
          "rounds, order reversed every other round; median IOPS; after each (b) run, "
          "wait for the mirror to catch up (diff = 0, at most 30 s); on tmpfs, then the same "
          "on disk in the same run")
    out: dict = {"rt_s": ctx.rt, "rounds": PAIRED_WRITES_ROUNDS,
                 "target_ratio_pair": PAIRED_WRITES_TARGET}
    for key, parent, where in PAIRED_WRITES_VARIANTS:
        print(f"{where}:")
        r = paired_writes_run(ctx, parent, image, on_disk=(key == "disk"))
        ok = print_paired_writes(r, where)
        r["targets"] = {"pair_over_unpaired": ok}
        out[key] = r
        if key == "tmpfs":
            print(f"  for (c): one SEEK_HOLE from offset 0 of a fully written 1 GiB tmpfs file "
                  f"takes {r['seek_hole_ms']:.1f} ms here (tmpfs walks its pages to the first "
                  "hole)")
        else:
            print(f"  sync before each run took {', '.join(f'{x:.2f}' for x in r['sync_before_runs_s'])} s"
                  " (not timed in the runs)")
    image.unlink()
    # The section's figures and targets are tmpfs's, as before (also under "tmpfs");
    # the disk's figures and verdicts are under "disk".
    t = out.pop("tmpfs")
    out.update({k: t[k] for k in ("runs", "median_iops", "ratio_pair_over_unpaired",
                                  "ratio_split_over_unpaired", "targets")})
    out["tmpfs_seek_hole_ms"] = t["seek_hole_ms"]
    out["tmpfs"] = t
    return out


# -- section: copy-engine ----------------------------------------------------------------------

def wait_bitmap_clear(path: Path, timeout: float, poll: float = 0.01) -> None:
    """Poll a pair's bitmap file until every bit in it is clear, then fdatasync
    it. The daemon clears a bit in the file only after the region's copy is
    fdatasync'ed on both volumes (write-intent rule), so a clear file means a
    durable copy; the fdatasync here covers the daemon's own sync of the
    bitmap, a few ms later."""
    t0 = time.monotonic()
    while True:
        try:
            with open(path, "rb") as f:
                if not any(f.read()):
                    os.fdatasync(f.fileno())
                    return
        except FileNotFoundError:
            raise BenchError(f"bitmap file {path} not found (data directory layout "
                             "changed? see controller/pairs.py PairStore._path)") from None
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"{path} still has bits set after {timeout:.0f} s")
        time.sleep(poll)


def copy_rounds(ctx: Context, a: Admin, d: Splitd, src_path: Path, scratch: Path,
                rounds: int, keep_last: bool, sync_first: bool = False
                ) -> tuple[list[float], list[float], list[float], list[float], str | None]:
    """Rounds of two timed copies of src's backing file, in turn (the order
    reversed every other round): `cp --sparse=always SRC DST && sync --data DST`
    (fdatasync of the copy), and a pair.create --create-secondary of src,
    timed until state pair and until the copy is durable: the pair's diff
    bitmap file all clear (see wait_bitmap_clear). State pair alone does not
    say the copy is durable: the engine clears bits in memory, and the daemon
    syncs the volumes and writes the clears to the file later (lazily).
    Returns (cp alone, cp + sync, engine to state pair, engine to durable)
    seconds per round and, with keep_last, the name of the last secondary,
    which stays, unpaired. Each copy is checked with cmp, then dropped.
    sync_first (on disk): write back dirty pages before each timed copy, so
    neither inherits the other's writeback."""
    cp_s, cp_sync_s, engine_s, durable_s = [], [], [], []
    kept = None

    def run_cp():
        dst = scratch / "cp-copy.img"
        if sync_first:
            os.sync()
        t0 = time.monotonic()
        subprocess.run(["cp", "--sparse=always", src_path, dst], check=True, timeout=300)
        t1 = time.monotonic()
        subprocess.run(["sync", "--data", dst], check=True, timeout=300)
        t2 = time.monotonic()
        cp_s.append(t1 - t0)
        cp_sync_s.append(t2 - t0)
        if subprocess.run(["cmp", "-s", src_path, dst], timeout=300).returncode != 0:
            raise BenchError(f"cp's copy {dst} differs from {src_path}")
        dst.unlink()

    def run_engine(rnd):
        nonlocal kept
        name = f"eng{rnd}"
        if sync_first:
            os.sync()
        t0 = time.monotonic()
        a.call("pair.create", primary="src", secondary=name, create_secondary=True)
        _, shown = wait_pair_state(a, name, "pair", 600)
        engine_s.append(time.monotonic() - t0)
        wait_bitmap_clear(d.data_dir / "pairs" / name / f"diff.{shown['generation']}.bm", 120)
        durable_s.append(time.monotonic() - t0)
        s_path = a.call("volume.show", name=name)["path"]
        if subprocess.run(["cmp", "-s", src_path, s_path], timeout=300).returncode != 0:
            raise BenchError(f"after the copy, secondary {name} differs from the primary")
        a.call("pair.delete", name=name)
        if keep_last and rnd == rounds - 1:
            kept = name
        else:
            a.call("volume.delete", name=name)

    for rnd in range(rounds):
        if rnd % 2 == 0:
            run_cp()
            run_engine(rnd)
        else:
            run_engine(rnd)
            run_cp()
        ctx.note(f"{scratch}: round {rnd + 1}: cp {cp_s[-1]:.3f} s, cp+sync "
                 f"{cp_sync_s[-1]:.3f} s, engine {engine_s[-1]:.3f} s to pair, "
                 f"{durable_s[-1]:.3f} s to durable")
    return cp_s, cp_sync_s, engine_s, durable_s, kept


def print_copy(where: str, cp_s: list[float], cp_sync_s: list[float],
               engine_s: list[float], durable_s: list[float]) -> dict:
    """The cp / cp+sync / engine lines and the verdict; returns the figures.
    The target compares the durable copies: cp + sync vs engine to durable."""
    cp_med, cps_med, eng_med, dur_med = (statistics.median(x) for x in
                                         (cp_s, cp_sync_s, engine_s, durable_s))
    ratio = cps_med / dur_med if dur_med else 0.0
    ratio_pair = cps_med / eng_med if eng_med else 0.0
    ok = ratio >= COPY_ENGINE_TARGET

    def line(label, med, runs, note=""):
        print(f"  {label:34s} {med:6.2f} s  {1024 / med:7.0f} MiB/s   "
              f"[{', '.join(f'{x:.2f}' for x in runs)}]{note}")
    line("cp --sparse=always (alone)", cp_med, cp_s, "  (not durable: information)")
    line("cp --sparse=always && sync --data", cps_med, cp_sync_s, "  (durable)")
    line("copy engine, to state pair", eng_med, engine_s, "  (not yet durable: information)")
    line("copy engine, to durable", dur_med, durable_s, "  (diff bitmap file all clear)")
    print(f"  {where}: engine durable/(cp+sync) = {ratio:.2f}   (target >= "
          f"{COPY_ENGINE_TARGET:g})  {verdict(ok)}")
    print(f"  {where}: for information: engine to pair/(cp+sync) = {ratio_pair:.2f}, "
          f"engine to pair/cp alone = {cp_med / eng_med if eng_med else 0:.2f}")
    return {"cp_s": [round(x, 3) for x in cp_s], "cp_sync_s": [round(x, 3) for x in cp_sync_s],
            "engine_pair_s": [round(x, 3) for x in engine_s],
            "engine_durable_s": [round(x, 3) for x in durable_s],
            "cp_mib_s": round(1024 / cp_med, 1), "cp_sync_mib_s": round(1024 / cps_med, 1),
            "engine_pair_mib_s": round(1024 / eng_med, 1),
            "engine_durable_mib_s": round(1024 / dur_med, 1),
            "ratio_engine_durable_over_cp_sync": round(ratio, 3),
            "ratio_engine_pair_over_cp_sync": round(ratio_pair, 3),
            "ratio_engine_pair_over_cp": round(cp_med / eng_med if eng_med else 0.0, 3),
            "targets": {"engine_durable_over_cp_sync": ok}}


def filled_source(a: Admin, d: Splitd, image: Path) -> tuple[Path, float]:
    src = a.call("volume.create", name="src", size="1G")
    fill_s = nbd_fill(d.uri("src"), image)
    src_path = Path(src["path"])
    if not src_path.is_file() or src_path.stat().st_blocks * 512 < GiB:
        raise BenchError(f"{src_path} is not the filled 1 GiB backing file of volume src")
    return src_path, fill_s


def section_copy_engine(ctx: Context) -> dict:
    for tool in ("fio", "nbdcopy", "cmp"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    need_free("/dev/shm", 5.5, "a random image, a primary, cp's copy and the secondaries")
    need_free("/var/tmp", 4, "the on-disk comparison: a primary, cp's copy and a secondary")
    work = ctx.tempdir("/dev/shm", "splitd-bench-copy.")
    disk = ctx.tempdir("/var/tmp", "splitd-bench-copy.")
    image = work / "fill.img"
    make_random_image(image, GiB)
    d = Splitd(ctx, work).start()
    ctx.defer("splitd", d.stop)
    dd = Splitd(ctx, disk).start()
    ctx.defer("splitd (disk)", dd.stop)
    with Admin(d.admin_sock, timeout=120) as a, Admin(dd.admin_sock, timeout=120) as ad:
        src_path, fill_s = filled_source(a, d, image)
        disk_src_path, _ = filled_source(ad, dd, image)
        image.unlink()
        os.sync()   # the disk primary's fill is written back before anything is timed
        seek_ms = tmpfs_seek_hole_ms(src_path)
        print(f"1 GiB primary filled with random data through NBD ({fill_s:.1f} s); "
              f"{COPY_ROUNDS} rounds of: cp --sparse=always of its backing file then sync "
              "--data (fdatasync) of the copy, and pair.create --create-secondary (unlimited "
              "rate) until state pair (pair.show every 10 ms) and on until its copy is durable "
              "(diff bitmap file all clear, read every 10 ms), in turn; both within the same "
              "file system; copies checked with cmp")
        print("tmpfs (/dev/shm):")
        tmpfs_runs = copy_rounds(ctx, a, d, src_path, work, COPY_ROUNDS, keep_last=True)
        last = tmpfs_runs[-1]
        tmpfs = print_copy("tmpfs", *tmpfs_runs[:-1])
        print(f"  (one SEEK_HOLE from offset 0 of the filled tmpfs file: {seek_ms:.1f} ms; tmpfs "
              "walks its pages to the first hole)")
        print(f"disk ({disk}; sync before each copy, not timed):")
        disk_runs = copy_rounds(ctx, ad, dd, disk_src_path, disk, COPY_ROUNDS,
                                keep_last=False, sync_first=True)
        on_disk = print_copy("disk", *disk_runs[:-1])
        dd.stop()

        # Copy-on-read: reads of a split secondary whose every region is pending,
        # against reads of an unpaired volume with the same data (the last copy).
        a.call("volume.create", name="cor-s", size="1G")
        a.call("pair.create", primary="src", secondary="cor-s", rate=NOTHING_RATE,
               read_policy="copy-on-read")
        before = split_all_pending(a, "cor-s")
        print(f"random 4 KiB reads, fio randread bs=4k qd=1, {ctx.rt} s each, no ramp:")
        unpaired = fio_run(d.uri(last), "randread", "4k", 1, ctx.rt)
        cor = fio_run(d.uri("cor-s"), "randread", "4k", 1, ctx.rt)
        after = a.call("pair.show", name="cor-s")
        cor["copy_on_read"] = after["copy_on_read"] - before["copy_on_read"]
        cor["pending_before"] = before["pending"]
        cor["pending_after"] = after["pending"]
        cor["regions"] = after["regions"]
        for label, f in (("unpaired volume", unpaired),
                         ("split S, copy-on-read, all pending", cor)):
            print(f"  {label:36s} clat p50 {f['clat_p50_us']:8.1f} us  p99 "
                  f"{f['clat_p99_us']:8.1f} us  (mean {f['clat_mean_us']:.1f}, max "
                  f"{f['clat_max_us']:.0f}; {f['iops']:.0f} IOPS)")
        frac = cor["copy_on_read"] / cor["ios"] if cor["ios"] else 0.0
        print(f"  the copy-on-read run: {cor['ios']} reads, {cor['copy_on_read']} of them copied "
              f"a region first ({100 * frac:.0f}%); pending {cor['pending_before']} at the "
              f"split, {cor['pending_after']} at the end, of {cor['regions']} regions")

    return {"rt_s": ctx.rt, "fill_s": round(fill_s, 2), **tmpfs,
            "target_ratio": COPY_ENGINE_TARGET,
            "tmpfs_seek_hole_ms": round(seek_ms, 2),
            "disk": on_disk,
            "randread_unpaired": unpaired, "randread_copy_on_read": cor,
            "copy_on_read_fraction": round(frac, 3)}


# -- section: pair-memory ----------------------------------------------------------------------

def memory_mib(pid: int) -> dict:
    return {k: round((proc_status_kib(pid, k) or 0) / 1024, 2)
            for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")}


def section_pair_memory(ctx: Context) -> dict:
    work = ctx.tempdir("/var/tmp", "splitd-bench-mem.")
    d = Splitd(ctx, work).start()
    ctx.defer("splitd", d.stop)
    settle = 1.0
    steps = []
    with Admin(d.admin_sock, timeout=120) as a:
        a.call("volume.create", name="p", size=PAIR_MEMORY_SIZE)
        a.call("volume.create", name="s", size=PAIR_MEMORY_SIZE)
        time.sleep(settle)
        steps.append(("two volumes, unpaired", memory_mib(d.pid)))
        p = a.call("pair.create", primary="p", secondary="s", rate=NOTHING_RATE)
        time.sleep(settle)
        steps.append(("after pair.create", memory_mib(d.pid)))
        p = a.call("pair.split", name="s")
        time.sleep(settle)
        steps.append(("after pair.split", memory_mib(d.pid)))
        p = a.call("pair.show", name="s")
    base = steps[0][1]["VmRSS"]
    print(f"two {PAIR_MEMORY_SIZE}iB volumes in {work} (disk), region size "
          f"{p['region_size'] // 1024} KiB = {p['regions']} regions; pair with the existing "
          f"secondary at {NOTHING_RATE} B/s ({p['pending']} pending after the split); "
          f"RSS {settle:g} s after each step, in MiB:")
    print(f"  {'':24s} {'VmRSS':>7s} {'anon':>7s} {'file':>7s} {'shmem':>7s} {'HWM':>7s} "
          f"{'delta':>7s}")
    for label, m in steps:
        print(f"  {label:24s} {m['VmRSS']:7.1f} {m['RssAnon']:7.1f} {m['RssFile']:7.1f} "
              f"{m['RssShmem']:7.1f} {m['VmHWM']:7.1f} {m['VmRSS'] - base:+7.1f}")
    deltas = {"create": steps[1][1]["VmRSS"] - base, "split": steps[2][1]["VmRSS"] - base}
    worst = max(deltas.values())
    ok = worst < PAIR_MEMORY_TARGET_MIB
    hwm_delta = steps[2][1]["VmHWM"] - base
    print(f"  RSS delta (worst of create, split) {worst:+.2f} MiB   (target < "
          f"{PAIR_MEMORY_TARGET_MIB:g} MiB)  {verdict(ok)}   [peak (VmHWM) {hwm_delta:+.1f} MiB]")
    return {"size": PAIR_MEMORY_SIZE, "regions": p["regions"], "region_size": p["region_size"],
            "steps": {label: m for label, m in steps},
            "rss_delta_mib": {k: round(v, 2) for k, v in deltas.items()},
            "hwm_delta_mib": round(hwm_delta, 1),
            "target_mib": PAIR_MEMORY_TARGET_MIB, "targets": {"rss_delta": ok}}


# ---------------------------------------------------------------------------
# Sections and the driver

@dataclass
class Section:
    name: str
    title: str
    run: Callable[[Context], dict]


SECTIONS = [
    Section("foundation", "splitd vs nbdkit vs qemu-nbd on tmpfs (fio over NBD)",
            section_foundation),
    Section("scale", f"idle scale: {SCALE_VOLUMES} sparse {SCALE_VOLUME_SIZE}iB volumes",
            section_scale),
    Section("split", "split acknowledgment latency, 1 TiB pair, every region pending",
            section_split),
    Section("paired-writes", "4 KiB random writes: unpaired vs primary in pair vs in split",
            section_paired_writes),
    Section("copy-engine", "copy engine vs cp --sparse=always + sync; copy-on-read read latency",
            section_copy_engine),
    Section("pair-memory", f"daemon RSS of a {PAIR_MEMORY_SIZE}iB pair (64 KiB regions)",
            section_pair_memory),
]


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="splitd benchmarks", epilog="sections: " + ", ".join(
        s.name for s in SECTIONS))
    ap.add_argument("--only", metavar="A,B", help="run only these sections, in the usual order")
    ap.add_argument("--rt", type=int, default=None,
                    help="seconds per fio workload (default: $RT, else 6)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    ap.add_argument("--builtin-referee", action="store_true",
                    help="use the built-in copy of compare.sh's logic even when the script exists")
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="say what is happening")
    args = ap.parse_args(argv)

    if args.list:
        for s in SECTIONS:
            print(f"{s.name:12s} {s.title}")
        return 0
    chosen = SECTIONS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in SECTIONS}]
        if unknown:
            ap.error(f"unknown section(s): {', '.join(unknown)} "
                     f"(known: {', '.join(s.name for s in SECTIONS)})")
        chosen = [s for s in SECTIONS if s.name in wanted]
    rt = args.rt if args.rt is not None else int(os.environ.get("RT") or 6)
    if rt < 1:
        ap.error("--rt must be at least 1")
    if not SPLITD.exists():
        print(f"{SPLITD} not found: run `make venv` first", file=sys.stderr)
        return 2

    install_signal_handlers()
    env = environment()
    print(f"splitd bench  {env['date']}  commit {env['commit']}"
          f"{' (+local changes)' if env['worktree_modified'] else ''}  {env['splitd']}  "
          f"{env['cpus']} CPUs  kernel {env['kernel']}  load {env['loadavg_at_start']}")
    report = {"environment": env, "rt_s": rt, "sections": {}}
    failed = []
    interrupted = False
    for s in chosen:
        print(f"\n== {s.name}: {s.title}  (load average {loadavg()})")
        ctx = Context(rt, args.verbose, args.builtin_referee)
        t0 = time.monotonic()
        try:
            report["sections"][s.name] = s.run(ctx)
        except KeyboardInterrupt:
            print(f"\ninterrupted during {s.name}; cleaning up", file=sys.stderr)
            report["sections"][s.name] = {"error": "interrupted"}
            interrupted = True
        except (BenchError, AdminError, OSError, subprocess.SubprocessError) as e:
            print(f"{s.name}: ERROR: {e}", file=sys.stderr)
            report["sections"][s.name] = {"error": str(e)}
            failed.append(s.name)
        finally:
            ctx.cleanup()
        report["sections"][s.name]["elapsed_s"] = round(time.monotonic() - t0, 1)
        report["sections"][s.name]["loadavg_after"] = loadavg()
        print(f"-- {s.name}: {time.monotonic() - t0:.0f} s; load average now {loadavg()}")
        if interrupted:
            break

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
