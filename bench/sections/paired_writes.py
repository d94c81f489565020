"""paired-writes: fio 4 KiB randwrite qd16 on an unpaired volume, a primary in
`pair` and a primary split with every region pending (interleaved rounds,
median): target pair/unpaired >= 0.7, on tmpfs, then on /var/tmp (disk, sync
before each run; its own verdict).
"""
from __future__ import annotations

import os
import shutil
import statistics
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

PAIRED_WRITES_ROUNDS = 2
PAIRED_WRITES_TARGET = 0.7          # IOPS of a primary in `pair` / unpaired volume


def wait_drained(a: AdminClient, name: str, timeout: float) -> tuple[float, dict]:
    """Poll pair.show every 10 ms until the pair's diff is empty; (seconds, last show).
    On timeout returns the time waited and the last show (diff > 0)."""
    t0 = time.monotonic()
    while True:
        p = a.call("pair.show", name=name)
        if p["diff"] == 0 or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, p
        time.sleep(0.01)


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
    d = BenchSplitd(ctx, work / "ab", "splitd (a, b)").start()
    dc = BenchSplitd(ctx, work / "c", "splitd (c)").start()
    cases = PAIRED_WRITES_CASES
    sync_s: list[float] = []

    def settle():
        if on_disk:
            t0 = time.monotonic()
            os.sync()
            sync_s.append(time.monotonic() - t0)

    with d.admin(timeout=120) as a, dc.admin(timeout=120) as ac:
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


SECTION = Section("paired-writes", "4 KiB random writes: unpaired vs primary in pair vs in split",
                  section_paired_writes)
