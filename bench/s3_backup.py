"""Full backup and restore to S3 (SeaweedFS on 127.0.0.1): splitd's store vs restic.

    PYTHONPATH=. .venv/bin/python bench/s3_backup.py [--size 1G] [--runs 3] [--json]

The image: a third random bytes, a third zeroes (written), a third /usr/lib's
files concatenated. One SeaweedFS (harness/seaweedfs.py, data on /var/tmp)
serves both tools; every run gets a fresh bucket. Runs are interleaved
(splitd, splitd encrypted, restic, per round) and the median of `--runs` is
reported in MB/s of the image (wall time):

  splitd   the store library the backup agent uses (agents/store): the file
           read in 4 MiB pieces from one thread, add() to a SnapshotWriter
           (hash, zstd -1, PUTs from its pool), commit; restore with
           restore_to_file (parallel GETs, checks, sparse writes)
  restic   `restic backup FILE` and `restic restore latest --target DIR`
           (always encrypted; compression auto), repository s3:ENDPOINT/BUCKET

Every restore is compared with the image (BLAKE3).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import blake3

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agents.store import init_dir, new_key_file  # noqa: E402
from bench.store_ingest import make_data  # noqa: E402
from harness.seaweedfs import SeaweedS3  # noqa: E402

CHUNK = 4 << 20


def make_image(size: int, where: str) -> str:
    third = size // 3 // CHUNK * CHUNK
    parts = [make_data("random", third, where), make_data("binary", size - 2 * third, where)]
    path = os.path.join(where, f"s3-bench-{os.getpid()}.img")
    with open(path, "wb") as out:
        with open(parts[0], "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
        zero = bytes(CHUNK)
        for _ in range(third // CHUNK):
            out.write(zero)
        with open(parts[1], "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
    for p in parts:
        os.unlink(p)
    return path


def digest(path: str) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


def run_splitd(s3: SeaweedS3, image: str, size: int, work: str, key: str | None) -> tuple[float, float, int]:
    bucket = f"sp{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    store = init_dir(f"s3://{bucket}/store", key_file=key)
    t0 = time.monotonic()
    w = store.writer(size)
    with open(image, "rb", buffering=0) as f:
        off = 0
        while off < size:
            data = f.read(CHUNK)
            w.add(off, data)
            off += len(data)
    sid = w.commit()
    backup_s = time.monotonic() - t0
    out = os.path.join(work, "restored.img")
    t0 = time.monotonic()
    store.restore_to_file(sid, out)
    restore_s = time.monotonic() - t0
    stored = sum(s3.client().head_object(Bucket=bucket, Key=f"store/{n}")["ContentLength"]
                 for n in store.backend.list("chunks/"))
    store.close()
    if digest(out) != digest(image):
        raise SystemExit("splitd restore differs from the image")
    os.unlink(out)
    return backup_s, restore_s, stored


def run_restic(s3: SeaweedS3, image: str, work: str) -> tuple[float, float, int]:
    bucket = f"rs{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    env = dict(os.environ, **s3.env(), RESTIC_PASSWORD="bench",
               RESTIC_REPOSITORY=f"s3:{s3.endpoint}/{bucket}",
               RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"))
    subprocess.run(["restic", "init", "--repository-version", "2"], env=env, check=True, capture_output=True)
    t0 = time.monotonic()
    subprocess.run(["restic", "backup", image], env=env, check=True, capture_output=True)
    backup_s = time.monotonic() - t0
    target = os.path.join(work, "restic-restore")
    t0 = time.monotonic()
    subprocess.run(["restic", "restore", "latest", "--target", target], env=env, check=True,
                   capture_output=True)
    restore_s = time.monotonic() - t0
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="data/")
    stored = sum(o["Size"] for p in pages for o in p.get("Contents", ()))
    restored = os.path.join(target, image.lstrip("/"))
    if digest(restored) != digest(image):
        raise SystemExit("restic restore differs from the image")
    shutil.rmtree(target)
    shutil.rmtree(os.path.join(work, "restic-cache"), ignore_errors=True)
    return backup_s, restore_s, stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-restic", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    unit = {"M": 20, "G": 30}.get(args.size[-1])
    size = int(args.size[:-1]) << unit if unit else int(args.size)
    have_restic = shutil.which("restic") is not None and not args.no_restic
    work = tempfile.mkdtemp(prefix=f"s3-bench-{os.getpid()}-", dir="/var/tmp")
    results: dict[str, dict[str, list[float]]] = {}
    try:
        image = make_image(size, work)
        key = os.path.join(work, "key")
        new_key_file(key)
        with SeaweedS3(os.path.join(work, "weed"), volume_size_mb=1024) as s3:
            os.environ.update(s3.env())
            os.environ["XDG_CACHE_HOME"] = os.path.join(work, "cache")
            for _ in range(args.runs):
                tools = [("splitd", lambda: run_splitd(s3, image, size, work, None)),
                         ("splitd-encrypted", lambda: run_splitd(s3, image, size, work, key))]
                if have_restic:
                    tools.append(("restic", lambda: run_restic(s3, image, work)))
                for name, fn in tools:
                    b, r, stored = fn()
                    res = results.setdefault(name, {"backup_s": [], "restore_s": [], "stored": []})
                    res["backup_s"].append(b)
                    res["restore_s"].append(r)
                    res["stored"].append(stored)
                    print(f"  {name}: backup {size / b / 1e6:.0f} MB/s, restore {size / r / 1e6:.0f} MB/s, "
                          f"stored {stored / 1e6:.0f} MB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: {"backup_MBps": round(size / statistics.median(v["backup_s"]) / 1e6, 1),
                      "restore_MBps": round(size / statistics.median(v["restore_s"]) / 1e6, 1),
                      "stored_MB": round(statistics.median(v["stored"]) / 1e6, 1),
                      "runs": len(v["backup_s"])} for name, v in results.items()}
    if args.json:
        print(json.dumps({"size": size, "results": summary}, indent=1))
    else:
        for name, s in summary.items():
            print(f"{name:18} backup {s['backup_MBps']:7.1f} MB/s  restore {s['restore_MBps']:7.1f} MB/s  "
                  f"stored {s['stored_MB']:7.1f} MB  (median of {s['runs']})")


if __name__ == "__main__":
    main()
