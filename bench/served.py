"""A snapshot served from its store (splitctl backup serve) against the same
data in a plain volume, on tmpfs: time from `backup.serve` to the first READ
answered, 4 KiB random READ latency (p50/p99) with a warm chunk cache, and
sequential read MiB/s (nbdcopy to null:, cold cache), A/B interleaved.

    PYTHONPATH=. .venv/bin/python bench/served.py [--size 512M] [--rounds 3]

Not part of `make bench` yet (its targets are issue 13's: first read < 1 s,
p99 < 5 ms warm, sequential >= 0.5x the plain volume).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.splitd import BIN, Splitd  # noqa: E402

MiB = 1 << 20


def fill(uri: str, size: int) -> None:
    """A quarter holes, a quarter written zeroes, half data (files of
    /usr/lib, compressible like real data)."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    q = size // 4
    for off in range(q, 2 * q, 16 * MiB):
        h.pwrite(bytes(min(16 * MiB, 2 * q - off)), off)
    want, off = 2 * q, 2 * q
    for root, _, files in os.walk("/usr/lib"):
        for name in files:
            p = os.path.join(root, name)
            if want <= 0 or not os.path.isfile(p) or os.path.islink(p):
                continue
            try:
                with open(p, "rb") as f:
                    data = f.read(min(want, 8 * MiB))
            except OSError:
                continue
            data = data[:len(data) // 4096 * 4096]
            if data:
                h.pwrite(data, off)
                off += len(data)
                want -= len(data)
        if want <= 0:
            break
    h.flush()
    h.shutdown()


def splitctl(d: Splitd, *args: str) -> dict:
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(d.admin_socket))
    cp = subprocess.run([str(BIN / "splitctl"), *args, "--json"], capture_output=True, text=True,
                        env=env, check=True)
    return json.loads(cp.stdout)


def first_read(d: Splitd, store: Path, sid: str, name: str) -> float:
    import nbd
    t0 = time.perf_counter()
    with d.admin() as a:
        a.call("backup.serve", store=str(store), snapshot=sid, name=name)
    h = nbd.NBD()
    h.connect_uri(d.uri(name))
    h.pread(4096, 0)
    t = time.perf_counter() - t0
    h.shutdown()
    return t


def random_reads(uri: str, size: int, n: int) -> tuple[float, float]:
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(1)
    lat = []
    for _ in range(n):
        off = rnd.randrange(size // 4096) * 4096
        t0 = time.perf_counter()
        h.pread(4096, off)
        lat.append(time.perf_counter() - t0)
    h.shutdown()
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def sequential(uri: str, size: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return size / MiB / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reads", type=int, default=2000)
    args = ap.parse_args()
    from common.names import parse_size
    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix=f"served-bench-{os.getpid()}-", dir="/dev/shm"))
    d = Splitd(base)
    try:
        d.start()
        d.call("volume.create", name="plain", size=size)
        fill(d.uri("plain"), size)
        store = base / "store"
        splitctl(d, "backup", "init", str(store))
        sid = splitctl(d, "backup", "run", "--volume", d.uri("plain"), "--to", str(store))["snapshot"]
        firsts, seq_s, seq_v, p_s, p_v = [], [], [], [], []
        for r in range(args.rounds):
            name = f"snap{r}"
            firsts.append(first_read(d, store, sid, name))
            seq_v.append(sequential(d.uri("plain"), size))
            seq_s.append(sequential(d.uri(name), size))         # cold cache: fresh serve
            p_v.append(random_reads(d.uri("plain"), size, args.reads))
            p_s.append(random_reads(d.uri(name), size, args.reads))   # warm (256 MiB cache)
            d.call("backup.unserve", name=name)
        med = statistics.median
        out = {
            "size_mib": size // MiB, "rounds": args.rounds,
            "serve_to_first_read_ms": [round(t * 1e3, 1) for t in firsts],
            "sequential_mib_s": {"served": round(med(seq_s)), "volume": round(med(seq_v)),
                                 "ratio": round(med(seq_s) / med(seq_v), 2)},
            "random_4k_ms": {"served_p50": round(med(p[0] for p in p_s), 3),
                             "served_p99": round(med(p[1] for p in p_s), 3),
                             "volume_p50": round(med(p[0] for p in p_v), 3),
                             "volume_p99": round(med(p[1] for p in p_v), 3)},
        }
        print(json.dumps(out, indent=1))
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
