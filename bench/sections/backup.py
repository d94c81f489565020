"""backup: `splitctl backup` (agents/backup into agents/store) against Debian's
restic and borgbackup, and nbdcopy, on the same image, same run.

Data: a pair made on the bench daemon (tmpfs), its primary written through
NBD, mirrored, split; the secondary (default 4 GiB; --backup-size / $BACKUP_SIZE)
is, in 16 MiB stripes repeating data, hole, data, zero: one quarter holes
(never written), one quarter written zeroes, half the contents of /usr/lib's
regular files concatenated (repeated only if /usr/lib holds less than that;
how much is distinct is printed).

Every store, repository, image file and restore target is on one file system:
--backup-dir / $BACKUP_DIR, default /var/tmp (a disk; /dev/shm for tmpfs):
restic and borg cannot read NBD, so they get the image as a raw file there
(written by nbdcopy from the secondary's export; a sparse file: nbdcopy
writes zeroes as holes), while splitd reads the export.

Per round (--backup-rounds / $BACKUP_ROUNDS, default 1), in an order that
rotates from round to round, each into a fresh store: nbdcopy --flush URI FILE;
`splitctl backup run --pair`; `restic backup FILE` (compression auto, always
encrypted); `borg create` (--compression zstd,1, --encryption none, default
chunker); then `splitctl backup restore --to FILE` (its default check: the digest
of what it wrote; no read-back)
and `restic restore` (0.14: no --sparse; then `sync --data` of the file:
durable like splitd's, which fsyncs), interleaved. Then as many incrementals: 1% of
the regions written on the primary (4 KiB each), resync, split, `backup run`.
Times are wall-clock of the whole command (process start included), medians.

Targets: full backup >= 1.5x restic and >= 1.5x borg; incremental reads <=
delta + one region per delta extent and takes <= 5% of the full's time;
restore >= 1.5x restic restore; stored size <= restic's repository.
"""
from __future__ import annotations

import functools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchkit import (
    SPLITCTL,
    BenchError,
    BenchSplitd,
    Context,
    GiB,
    MiB,
    Section,
    cpu_seconds,
    need_free,
    verdict,
    wait_pair_state,
)

