"""foundation: splitd vs nbdkit (file plugin) vs qemu-nbd on tmpfs, four fio
workloads, interleaved, with splitd's CPU time and peak RSS. Uses the referee
script ../shared/bench/compare.sh when present, otherwise an equivalent built in here.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from benchkit import (
    REFEREE,
    BenchError,
    BenchSplitd,
    Context,
    CpuWatch,
    GiB,
    MiB,
    Section,
    cpu_seconds,
    fio_line,
    make_random_image,
    parse_table,
    ratio_table,
    wait_for,
)

# The referee's workloads: (fio --rw, --bs, --iodepth), in its order.
WORKLOADS = [("read", "1m", "8"), ("write", "1m", "8"),
             ("randread", "4k", "16"), ("randwrite", "4k", "16")]


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

    d = BenchSplitd(ctx, work).start()
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


SECTION = Section("foundation", "splitd vs nbdkit vs qemu-nbd on tmpfs (fio over NBD)",
                  section_foundation)
