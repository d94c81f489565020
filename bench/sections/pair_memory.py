"""pair-memory: daemon RSS with two 1 TiB volumes, then paired, then split:
target delta < 16 MiB.
"""
from __future__ import annotations

import time

from benchkit import NOTHING_RATE, BenchSplitd, Context, Section, proc_status_kib, verdict

PAIR_MEMORY_TARGET_MIB = 16.0
PAIR_MEMORY_SIZE = "1T"


def memory_mib(pid: int) -> dict:
    return {k: round((proc_status_kib(pid, k) or 0) / 1024, 2)
            for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")}


def section_pair_memory(ctx: Context) -> dict:
    work = ctx.tempdir("/var/tmp", "splitd-bench-mem.")
    d = BenchSplitd(ctx, work).start()
    settle = 1.0
    steps = []
    with d.admin(timeout=120) as a:
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


SECTION = Section("pair-memory", f"daemon RSS of a {PAIR_MEMORY_SIZE}iB pair (64 KiB regions)",
                  section_pair_memory)
