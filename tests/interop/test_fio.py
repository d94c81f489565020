"""fio's nbd engine (libnbd) against splitd: four jobs, each on its own region
of one volume, random reads and writes with crc32c verification.

Afterwards the volume itself is read back: each block fio wrote carries fio's
verify header, whose offset field must be where the block sits, and the count
of those blocks in each region must match what the job says it wrote.
"""
from __future__ import annotations

import json
import struct

import pytest

from tests.conftest import need
from tests.interop.clients import MiB, run

JOBS = 4
REGION = 8 * MiB
BLOCK = 4096
# fio's struct verify_header starts: u16 magic, u16 verify_type, u32 len,
# u64 rand_seed, u64 offset (little-endian on x86).
VERIFY_HEADER = struct.Struct("<HHIQQ")
VERIFY_MAGIC = 0xacca


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_randrw_with_crc32c_verify(daemon, tmp_path, transport):
    need("fio")
    nbd = pytest.importorskip("nbd")
    daemon.create_volume("vol", JOBS * REGION)
    report = tmp_path / "fio.json"
    cp = run(["fio", "--name=interop", "--ioengine=nbd",
              f"--uri={daemon.uri('vol', tcp=(transport == 'tcp'))}",
              "--rw=randrw", f"--bs={BLOCK}", f"--size={REGION}",
              f"--offset_increment={REGION}", f"--numjobs={JOBS}", "--iodepth=16",
              "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
              "--output-format=json", f"--output={report}"],
             daemon, timeout=120, cwd=tmp_path)
    assert "verify" not in cp.stderr.lower(), cp.stderr

    jobs = json.loads(report.read_text())["jobs"]
    assert len(jobs) == JOBS
    for job in jobs:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] > 0, job
        # The verify pass reads back everything written, so reads cover more.
        assert job["read"]["io_bytes"] >= job["write"]["io_bytes"], job

    h = nbd.NBD()
    h.connect_uri(daemon.uri("vol"))
    written_per_region = []
    for region in range(JOBS):
        base = region * REGION
        data = h.pread(REGION, base)
        blocks = 0
        for pos in range(0, REGION, BLOCK):
            magic, _, length, _, offset = VERIFY_HEADER.unpack_from(data, pos)
            if magic == VERIFY_MAGIC:
                assert (offset, length) == (base + pos, BLOCK), \
                    f"block at {base + pos} carries fio's header for {offset}+{length}"
                blocks += 1
        written_per_region.append(blocks * BLOCK)
    h.shutdown()
    # randrw with fio's random map writes each block at most once.
    assert sorted(written_per_region) == sorted(j["write"]["io_bytes"] for j in jobs)
