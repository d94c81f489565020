"""qemu-io (QEMU's block layer over its NBD client) against splitd: aligned and
1-byte reads and writes, FUA, vectored and asynchronous I/O, write-zeroes with
and without unmap, and discard, each checked with `read -P`.

The same operations are applied to an in-memory model of the volume; a second
qemu-io run, on a new connection, then checks every byte of the volume against
that model.
"""
from __future__ import annotations

import re

import pytest

from tests.conftest import need
from tests.interop.clients import KiB, MiB, run

SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def qemu_io():
    need("qemu-io")


class Script:
    """qemu-io -c commands, with the model of the volume they leave behind."""

    def __init__(self, size: int):
        self.model = bytearray(size)
        self.commands: list[str] = []
        self.reads = 0
        self.writes = 0

    def write(self, pattern: int, offset: int, length: int, opts: str = "") -> None:
        self.commands.append(f"write {opts}-P 0x{pattern:02x} {offset} {length}")
        self.model[offset:offset + length] = bytes([pattern]) * length
        self.writes += 1

    def zero(self, offset: int, length: int, opts: str = "") -> None:
        self.commands.append(f"write -z {opts}{offset} {length}")
        self.model[offset:offset + length] = bytes(length)
        self.writes += 1

    def discard(self, offset: int, length: int) -> None:
        # NBD lets TRIM leave anything behind, but splitd punches a hole: the
        # range reads as zeroes afterwards (volumes/volume.py, trim).
        self.commands.append(f"discard {offset} {length}")
        self.model[offset:offset + length] = bytes(length)

    def read(self, pattern: int, offset: int, length: int) -> None:
        """Check that the range holds `pattern`, and that the model agrees."""
        assert self.model[offset:offset + length] == bytes([pattern]) * length, \
            f"the test's own expectation is wrong at {offset}+{length}"
        self.commands.append(f"read -P 0x{pattern:02x} {offset} {length}")
        self.reads += 1

    def read_everything(self) -> None:
        """One `read -P` per run of equal bytes in the model."""
        pos = 0
        while pos < len(self.model):
            byte = self.model[pos]
            end = pos + 1
            while end < len(self.model) and self.model[end] == byte:
                end += 1
            self.read(byte, pos, end - pos)
            pos = end

    def args(self) -> list[str]:
        out = []
        for c in self.commands:
            out += ["-c", c]
        return out


def run_qemu_io(daemon, image: str, script: Script) -> str:
    cp = run(["qemu-io", "-f", "raw", image, *script.args()], daemon)
    output = cp.stdout + cp.stderr
    assert "Pattern verification failed" not in output, output
    assert " failed" not in output, output
    # Every command reported its bytes: nothing was skipped silently.
    assert len(re.findall(r"^read \d+/\d+ bytes", output, re.M)) == script.reads, output
    assert len(re.findall(r"^wrote \d+/\d+ bytes", output, re.M)) == script.writes, output
    return output


def image_name(daemon, form: str) -> str:
    if form == "legacy":
        return f"nbd:unix:{daemon.nbd_socket}:exportname=vol"
    return daemon.uri("vol", tcp=(form == "tcp"))


@pytest.mark.parametrize("form", ["uri", "legacy", "tcp"])
def test_reads_writes_zeroes_and_discards(daemon, form):
    daemon.create_volume("vol", SIZE)
    image = image_name(daemon, form)
    s = Script(SIZE)

    # Aligned.
    s.write(0xab, 0, 64 * KiB)
    s.read(0xab, 0, 64 * KiB)
    # One byte, just past the aligned block; its neighbours stay zero.
    s.write(0x11, 64 * KiB + 1, 1)
    s.read(0x11, 64 * KiB + 1, 1)
    s.read(0x00, 64 * KiB, 1)
    s.read(0x00, 64 * KiB + 2, 1)
    # Unaligned at both ends.
    s.write(0x22, 100001, 3333)
    s.read(0x22, 100001, 3333)
    s.read(0x00, 100000, 1)
    s.read(0x00, 100001 + 3333, 1)
    # Two bytes across a 512-byte boundary, inside the first block.
    s.write(0x33, 511, 2)
    s.read(0xab, 0, 511)
    s.read(0x33, 511, 2)
    s.read(0xab, 513, 64 * KiB - 513)
    # Write-zeroes in the middle of data, with and without leave to unmap.
    s.zero(4096, 8192)
    s.read(0x00, 4096, 8192)
    s.read(0xab, 12288, 4096)
    s.write(0x44, 1 * MiB, 512 * KiB)
    s.zero(1 * MiB, 256 * KiB, opts="-u ")
    s.read(0x00, 1 * MiB, 256 * KiB)
    s.read(0x44, 1 * MiB + 256 * KiB, 256 * KiB)
    s.zero(1 * MiB + 300 * KiB + 7, 1000, opts="-u ")
    s.read(0x44, 1 * MiB + 256 * KiB, 44 * KiB + 7)
    s.read(0x00, 1 * MiB + 300 * KiB + 7, 1000)
    # FUA.
    s.write(0x55, 2 * MiB, 4 * KiB, opts="-f ")
    s.read(0x55, 2 * MiB, 4 * KiB)
    s.zero(2 * MiB + 1024, 1024, opts="-f ")
    s.read(0x55, 2 * MiB, 1024)
    s.read(0x00, 2 * MiB + 1024, 1024)
    # Discard, aligned and not.
    s.discard(0, 64 * KiB)
    s.read(0x00, 0, 64 * KiB)
    s.read(0x11, 64 * KiB + 1, 1)
    s.write(0x66, 3 * MiB, 8 * KiB)
    s.discard(3 * MiB + 100, 1000)
    s.read(0x66, 3 * MiB, 100)
    s.read(0x00, 3 * MiB + 100, 1000)
    s.read(0x66, 3 * MiB + 1100, 8 * KiB - 1100)
    # The last byte of the volume.
    s.write(0x99, SIZE - 1, 1)
    s.read(0x99, SIZE - 1, 1)
    s.read(0x00, SIZE - 4096, 4095)
    run_qemu_io(daemon, image, s)

    # A new connection sees every byte as the model says.
    check = Script(SIZE)
    check.model[:] = s.model
    check.read_everything()
    run_qemu_io(daemon, image, check)


def test_vectored_and_asynchronous_io(daemon):
    daemon.create_volume("vol", SIZE)
    image = image_name(daemon, "uri")
    s = Script(SIZE)
    s.commands += ["writev -P 0x88 7340032 512 1k 512", "aio_write -P 0x77 5M 64k",
                   "aio_write -P 0x78 6M 64k", "aio_flush"]
    s.writes += 3
    s.model[7 * MiB:7 * MiB + 2048] = b"\x88" * 2048
    s.model[5 * MiB:5 * MiB + 64 * KiB] = b"\x77" * 64 * KiB
    s.model[6 * MiB:6 * MiB + 64 * KiB] = b"\x78" * 64 * KiB
    s.commands.append("readv -P 0x88 7340032 1k 1k")
    s.reads += 1
    s.read(0x77, 5 * MiB, 64 * KiB)
    s.read(0x78, 6 * MiB, 64 * KiB)
    s.commands.append("flush")
    run_qemu_io(daemon, image, s)

    check = Script(SIZE)
    check.model[:] = s.model
    check.read_everything()
    run_qemu_io(daemon, image, check)
