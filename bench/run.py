#!/usr/bin/env python3
"""splitd benchmarks: `make bench`, or `.venv/bin/python bench/run.py [options]`.

Sections (run in this order; pick some with --only a,b):
  foundation  splitd vs nbdkit (file plugin) vs qemu-nbd on tmpfs, four fio
              workloads, interleaved, with splitd's CPU time and peak RSS.
              Uses the referee script ../shared/bench/compare.sh when present,
              otherwise an equivalent built in here.
  scale       100 sparse 1 TiB volumes on an idle daemon: RSS after creation
              and after a restart, and how long `splitctl volume list` takes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, **params):
        self.next_id += 1
        line = json.dumps({"id": self.next_id, "method": method, "params": params})
        self.sock.sendall(line.encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise AdminError(f"admin socket closed during {method}")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(raw)
        if "error" in reply:
            err = reply["error"]
            raise AdminError(f"{method}: {err.get('code')}: {err.get('message')}")
        return reply["result"]


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

    def start(self, timeout: float = 30.0) -> "Splitd":
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

    def restart(self) -> "Splitd":
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


def run_referee(ctx: Context, uri: str, image: Path, workdir: Path, watch_pid: int) -> tuple[list[str], CpuWatch]:
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


def run_builtin(ctx: Context, uri: str, image: Path, workdir: Path, watch_pid: int) -> tuple[list[str], CpuWatch]:
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
        print(f"\n== {s.name}: {s.title}")
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
