"""Where a served snapshot's READ spends its time: Store.get_chunk by stage.

    PYTHONPATH=. .venv/bin/python bench/chunk_read.py [--chunks 24] [--rounds 5]

Stores `--chunks` 4 MiB chunks of /usr/lib's files (binary-like, ~0.8 of
their size at zstd -1) in a plain and in an encrypted store on /dev/shm,
then reads each back `--rounds` times, one thread, timing each stage in CPU
time of the thread (time.thread_time: a busy machine's waits do not count):

    read     backend.get (the object file into memory)
    open     envelope.open_sealed (AES-GCM open if encrypted, zstd)
    rehash   the chunk's keyed BLAKE3, checked against its name

and the minor page faults a chunk costs when chunks are kept, as the served
snapshot's cache keeps them (a new 4 MiB buffer: ~1000 faults). Medians,
in µs a chunk; MiB/s is 4 MiB over their sum. Then the same chunks through
Store.get_chunk itself (get_chunk_us, get_chunk_minor_faults), as the
served snapshot reads them.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_ingest import make_data  # noqa: E402

from agents.store import envelope, init_dir, open_dir  # noqa: E402
from agents.store.envelope import KIND_CHUNK  # noqa: E402
from agents.store.names import chunk_name  # noqa: E402

CS = 4 << 20


def stages(base: str, image: str, encrypt: bool, count: int, rounds: int) -> dict[str, float]:
    key = None
    if encrypt:
        key = os.path.join(base, "key")
        envelope.new_key_file(key)
    init_dir(os.path.join(base, "store"), key_file=key)
    st = open_dir(os.path.join(base, "store"), key_file=key)
    ids = []
    with open(image, "rb") as f:
        for _ in range(count):
            data = f.read(CS)
            cid = st.chunk_id(data)
            name = chunk_name(cid)
            st.backend.put_if_absent(name, envelope.seal(st.keys, KIND_CHUNK, name, data, st.level))
            ids.append(cid)
    times: dict[str, list[float]] = {"read": [], "open": [], "rehash": []}
    kept = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        kept.clear()
        for cid in ids:
            name = chunk_name(cid)
            t0 = time.thread_time()
            raw = st.backend.get(name)
            t1 = time.thread_time()
            plain = envelope.open_sealed(st.keys, KIND_CHUNK, name, raw, CS)
            t2 = time.thread_time()
            if st.chunk_id(plain) != cid:
                raise SystemExit(f"{name}: wrong bytes")
            t3 = time.thread_time()
            kept.append(plain)
            for k, t in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[k].append(t * 1e6)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (rounds * count)
    # The same through Store.get_chunk, as the served snapshot calls it.
    whole = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        kept.clear()
        for cid in ids:
            t0 = time.thread_time()
            kept.append(st.get_chunk(cid, CS))
            whole.append((time.thread_time() - t0) * 1e6)
    whole_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (rounds * count)
    st.close()
    out = {k: round(statistics.median(v)) for k, v in times.items()}
    total = sum(out.values())
    return dict(out, total_us=total, mib_s_one_thread=round(4 / (total / 1e6)),
                minor_faults=round(faults), get_chunk_us=round(statistics.median(whole)),
                get_chunk_minor_faults=round(whole_faults))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix=f"chunk-read-bench-{os.getpid()}-", dir="/dev/shm")
    try:
        image = make_data("binary", args.chunks * CS, base)
        out = {}
        for encrypt in (False, True):
            where = os.path.join(base, "enc" if encrypt else "plain")
            os.mkdir(where)
            out["encrypted" if encrypt else "plain"] = stages(where, image, encrypt, args.chunks, args.rounds)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
