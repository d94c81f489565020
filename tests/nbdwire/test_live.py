"""The sans-IO client against the real daemon, over its Unix socket, with a
few lines of blocking socket glue: it works with a live server, and the
server refuses what it should."""
from __future__ import annotations

import errno
import os
import socket

import pytest

import nbdwire as c

MiB = 1 << 20


class Client:
    """Blocking glue around nbdwire.ClientHandshake and the client codec."""

    def __init__(self, path: str, hs: c.ClientHandshake):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.events: list = []
        self.buf = bytearray()
        self.ready: c.Ready | None = None
        self.closing: c.Closing | None = None
        queue: list = []
        while self.ready is None and self.closing is None:
            if not queue:
                queue = hs.receive(self._recv())
            ev = queue.pop(0)
            self.events.append(ev)
            if isinstance(ev, c.Send):
                self.sock.sendall(ev.data)
            elif isinstance(ev, c.Ready):
                self.ready = ev
                self.buf += ev.trailing
            elif isinstance(ev, c.Closing):
                self.closing = ev
            elif isinstance(ev, c.StartTLS):
                pytest.fail("no TLS in these tests")

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()

    def request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"") -> None:
        self.sock.sendall(c.encode_request(cmd, cookie, offset, length, flags) + data)

    def reply(self) -> c.SimpleReply | c.Chunk:
        while True:
            got = c.decode_reply(self.buf)
            if got is not None:
                msg, used = got
                del self.buf[:used]
                return msg
            self.buf += self._recv()

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def chunks(self, cookie: int) -> list:
        """Every chunk of one structured reply, up to the one marked DONE."""
        out = []
        while True:
            msg = self.reply()
            assert msg.cookie == cookie
            out.append(msg)
            if isinstance(msg, c.SimpleReply) or msg.done:
                return out


@pytest.fixture
def served(daemon):
    daemon.create_volume("vol", "4M")
    return daemon


def test_list_go_read_write_block_status_and_disc(served):
    hs = c.ClientHandshake("vol", list_exports=True, meta_contexts=[c.BASE_ALLOCATION])
    cl = Client(str(served.nbd_socket), hs)
    try:
        ready = cl.ready
        assert ready is not None and ready.size == 4 * MiB and ready.structured
        assert c.ListEntry("vol", "") in cl.events
        assert ready.block_size is not None and ready.block_size.maximum == c.MAX_PAYLOAD
        [(ctx_id, ctx)] = ready.contexts.items()
        assert ctx == c.BASE_ALLOCATION

        payload = os.urandom(8192)
        cl.request(c.CMD_WRITE, 1, 4096, len(payload), data=payload)
        assert cl.reply() == c.SimpleReply(1, 0)

        cl.request(c.CMD_READ, 2, 0, 3 * 4096)
        got = bytearray(3 * 4096)
        for chunk in cl.chunks(2):
            if isinstance(chunk, c.OffsetData):
                got[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
            else:
                assert isinstance(chunk, (c.OffsetHole, c.NoneChunk))
        assert bytes(got) == bytes(4096) + payload

        cl.request(c.CMD_BLOCK_STATUS, 3, 0, 4 * MiB)
        [status] = cl.chunks(3)
        assert isinstance(status, c.BlockStatus) and status.context_id == ctx_id
        assert sum(n for n, _ in status.extents) <= 4 * MiB
        # The written range (from 4096) is data, not a hole.
        covered = 0
        for n, flags in status.extents:
            if covered <= 4096 < covered + n:
                assert not flags & c.STATE_HOLE
            covered += n

        cl.request(c.CMD_DISC, 4)
        assert cl.sock.recv(1) == b""
    finally:
        cl.close()


def test_simple_replies_without_structured(served):
    cl = Client(str(served.nbd_socket), c.ClientHandshake("vol", structured=False))
    try:
        assert cl.ready is not None and not cl.ready.structured
        cl.request(c.CMD_READ, 7, 0, 512)
        assert cl.reply() == c.SimpleReply(7, 0)
        assert cl.take(512) == bytes(512)
        # Past the end: ENOSPC for a write ("Error values"), EINVAL for a read.
        cl.request(c.CMD_WRITE, 8, 4 * MiB, 512, data=bytes(512))
        r = cl.reply()
        assert r.cookie == 8 and c.to_errno(r.error) == errno.ENOSPC
        cl.request(c.CMD_READ, 9, 4 * MiB, 512)
        r = cl.reply()
        assert r.cookie == 9 and c.to_errno(r.error) == errno.EINVAL
    finally:
        cl.close()


def test_server_refusals_carry_its_message(served):
    cl = Client(str(served.nbd_socket), c.ClientHandshake("nope"))
    try:
        [refused] = [e for e in cl.events if isinstance(e, c.Refused)]
        assert refused.fatal and refused.reply == c.REP_ERR_UNKNOWN
        assert "nope" in refused.message
        assert cl.closing is not None
    finally:
        cl.close()


def test_request_errors_come_back_as_error_chunks(served):
    cl = Client(str(served.nbd_socket), c.ClientHandshake("vol"))
    try:
        # A read past the end, an unknown command, a flag the command does not take.
        cl.request(c.CMD_READ, 1, 4 * MiB - 512, 1024)
        cl.request(99, 2)
        cl.request(c.CMD_FLUSH, 3, flags=c.CMD_FLAG_REQ_ONE)
        # BLOCK_STATUS without a meta context negotiated.
        cl.request(c.CMD_BLOCK_STATUS, 4, 0, 4096)
        errors = {}
        for _ in range(4):
            msg = cl.reply()
            assert isinstance(msg, c.ErrorChunk) and msg.done, msg
            errors[msg.cookie] = (msg.error, msg.message)
        assert {k: e for k, (e, _) in errors.items()} == {1: c.EINVAL, 2: c.EINVAL,
                                                          3: c.EINVAL, 4: c.EINVAL}
        assert all(m for _, m in errors.values())
    finally:
        cl.close()


@pytest.mark.parametrize("offset, length", [(4096 + 100, 1000), (0, 1), (4 * MiB - 512, 512),
                                            (4095, 2), (0, 4 * MiB)])
@pytest.mark.parametrize("flags", [0, c.CMD_FLAG_REQ_ONE])
def test_block_status_extents_stay_within_the_request(served, offset, length, flags):
    # "NBD_CMD_BLOCK_STATUS": the descriptors' lengths sum to at most the
    # request's length; each is nonzero (the client codec checks that); with
    # REQ_ONE there is exactly one.
    cl = Client(str(served.nbd_socket), c.ClientHandshake("vol", meta_contexts=[c.BASE_ALLOCATION]))
    try:
        cl.request(c.CMD_WRITE, 1, 4096, 4096, data=b"x" * 4096)
        assert cl.reply() == c.SimpleReply(1, 0)
        cl.request(c.CMD_BLOCK_STATUS, 2, offset, length, flags)
        [status] = cl.chunks(2)
        assert isinstance(status, c.BlockStatus), status
        assert 0 < sum(n for n, _ in status.extents) <= length
        if flags:
            assert len(status.extents) == 1
    finally:
        cl.close()
