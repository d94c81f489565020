"""instant-restore: how soon a snapshot restored with `splitctl backup
restore --instant` can be read, whatever its size (target < 1 s from the
command to the first read answered), for a 1 GiB snapshot full of data and a
1 TiB sparse one; and how fast the background restore of the 1 GiB one
runs, beside a plain `backup restore --to-volume --create` of it.

Each round runs the command as a process (Python start-up included), then
connects with libnbd and reads 4 KiB of a region not yet restored (its chunk
is fetched from the store: copy-on-read), and deletes the volume again.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

from benchkit import SPLITCTL, BenchError, BenchSplitd, Context, Section, verdict

from sections.backup import timed, write_primary

MiB = 1 << 20
GiB = 1 << 30
ROUNDS = 3
READY_TARGET_S = 1.0
SPARSE_SIZE = 1 << 40
SPARSE_DATA = [i * 16 * GiB for i in range(64)]     # 1 MiB at each: 64 MiB in 1 TiB


def _ready_once(d: BenchSplitd, env: dict, store: str, sid: str, name: str, offset: int) -> dict:
    import nbd
    t0 = time.monotonic()
    cp = subprocess.run([SPLITCTL, "backup", "restore", sid, "--from", store, "--to-volume", name,
                         "--instant", "--json"], capture_output=True, text=True, env=env,
                        timeout=300, stdin=subprocess.DEVNULL)
    t_cmd = time.monotonic() - t0
    if cp.returncode != 0:
        raise BenchError(f"backup restore --instant exited {cp.returncode}: "
                         f"{(cp.stdout + cp.stderr).strip()[-500:]}")
    h = nbd.NBD()
    h.connect_uri(d.uri(name))
    h.pread(4096, offset)
    t_read = time.monotonic() - t0
    h.shutdown()
    return {"command_s": t_cmd, "first_read_s": t_read,
            "regions": json.loads(cp.stdout)["remaining"]}


def _drop(d: BenchSplitd, name: str) -> None:
    with d.admin(timeout=120) as a:
        if name in a.call("status")["pairs"]:
            a.call("pair.delete", name=name, force=True)
        a.call("volume.delete", name=name, force=True)


def _background(d: BenchSplitd, env: dict, store: str, sid: str, size: int) -> dict:
    """The whole 1 GiB restored in the background, unthrottled: seconds, MiB/s."""
    t0 = time.monotonic()
    subprocess.run([SPLITCTL, "backup", "restore", sid, "--from", store, "--to-volume", "bg",
                    "--instant", "--wait", "--interval", "0.1", "--json"], check=True,
                   capture_output=True, env=env, timeout=1800, stdin=subprocess.DEVNULL)
    s = time.monotonic() - t0
    _drop(d, "bg")
    return {"s": round(s, 2), "mib_s": round(size / MiB / s, 1)}


def section_instant_restore(ctx: Context) -> dict:
    work = ctx.tempdir("/var/tmp", "splitd-bench-instant.")
    (work / "d").mkdir()
    d = BenchSplitd(ctx, work / "d").start()
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(d.admin_socket))
    out: dict = {"rounds": ROUNDS, "target_s": READY_TARGET_S, "images": {}}
    with d.admin(timeout=300) as a:
        a.call("volume.create", name="dense", size=GiB)
        written = write_primary(d.uri("dense"), GiB)
        a.call("volume.create", name="sparse", size=SPARSE_SIZE)
    import nbd
    h = nbd.NBD()
    h.connect_uri(d.uri("sparse"))
    for off in SPARSE_DATA:
        h.pwrite(os.urandom(MiB), off)
    h.flush()
    h.shutdown()
    images = {}
    for name, first_data in (("dense", 0), ("sparse", SPARSE_DATA[1])):
        store = str(work / f"store-{name}")
        subprocess.run([SPLITCTL, "backup", "init", store], check=True, capture_output=True,
                       timeout=60)
        cp = subprocess.run([SPLITCTL, "backup", "run", "--volume", d.uri(name), "--to", store,
                             "--json"], check=True, capture_output=True, text=True, env=env,
                            timeout=1800)
        images[name] = (store, json.loads(cp.stdout)["snapshot"], first_data)
    rounds: dict[str, list[dict]] = {n: [] for n in images}
    for i in range(ROUNDS):                 # interleaved: dense, sparse, dense, ...
        for name, (store, sid, first_data) in images.items():
            rounds[name].append(_ready_once(d, env, store, sid, f"{name}-r{i}", first_data))
            _drop(d, f"{name}-r{i}")
    store, sid, _ = images["dense"]
    background = _background(d, env, store, sid, GiB)
    plain = timed(ctx, "backup restore --to-volume --create",
                  [SPLITCTL, "backup", "restore", sid, "--from", store, "--to-volume", "plain",
                   "--create", "--json"], env=env, daemon_pid=d.pid)
    _drop(d, "plain")
    ok = True
    print(f"  command to first 4 KiB read answered, {ROUNDS} interleaved rounds (median, max):")
    for name, rs in rounds.items():
        med = statistics.median(r["first_read_s"] for r in rs)
        worst = max(r["first_read_s"] for r in rs)
        cmd = statistics.median(r["command_s"] for r in rs)
        size = GiB if name == "dense" else SPARSE_SIZE
        good = worst < READY_TARGET_S
        ok = ok and good
        print(f"  {name:6s} {size // GiB:5d} GiB, {rs[0]['regions']:6d} regions to restore: "
              f"{med * 1000:6.0f} ms, {worst * 1000:6.0f} ms (the command alone {cmd * 1000:.0f} "
              f"ms)  target < {READY_TARGET_S:g} s  {verdict(good)}")
        out["images"][name] = {"size": size, "rounds": rs, "median_s": round(med, 3),
                               "max_s": round(worst, 3)}
    print(f"  background restore of the 1 GiB, unthrottled: {background['s']} s "
          f"({background['mib_s']} MiB/s); plain backup restore --to-volume: {plain['s']:.1f} s "
          f"({GiB / MiB / plain['s']:.0f} MiB/s)")
    out.update(background=background, plain_restore_s=round(plain["s"], 2), written=written,
               targets={"ready": ok})
    return out


SECTION = Section("instant-restore", "instant restore: readable within 1 s of the command",
                  section_instant_restore)
