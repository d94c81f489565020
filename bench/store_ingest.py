"""Ingest throughput of the backup store (agents/store).

    PYTHONPATH=. .venv/bin/python bench/store_ingest.py [--size 1G] [--runs 3]
        [--targets /dev/shm,/var/tmp] [--data random,zero,binary] [--json]

For each data set (1 GiB of random bytes, of zeroes, and of /usr/lib's files
concatenated: a binary-like mix), it feeds a fresh store chunk by chunk, the
way the backup agent will (4 MiB add() calls from one thread, processing in
the writer's pool), and commits. Runs are interleaved (data set x target x
run), each into a new store, and the median of `--runs` is reported: MB/s of
the image (wall), the process's CPU seconds per GB, what was stored, and how fast the snapshot
reads back (iter_image: fetch, decrypt, decompress and check in parallel).
Also measured once: the libraries alone on one core (BLAKE3 keyed, zstd -1,
AES-256-GCM), for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agents.store import init_dir, new_key_file

CHUNK = 4 << 20


def make_data(kind: str, size: int, where: str) -> str:
    path = os.path.join(where, f"store-bench-{kind}-{os.getpid()}.img")
    with open(path, "wb") as f:
        if kind == "zero":
            f.truncate(size)
        elif kind == "random":
            for _ in range(size // CHUNK):
                f.write(os.urandom(CHUNK))
        else:
            done = 0
            for dirpath, _dirs, files in os.walk("/usr/lib"):
                for name in sorted(files):
                    p = os.path.join(dirpath, name)
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    try:
                        with open(p, "rb") as src:
                            data = src.read(size - done)
                    except OSError:
                        continue
                    f.write(data)
                    done += len(data)
                    if done >= size:
                        return path
            f.write(os.urandom(size - done))
    return path


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ingest(image: str, target: str, size: int, encrypt: bool) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix=f"store-bench-{os.getpid()}-", dir=target)
    try:
        key = None
        if encrypt:
            key = os.path.join(root, "key")
            new_key_file(key)
        store = init_dir(os.path.join(root, "s"), key_file=key)
        fd = os.open(image, os.O_RDONLY)
        c0, t0 = cpu(), time.perf_counter()
        w = store.writer(size)
        for off in range(0, size, CHUNK):
            w.add(off, os.pread(fd, CHUNK, off))
        sid = w.commit()
        wall, used = time.perf_counter() - t0, cpu() - c0
        os.close(fd)
        stats = w.stats
        t0 = time.perf_counter()
        for _ext in store.iter_image(sid):
            pass
        restore = time.perf_counter() - t0
        store.close()
        return {"mb_s": size / wall / 1e6, "cpu_s_per_gb": used / (size / 1e9),
                "cores": used / wall, "stored_mb": stats["stored_bytes"] / 1e6,
                "read_back_mb_s": size / restore / 1e6}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def libraries(data: bytes) -> dict[str, float]:
    """One core, MB/s, over `data` in 4 MiB pieces."""
    key = os.urandom(32)
    aes = AESGCM(os.urandom(32))
    comp = zstandard.ZstdCompressor(level=1)
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    out = {}
    for name, fn in [("blake3_keyed", lambda p: blake3.blake3(p, key=key).digest()),
                     ("zstd1", comp.compress),
                     ("aes_gcm", lambda p: aes.encrypt(b"\0" * 12, p, None))]:
        t0 = time.perf_counter()
        for p in pieces:
            fn(p)
        out[name] = len(data) / (time.perf_counter() - t0) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="image size (K/M/G suffix), default 1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--targets", default="/dev/shm,/var/tmp")
    ap.add_argument("--data", default="random,zero,binary,binary+aes",
                    help="data sets; a +aes suffix: into an encrypted store")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1]] \
        if args.size[-1] in "KMG" else int(args.size)
    size -= size % CHUNK
    kinds, targets = args.data.split(","), args.targets.split(",")
    bases = {k.removesuffix("+aes") for k in kinds}
    made = {b: make_data(b, size, "/dev/shm") for b in bases}
    images = {k: made[k.removesuffix("+aes")] for k in kinds}
    results: dict[str, dict[str, list[dict[str, float]]]] = {k: {t: [] for t in targets} for k in kinds}
    try:
        libs = {}
        for k in kinds:
            if k in ("random", "binary"):
                with open(images[k], "rb") as f:
                    libs[k] = libraries(f.read(256 << 20))
        for _ in range(args.runs):
            for k in kinds:
                for t in targets:
                    results[k][t].append(ingest(images[k], t, size, k.endswith("+aes")))
    finally:
        for p in made.values():
            os.unlink(p)
    summary = {k: {t: {m: round(statistics.median(r[m] for r in runs), 2) for m in runs[0]}
                   for t, runs in per.items()} for k, per in results.items()}
    if args.json:
        json.dump({"size": size, "median_of": args.runs, "ingest": summary, "libraries_1core": libs},
                  sys.stdout, indent=1)
        print()
        return
    print(f"ingest of {size >> 20} MiB, median of {args.runs} (MB/s wall; CPU s per GB; cores busy; "
          f"stored MB)")
    for k, per in summary.items():
        for t, m in per.items():
            print(f"  {k:10s} -> {t:9s} {m['mb_s']:6.0f} MB/s  {m['cpu_s_per_gb']:5.2f} cpu-s/GB  "
                  f"{m['cores']:4.2f} cores  {m['stored_mb']:7.1f} MB stored  "
                  f"read back {m['read_back_mb_s']:5.0f} MB/s")
    for k, lib in libs.items():
        print(f"  libraries on one core over {k}: " + ", ".join(f"{n} {v:.0f} MB/s" for n, v in lib.items()))


if __name__ == "__main__":
    main()
