"""scale: 100 sparse 1 TiB volumes on an idle daemon: RSS after creation and
after a restart, and how long `splitctl volume list` takes.
"""
from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable

from benchkit import SPLITCTL, BenchError, BenchSplitd, Context, MiB, Section, verdict

# Targets of the idle-scale check.
SCALE_VOLUMES = 100
SCALE_VOLUME_SIZE = "1T"
RSS_TARGET_MIB = 80.0
LIST_TARGET_MS = 100.0


def timed_runs(fn: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def section_scale(ctx: Context) -> dict:
    work = ctx.tempdir("/var/tmp", "splitd-bench-scale.")
    d = BenchSplitd(ctx, work).start()
    rss_empty = d.rss_mib()

    names = [f"vol{i:03d}" for i in range(SCALE_VOLUMES)]
    t0 = time.monotonic()
    with d.admin(timeout=120) as a:
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

    ctl = [str(SPLITCTL), "--socket", str(d.admin_socket)]

    def splitctl_list():
        cp = subprocess.run(ctl + ["volume", "list"], capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise BenchError(f"splitctl volume list exited {cp.returncode}: {cp.stderr.strip()}")
        if sum(1 for n in names if n in cp.stdout) != SCALE_VOLUMES:
            raise BenchError("splitctl volume list did not show every volume")

    def splitctl_version():
        subprocess.run(ctl + ["--version"], capture_output=True, check=True, timeout=60)

    def admin_round_trip():
        with d.admin(timeout=30) as a:
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


SECTION = Section("scale", f"idle scale: {SCALE_VOLUMES} sparse {SCALE_VOLUME_SIZE}iB volumes",
                  section_scale)
