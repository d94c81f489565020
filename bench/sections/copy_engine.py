"""copy-engine: the copy engine (pair.create --create-secondary until `pair`, and
on until the copy is durable: the diff bitmap file all clear) vs `cp
--sparse=always SRC DST && sync --data DST` of the same 1 GiB: target (durable vs
durable) >= 0.8 on tmpfs, and the same on /var/tmp (disk, labelled verdict);
copy-on-read 4 KiB read latency (fio clat p50/p99) vs unpaired, on tmpfs.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchkit import (
    NOTHING_RATE,
    BenchError,
    BenchSplitd,
    Context,
    GiB,
    Section,
    fio_run,
    make_random_image,
    nbd_fill,
    need_free,
    split_all_pending,
    tmpfs_seek_hole_ms,
    verdict,
    wait_pair_state,
)

from splitctl.client import AdminClient

COPY_ROUNDS = 2
COPY_ENGINE_TARGET = 0.8            # engine throughput / cp --sparse=always throughput


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


def copy_rounds(ctx: Context, a: AdminClient, d: BenchSplitd, src_path: Path, scratch: Path,
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


def filled_source(a: AdminClient, d: BenchSplitd, image: Path) -> tuple[Path, float]:
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
    d = BenchSplitd(ctx, work).start()
    dd = BenchSplitd(ctx, disk, "splitd (disk)").start()
    with d.admin(timeout=120) as a, dd.admin(timeout=120) as ad:
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


SECTION = Section("copy-engine", "copy engine vs cp --sparse=always + sync; copy-on-read read latency",
                  section_copy_engine)