DAEMON_PARENT = "/dev/shm"
PEERS_PARENT = "/var/tmp"
DEFAULT_SIZE = 4 * GiB
STRIPE = 16 * MiB
PATTERN = ("data", "hole", "data", "zero")
CONTENT_DIR = "/usr/lib"
CHANGED_FRACTION = 0.01
FULL_RATIO_TARGET = 1.5
RESTORE_RATIO_TARGET = 1.5
INCR_TIME_TARGET = 0.05
CHUNK = 4 * MiB                     # the store's default chunk size (backup init)
PASSWORD = "splitd-bench"           # restic's repository password (it always encrypts)
TIMEOUT = 1800


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        n = int(float(t[:len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise BenchError(f"backup size {text!r} is not a size (like 256M or 4G)") from None
    if n < len(PATTERN) * STRIPE or n % (len(PATTERN) * STRIPE):
        raise BenchError(f"backup size {text!r} must be a multiple of "
                         f"{len(PATTERN) * STRIPE // MiB} MiB")
    return n


# ---------------------------------------------------------------------------
# The data

def content_stream(root: str) -> Iterator[bytes]:
    """The regular files under `root`, concatenated, in a fixed order, forever
    (the repeats start at an offset that is not chunk-aligned only by chance:
    the caller reports how much is distinct)."""
    while True:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    with open(p, "rb") as f:
                        while block := f.read(4 * MiB):
                            yield block
                except OSError:
                    continue
        yield b""                   # marks one pass through root


def write_primary(uri: str, size: int) -> dict:
    """The stripes into the export at `uri` through libnbd; what was written."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    stream = content_stream(CONTENT_DIR)
    buf = bytearray()
    distinct = 0
    passes = 0
    zero = bytes(4 * MiB)
    written = {"data": 0, "zero": 0, "hole": 0}

    def data(n: int) -> bytes:
        nonlocal buf, distinct, passes
        while len(buf) < n:
            block = next(stream)
            if not block:
                passes += 1
                if passes > 1000:
                    raise BenchError(f"{CONTENT_DIR} holds no readable files")
                continue
            if passes == 0:
                distinct += len(block)
            buf += block
        out = bytes(buf[:n])
        del buf[:n]
        return out

    t0 = time.monotonic()
    try:
        for i, off in enumerate(range(0, size, STRIPE)):
            kind = PATTERN[i % len(PATTERN)]
            written[kind] += STRIPE
            if kind == "hole":
                continue
            for o in range(off, off + STRIPE, 4 * MiB):
                h.pwrite(zero if kind == "zero" else data(4 * MiB), o)
        h.flush()
    finally:
        h.shutdown()
    return {**{f"{k}_bytes": v for k, v in written.items()},
            "distinct_content_bytes": min(distinct, written["data"]),
            "content_repeated": passes > 0, "write_s": round(time.monotonic() - t0, 1)}


def changed_regions(regions: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return sorted(rnd.sample(range(regions), max(1, round(regions * CHANGED_FRACTION))))


def extents(regions: list[int]) -> int:
    """Runs of consecutive region numbers."""
    return sum(1 for i, r in enumerate(regions) if i == 0 or regions[i - 1] != r - 1)


def write_changes(uri: str, regions: list[int], region_size: int, seed: int) -> None:
    import nbd
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for r in regions:
            h.pwrite(rnd.randbytes(4096), r * region_size + rnd.randrange(0, region_size, 4096))
        h.flush()
    finally:
        h.shutdown()


# ---------------------------------------------------------------------------
# Timed commands

def dir_bytes(path: Path) -> int:
    """Apparent size of every file under `path`."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def timed(ctx: Context, what: str, args: list, env: dict | None = None,
          daemon_pid: int | None = None, then: list | None = None) -> dict:
    """Run one command to the end (and `then`, a second one, in the same
    time): wall seconds, its CPU seconds (user+sys of it and its children),
    the daemon's CPU seconds meanwhile; its stdout."""
    subprocess.run(["sync"], check=False, timeout=600)     # earlier writes not billed here
    ctx.note(f"{what}: {' '.join(str(a) for a in args)}")
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    d0 = cpu_seconds(daemon_pid) if daemon_pid else None
    t0 = time.monotonic()
    cp = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT,
                        env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)
    if cp.returncode == 0 and then:
        subprocess.run([str(a) for a in then], check=True, timeout=TIMEOUT)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cp.returncode != 0:
        raise BenchError(f"{what} exited with status {cp.returncode}: "
                         f"{(cp.stderr or cp.stdout).strip()[-800:]}")
    out = {"s": wall, "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
           "stdout": cp.stdout}
    if d0 is not None:
        out["daemon_cpu_s"] = (cpu_seconds(daemon_pid) or 0.0) - d0
    return out


class Peers:
    """The commands of one comparison, each into a fresh target under `work`."""

    def __init__(self, ctx: Context, d: BenchSplitd, work: Path, image: Path, uri: str):
        self.ctx, self.d, self.work, self.image, self.uri = ctx, d, work, image, uri
        self.splitctl_env = {"SPLITD_ADMIN_SOCKET": str(d.admin_socket)}
        self.restic_env = {"RESTIC_PASSWORD": PASSWORD,
                           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        self.borg_env = {"BORG_BASE_DIR": str(work / "borg-base"),
                         "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                         "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def fresh(self, name: str) -> Path:
        p = self.work / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return p

    def nbdcopy(self) -> dict:
        out = self.fresh("nbdcopy.img")
        r = timed(self.ctx, "nbdcopy", ["nbdcopy", "--flush", self.uri, out],
                  daemon_pid=self.d.pid)
        if self.image.exists():
            out.unlink()
        else:
            out.rename(self.image)          # the first copy is restic's and borg's image
        return r

    def splitd(self) -> dict:
        store = self.fresh("splitd-store")
        subprocess.run([SPLITCTL, "backup", "init", store], check=True, timeout=60,
                       capture_output=True)
        r = timed(self.ctx, "splitctl backup run",
                  [SPLITCTL, "backup", "run", "--pair", "s", "--port", "unix", "--to", store,
                   "--json"], env=self.splitctl_env, daemon_pid=self.d.pid)
        r["result"] = json.loads(r.pop("stdout"))
        r["repo_bytes"] = dir_bytes(store)
        return r

    def restic(self) -> dict:
        repo = self.fresh("restic-repo")
        subprocess.run(["restic", "init", "--repo", repo], check=True, timeout=60,
                       capture_output=True, env=dict(os.environ, **self.restic_env))
        r = timed(self.ctx, "restic backup",
                  ["restic", "backup", "--repo", repo, "--json", "--quiet", self.image],
                  env=self.restic_env)
        r.pop("stdout")
        r["repo_bytes"] = dir_bytes(repo)
        return r

    def borg(self) -> dict:
        repo = self.fresh("borg-repo")
        subprocess.run(["borg", "init", "--encryption", "none", repo], check=True, timeout=60,
                       capture_output=True, env=dict(os.environ, **self.borg_env))
        r = timed(self.ctx, "borg create",
                  ["borg", "create", "--compression", "zstd,1", f"{repo}::full", self.image],
                  env=self.borg_env)
        r.pop("stdout")
        r["repo_bytes"] = dir_bytes(repo)
        return r

    def splitd_restore(self, snapshot: str) -> dict:
        out = self.fresh("splitd-restore.img")
        r = timed(self.ctx, "splitctl backup restore",
                  [SPLITCTL, "backup", "restore", snapshot, "--from", self.work / "splitd-store",
                   "--to", out, "--json"], env=self.splitctl_env)
        r.pop("stdout")
        out.unlink()
        return r

    def restic_restore(self) -> dict:
        target = self.fresh("restic-restore")
        r = timed(self.ctx, "restic restore",
                  ["restic", "restore", "--repo", self.work / "restic-repo",
                   "--target", target, "latest"], env=self.restic_env,
                  then=["sync", "--data", target / str(self.image).lstrip("/")])
        r.pop("stdout")
        restored = target / str(self.image).lstrip("/")
        if not restored.is_file() or restored.stat().st_size != self.image.stat().st_size:
            raise BenchError(f"restic restore did not write {restored} of the image's size")
        shutil.rmtree(target)
        return r


def med(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


# ---------------------------------------------------------------------------

def section_backup(ctx: Context) -> dict:
    size = parse_size(str(ctx.options.get("backup_size") or os.environ.get("BACKUP_SIZE")
                          or DEFAULT_SIZE))
    rounds = int(ctx.options.get("backup_rounds") or os.environ.get("BACKUP_ROUNDS") or 1)
    for tool in ("restic", "borg", "nbdcopy"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: run scripts/install-deps as root "
                             "(Debian packages restic, borgbackup, libnbd-bin)")
    need_free(DAEMON_PARENT, 2 * 0.75 * size / GiB + 0.5, "primary and secondary volumes")
    peers_parent = str(ctx.options.get("backup_dir") or os.environ.get("BACKUP_DIR")
                       or PEERS_PARENT)
    need_free(peers_parent, 5 * 0.5 * size / GiB + 1, "image, stores, repositories, restores")

    work_d = ctx.tempdir(DAEMON_PARENT, "splitd-bench-backup.")
    work = ctx.tempdir(peers_parent, "splitd-bench-backup.")
    d = BenchSplitd(ctx, work_d).start()
    a = d.admin(timeout=120)
    ctx.defer("admin connection", a.close)

    a.call("volume.create", name="p", size=size)
    data = write_primary(d.uri("p"), size)
    t0 = time.monotonic()
    a.call("pair.create", primary="p", secondary="s", create_secondary=True)
    wait_pair_state(a, "s", "pair", timeout=600, poll=0.1)
    mirror_s = time.monotonic() - t0
    pair = a.call("pair.split", name="s")
    region_size = size // pair["regions"]
    uri = d.uri("s")

    image = work / "image.raw"              # made by the first nbdcopy run (it runs first)
    print(f"{size / GiB:g} GiB secondary of a split pair (daemon on tmpfs {DAEMON_PARENT}), "
          f"{STRIPE // MiB} MiB stripes {'/'.join(PATTERN)}: "
          f"{data['data_bytes'] / GiB:g} GiB of {CONTENT_DIR} content "
          f"({data['distinct_content_bytes'] / GiB:.2f} GiB distinct"
          f"{', repeated' if data['content_repeated'] else ''}), "
          f"{data['zero_bytes'] / GiB:g} GiB written zeroes, {data['hole_bytes'] / GiB:g} GiB "
          f"holes; copy engine mirrored it in {mirror_s:.1f} s")
    print(f"stores, repositories, the image file and restores on {peers_parent} "
          f"({fs_type(peers_parent)}); restic "
          "and borg read the image as a file (nbdcopy of the export; they cannot read NBD); "
          f"{rounds} round(s), order rotated, medians; times are the whole command's wall clock")
    print("restic: default compression (auto), encrypted (always); borg: --compression zstd,1 "
          "--encryption none; splitd: store defaults (4 MiB chunks, zstd 1, not encrypted)")

    peers = Peers(ctx, d, work, image, uri)
    full_variants: dict[str, Callable[[], dict]] = {
        "nbdcopy": peers.nbdcopy, "splitd": peers.splitd, "restic": peers.restic,
        "borg": peers.borg}
    runs: dict[str, list[dict]] = {k: [] for k in (*full_variants, "splitd_restore",
                                                   "restic_restore")}
    names = list(full_variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            runs[name].append(full_variants[name]())
        snap = runs["splitd"][-1]["result"]["snapshot"]
        restores = [("splitd_restore", functools.partial(peers.splitd_restore, snap)),
                    ("restic_restore", peers.restic_restore)]
        for name, fn in (restores if r % 2 == 0 else restores[::-1]):
            runs[name].append(fn())
        if r + 1 < rounds:
            for name in ("restic-repo", "borg-repo"):
                peers.fresh(name)

    # Incrementals into the last round's store: its snapshot is the parent.
    incr = []
    for r in range(rounds):
        changed = changed_regions(pair["regions"], seed=r)
        write_changes(d.uri("p"), changed, region_size, seed=r)
        a.call("pair.resync", name="s")
        wait_pair_state(a, "s", "pair", timeout=600, poll=0.05)
        a.call("pair.split", name="s")
        before = d.export_read_bytes("s")
        t = timed(ctx, "splitctl backup run (incremental)",
                  [SPLITCTL, "backup", "run", "--pair", "s", "--port", "unix", "--to",
                   work / "splitd-store", "--incremental", "--json"],
                  env=peers.splitctl_env, daemon_pid=d.pid)
        res = json.loads(t.pop("stdout"))
        t.update(result=res, changed_regions=len(changed), delta_extents=extents(changed),
                 daemon_read_bytes=d.export_read_bytes("s") - before)
        incr.append(t)

    return report(size, rounds, data, region_size, runs, incr, peers_parent)


def fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (/proc/self/mounts)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def report(size: int, rounds: int, data: dict, region_size: int, runs: dict[str, list[dict]],
           incr: list[dict], peers_parent: str) -> dict:
    mb = size / 1e6

    def row(label: str, s: float, cpu: float, extra: str = "") -> None:
        print(f"  {label:34s} {s:8.2f} s  {mb / s:8.1f} MB/s  CPU {cpu:7.2f} s "
              f"({cpu / (size / GiB):5.2f} s/GiB){extra}")

    out: dict = {"size": size, "rounds": rounds, "data": data, "region_size": region_size,
                 "daemon_parent": DAEMON_PARENT, "peers_parent": peers_parent,
                 "peers_fs": fs_type(peers_parent),
                 "settings": {"restic": "compression auto (default), encrypted",
                              "borg": "--compression zstd,1 --encryption none",
                              "splitd": "4 MiB chunks, zstd 1, not encrypted"},
                 "note": "figures from a busy shared machine"}
    print(f"\n  full backup of {size / GiB:g} GiB (MB/s = image size / time)")
    fig = {}
    for k in ("nbdcopy", "splitd", "restic", "borg"):
        s, cpu = med(runs[k], "s"), med(runs[k], "cpu_s")
        extra = ""
        if "daemon_cpu_s" in runs[k][0]:
            extra += f"  daemon CPU {med(runs[k], 'daemon_cpu_s'):.2f} s"
        if "repo_bytes" in runs[k][0]:
            extra += f"  stored {med(runs[k], 'repo_bytes') / MiB:7.1f} MiB"
        label = {"nbdcopy": "nbdcopy --flush URI FILE",
                 "splitd": "splitctl backup run --pair",
                 "restic": "restic backup FILE", "borg": "borg create FILE"}[k]
        row(label, s, cpu, extra)
        fig[k] = {"s": round(s, 3), "mb_s": round(mb / s, 1), "cpu_s": round(cpu, 2),
                  "all_s": [round(r["s"], 3) for r in runs[k]]}
        for key in ("daemon_cpu_s", "repo_bytes"):
            if key in runs[k][0]:
                fig[k][key] = round(med(runs[k], key), 2)
    sp = runs["splitd"][-1]["result"]
    fig["splitd"]["agent"] = {k: sp[k] for k in ("bytes_read", "chunks_read", "chunks_zero",
                                                 "new_bytes", "stored_bytes", "connections",
                                                 "seconds")}
    out["full"] = fig
    t = {}
    r_restic = fig["restic"]["s"] / fig["splitd"]["s"]
    r_borg = fig["borg"]["s"] / fig["splitd"]["s"]
    t["full_vs_restic"] = r_restic >= FULL_RATIO_TARGET
    t["full_vs_borg"] = r_borg >= FULL_RATIO_TARGET
    print(f"  splitd vs restic  {r_restic:5.2f}x   (target >= {FULL_RATIO_TARGET}x)  "
          f"{verdict(t['full_vs_restic'])}")
    print(f"  splitd vs borg    {r_borg:5.2f}x   (target >= {FULL_RATIO_TARGET}x)  "
          f"{verdict(t['full_vs_borg'])}")
    print(f"  splitd vs nbdcopy {fig['nbdcopy']['s'] / fig['splitd']['s']:5.2f}x   (information)")
    print(f"  CPU time (information; wall times on a busy machine follow the CPU share): "
          f"restic/splitd {fig['restic']['cpu_s'] / fig['splitd']['cpu_s']:.2f}x, borg/splitd "
          f"{fig['borg']['cpu_s'] / fig['splitd']['cpu_s']:.2f}x")

    print("\n  restore to a raw file")
    rest = {}
    for k, label in (("splitd_restore", "splitctl backup restore --to FILE"),
                     ("restic_restore", "restic restore; sync --data FILE")):
        s, cpu = med(runs[k], "s"), med(runs[k], "cpu_s")
        row(label, s, cpu)
        rest[k] = {"s": round(s, 3), "mb_s": round(mb / s, 1), "cpu_s": round(cpu, 2),
                   "all_s": [round(r["s"], 3) for r in runs[k]]}
    out["restore"] = rest
    r_rest = rest["restic_restore"]["s"] / rest["splitd_restore"]["s"]
    t["restore_vs_restic"] = r_rest >= RESTORE_RATIO_TARGET
    print(f"  splitd vs restic  {r_rest:5.2f}x   (target >= {RESTORE_RATIO_TARGET}x; splitd checks "
          f"the digest of what it wrote, restic authenticates each blob; neither reads back)  "
          f"{verdict(t['restore_vs_restic'])}")

    print("\n  stored size")
    st = {k: fig[k]["repo_bytes"] for k in ("splitd", "restic", "borg")}
    for k, v in st.items():
        print(f"  {k:34s} {v / MiB:9.1f} MiB  ({v / size:6.1%} of the image)")
    t["stored_vs_restic"] = st["splitd"] <= st["restic"]
    print(f"  splitd <= restic: {verdict(t['stored_vs_restic'])}")
    out["stored_bytes"] = st

    print(f"\n  incremental, {CHANGED_FRACTION:.0%} of the {size // region_size} regions changed "
          f"(4 KiB in each), resync, split")
    inc_s = med(incr, "s")
    reads_ok = all(i["result"]["bytes_read"] <= (i["result"]["delta_bytes"] or 0)
                   + i["delta_extents"] * region_size
                   and i["daemon_read_bytes"] <= (i["result"]["delta_bytes"] or 0)
                   + i["delta_extents"] * region_size for i in incr)
    modes = sorted({i["result"]["mode"] for i in incr})
    last = incr[-1]
    print(f"  splitctl backup run (incremental)  {inc_s:8.2f} s  agent's own "
          f"{statistics.median(i['result']['seconds'] for i in incr):.2f} s  CPU "
          f"{med(incr, 'cpu_s'):.2f} s  mode {'/'.join(modes)}")
    print(f"  read {last['result']['bytes_read']} B (daemon served {last['daemon_read_bytes']} B)"
          f", delta {last['result']['delta_bytes']} B in {last['delta_extents']} extents of "
          f"{last['changed_regions']} regions of {region_size // 1024} KiB; chunks re-stored "
          f"(parent's chunk patched, hashed, compressed) {last['result']['chunks_read']} of "
          f"{-(-size // CHUNK)} ({CHUNK // MiB} MiB chunks)")
    t["incremental_reads"] = reads_ok and modes == ["incremental"]
    frac = inc_s / fig["splitd"]["s"]
    t["incremental_time"] = frac <= INCR_TIME_TARGET
    print(f"  reads <= delta + one region per extent: {verdict(t['incremental_reads'])}")
    print(f"  time {frac:.1%} of the full backup's (target <= {INCR_TIME_TARGET:.0%})  "
          f"{verdict(t['incremental_time'])}")
    out["incremental"] = {"s": round(inc_s, 3), "fraction_of_full": round(frac, 4),
                          "runs": [{"s": round(i["s"], 3), "cpu_s": round(i["cpu_s"], 2),
                                    "daemon_read_bytes": i["daemon_read_bytes"],
                                    "changed_regions": i["changed_regions"],
                                    "delta_extents": i["delta_extents"],
                                    **{k: i["result"][k] for k in
                                       ("mode", "bytes_read", "delta_bytes", "seconds",
                                        "chunks_read", "chunks_parent")}} for i in incr]}
    out["targets"] = t
    print("  (figures from a busy shared machine)")
    return out


SECTION = Section("backup", "splitctl backup vs restic, borg and nbdcopy: full, incremental, "
                  "restore, stored size", section_backup)
