"""Random writes, zeroes and trims through agents.nbd, against splitd: what
the client reads back, and what libnbd (python3-libnbd's `nbd` module) reads
back, both match a model. Operations that do not overlap go out together
(several requests in flight, on two connections)."""
from __future__ import annotations

import asyncio
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import agents.nbd as nbd
from tests.agents.conftest import LOOPS, run

libnbd = pytest.importorskip("nbd")

SIZE = 4 << 20


@st.composite
def operation(draw):
    kind = draw(st.sampled_from(["write", "write", "zero", "zero-alloc", "trim"]))
    offset = draw(st.integers(0, SIZE - 1) | st.sampled_from([0, 4096, SIZE // 2, SIZE - 4096]))
    length = draw(st.integers(1, min(SIZE - offset, 2 << 20)) | st.sampled_from([1, 512, 65536]))
    length = min(length, SIZE - offset)
    return kind, offset, length, draw(st.integers(0, 2**32))


def batches(ops):
    """Consecutive operations that do not overlap, together."""
    batch: list = []
    for op in ops:
        _, off, n, _ = op
        if any(off < o + m and o < off + n for _, o, m, _ in batch):
            yield batch
            batch = []
        batch.append(op)
    if batch:
        yield batch


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.conftest import Daemon
    d = Daemon(tmp_path_factory.mktemp("model")).start()
    d.create_volume("vol", SIZE)
    yield d
    d.stop()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation(), min_size=1, max_size=12), loop=st.sampled_from(LOOPS))
def test_random_operations_match_a_model_and_libnbd(served, ops, loop):
    uri = served.uri("vol")
    model = bytearray(SIZE)
    known = bytearray(b"\x01" * SIZE)       # 0: trimmed, reads as anything

    async def go():
        async with await nbd.open(uri, connections=2, max_requests=4) as cl:
            await cl.zero(0, SIZE)
            for batch in batches(ops):
                todo = []
                for kind, off, n, seed in batch:
                    if kind == "write":
                        data = random.Random(seed).randbytes(n)
                        model[off:off + n] = data
                        todo.append(cl.write(off, data, fua=seed % 2 == 0))
                    elif kind.startswith("zero"):
                        model[off:off + n] = bytes(n)
                        todo.append(cl.zero(off, n, punch=kind == "zero"))
                    else:
                        todo.append(cl.trim(off, n))
                    known[off:off + n] = bytes(n) if kind == "trim" else b"\x01" * n
                await asyncio.gather(*todo)
            await cl.flush()
            return await cl.read(0, SIZE)

    ours = run(loop, go())
    h = libnbd.NBD()
    try:
        h.connect_uri(uri)
        theirs = h.pread(SIZE, 0)
    finally:
        h.shutdown()
    assert ours == theirs
    expected = bytearray(model)
    for m in re.finditer(b"\x00+", known):
        expected[m.start():m.end()] = ours[m.start():m.end()]
    if ours != expected:
        first = next(i for i in range(SIZE) if ours[i] != expected[i])
        raise AssertionError(f"first difference at byte {first}: ops {ops}")
