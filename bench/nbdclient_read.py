"""Read throughput of agents.nbd against `nbdcopy URI null:`, from splitd on tmpfs.

    PYTHONPATH=. .venv/bin/python -m bench.nbdclient_read [--size 1G] [--rounds 3]

A volume of --size random data (no holes) on /dev/shm; each round runs every
variant once, in turn (interleaved, as the machine is shared), and the
medians are printed in MiB/s.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import uvloop

import agents.nbd as nbd
from harness.splitd import Splitd

MiB = 1 << 20


async def read_all(uri: str, inflight: int, request: int, connections: int) -> None:
    async with await nbd.open(uri, connections=connections, max_requests=inflight,
                              max_bytes=inflight * request) as cl:
        size = cl.size
        sem = asyncio.Semaphore(inflight * len(cl.connections))
        buf = bytearray(request)          # the data is not kept: like null:

        async def one(off: int) -> None:
            try:
                n = min(request, size - off)
                await cl.readinto(off, memoryview(buf)[:n])
            finally:
                sem.release()

        tasks = set()
        for off in range(0, size, request):
            await sem.acquire()
            t = asyncio.create_task(one(off))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


async def iterate(uri: str, ahead: int, request: int, reuse: bool) -> None:
    async with await nbd.open(uri) as cl:
        async for _off, _data in cl.iter_read(request=request, ahead=ahead, reuse=reuse):
            pass


def timed(fn) -> tuple[float, float]:
    """(wall seconds, client CPU seconds: ours, or the nbdcopy child's)."""
    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    c0, t0 = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="nbdclient-bench-", dir="/dev/shm"))
    d = Splitd(base)
    try:
        d.start()
        d.call("volume.create", name="vol", size=f"{args.size}M")
        uri = d.uri("vol")
        src = base / "src.img"
        with open(src, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        subprocess.run(["nbdcopy", str(src), uri], check=True)
        src.unlink()
        variants = {
            "nbdcopy null:": lambda: subprocess.run(["nbdcopy", uri, "null:"], check=True),
            "agents.nbd 16 x 1 MiB": lambda: uvloop.run(read_all(uri, 16, MiB, 1)),
            "agents.nbd 8 x 4 MiB": lambda: uvloop.run(read_all(uri, 8, 4 * MiB, 1)),
            "agents.nbd 8 x 4 MiB, asyncio loop": lambda: asyncio.run(read_all(uri, 8, 4 * MiB, 1)),
            "agents.nbd 4 conns x 4 x 4 MiB": lambda: uvloop.run(read_all(uri, 4, 4 * MiB, 4)),
            "agents.nbd iter_read 8 x 4 MiB": lambda: uvloop.run(iterate(uri, 8, 4 * MiB, False)),
            "agents.nbd iter_read 8 x 4 MiB, reuse": lambda: uvloop.run(iterate(uri, 8, 4 * MiB, True)),
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(timed(fn))
        # The daemon is a child too, but it is reaped only at stop(): not counted here.
        for name, ts in times.items():
            rates = [args.size / t for t, _ in ts]
            cpu = statistics.median(u for _, u in ts) * 1024 / args.size
            print(f"{name:40s} median {statistics.median(rates):7.0f} MiB/s   "
                  f"client CPU {cpu:5.2f} s/GiB   runs {' '.join(f'{r:.0f}' for r in rates)}")
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
