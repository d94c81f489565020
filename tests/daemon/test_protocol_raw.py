"""The NBD server against a hand-driven client (tests/daemon/rawnbd.py).

These are the cases a well-behaved client library never produces: unknown
options and commands, bad magic, oversized payloads, stalls, floods of
connections, DISC with requests still in flight. Section names refer to
/tmp/proto.md.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from tests.conftest import memory
from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import Closed, RawClient

MiB = 1 << 20
VOL = "vol"
VOL_SIZE = 16 * MiB


@pytest.fixture
def served(daemon):
    """The daemon with one 16 MiB volume."""
    daemon.create_volume(VOL, VOL_SIZE)
    return daemon


def connect(d, tcp: bool = False, timeout: float = 10.0) -> RawClient:
    if tcp:
        return RawClient.tcp(d.tcp_port, timeout=timeout)
    return RawClient.unix(d.nbd_socket, timeout=timeout)


# -- handshake ---------------------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_unknown_option_is_unsupported_and_handshake_goes_on(served, tcp):
    with connect(served, tcp) as cl:
        flags = cl.start()
        assert flags & r.FLAG_FIXED_NEWSTYLE and flags & r.FLAG_NO_ZEROES
        # "Fixed newstyle negotiation": the server replies to an option it does
        # not know with NBD_REP_ERR_UNSUP, echoing the option, and goes on.
        for unknown in (0x7777, 4, 2**32 - 1):
            [rep] = cl.option(unknown, b"some data the server must skip")
            assert rep.option == unknown
            assert rep.type == r.REP_ERR_UNSUP
        size, tflags = cl.go(VOL)
        assert size == VOL_SIZE
        assert tflags & r.TF_HAS_FLAGS and not tflags & r.TF_READ_ONLY
        assert cl.read(0, 4096) == bytes(4096)


def test_go_replies_info_export_and_requested_infos(served):
    with connect(served) as cl:
        cl.start()
        replies = cl.option(r.OPT_GO, r.info_data(VOL, (r.INFO_NAME, r.INFO_BLOCK_SIZE)))
        assert replies[-1].type == r.REP_ACK
        infos = {struct.unpack_from(">H", rep.data)[0]: rep.data for rep in replies[:-1]}
        # NBD_INFO_EXPORT is mandatory, length 12.
        assert struct.unpack(">HQH", infos[r.INFO_EXPORT])[1] == VOL_SIZE
        assert infos[r.INFO_NAME][2:] == VOL.encode()
        # NBD_INFO_BLOCK_SIZE: length 14; the max payload is at least the
        # default 32 MiB ("Size constraints").
        _, minimum, preferred, maximum = struct.unpack(">HIII", infos[r.INFO_BLOCK_SIZE])
        assert minimum <= 512 and preferred >= minimum and maximum >= 32 * MiB
        assert cl.read(0, 512) == bytes(512)


def test_list_names_every_export(served):
    served.create_volume("other", "1M")
    with connect(served) as cl:
        cl.start()
        replies = cl.option(r.OPT_LIST)
        assert replies[-1].type == r.REP_ACK
        names = []
        for rep in replies[:-1]:
            # NBD_REP_SERVER: 32 bits name length, name, optional description.
            assert rep.type == r.REP_SERVER
            (n,) = struct.unpack_from(">I", rep.data)
            assert n <= len(rep.data) - 4
            names.append(rep.data[4:4 + n].decode())
        assert sorted(names) == ["other", VOL]
        # "The client MUST NOT send any additional data with the option, and
        # the server SHOULD reject a request that includes data."
        [rep] = cl.option(r.OPT_LIST, b"x")
        assert rep.type == r.REP_ERR_INVALID
        cl.go(VOL)


def test_info_for_unknown_export_is_err_unknown(served):
    with connect(served) as cl:
        cl.start()
        replies = cl.option(r.OPT_INFO, r.info_data("no-such-volume"))
        # "NBD_REP_ERR_UNKNOWN: ... the server SHOULD NOT send NBD_REP_INFO replies."
        assert [rep.type for rep in replies] == [r.REP_ERR_UNKNOWN]
        replies = cl.option(r.OPT_INFO, r.info_data(VOL))
        assert replies[-1].type == r.REP_ACK
        [rep] = cl.option(r.OPT_GO, r.info_data("no-such-volume"))
        assert rep.type == r.REP_ERR_UNKNOWN
        cl.go(VOL)
        assert cl.read(0, 512) == bytes(512)


def test_error_message_for_a_long_unknown_name_is_valid_utf8(served):
    # "Conventions": error messages are strings: UTF-8, at most 4096 bytes.
    # A 4096-byte name of two-byte characters makes the message longer than
    # that, so the server has to shorten it -- without cutting a character.
    name = "é" * 2048
    with connect(served) as cl:
        cl.start()
        [rep] = cl.option(r.OPT_INFO, r.info_data(name))
        assert rep.type == r.REP_ERR_UNKNOWN
        assert len(rep.data) <= 4096
        rep.data.decode("utf-8")
        cl.go(VOL)


def test_malformed_option_data_is_err_invalid(served):
    with connect(served) as cl:
        cl.start()
        good = r.info_data(VOL)
        for bad in (good[:-1], good + b"\0", struct.pack(">I", 1000) + b"vol\0\0"):
            [rep] = cl.option(r.OPT_GO, bad)
            assert rep.type == r.REP_ERR_INVALID
        cl.go(VOL)


def test_set_meta_context_before_structured_reply_is_invalid(served):
    with connect(served) as cl:
        cl.start()
        # NBD_OPT_SET_META_CONTEXT "MUST NOT be requested unless structured
        # replies have been negotiated first ... a server SHOULD send
        # NBD_REP_ERR_INVALID."
        replies = cl.option(r.OPT_SET_META_CONTEXT, r.meta_data(VOL, ("base:allocation",)))
        assert [rep.type for rep in replies] == [r.REP_ERR_INVALID]
        cl.negotiate_structured()
        replies = cl.option(r.OPT_SET_META_CONTEXT, r.meta_data(VOL, ("base:allocation",)))
        assert [rep.type for rep in replies] == [r.REP_META_CONTEXT, r.REP_ACK]
        ctx_id = struct.unpack_from(">I", replies[0].data)[0]
        assert replies[0].data[4:] == b"base:allocation"
        cl.go(VOL)
        err, _ = cl.call(r.CMD_BLOCK_STATUS, 0, 65536, cookie=3)
        assert err == 0
        # And the context id we got is the one the block status chunk names.
        cl.send_request(r.CMD_BLOCK_STATUS, 0, 65536, cookie=4)
        [chunk] = cl.full_reply()
        assert chunk.type == r.REPLY_TYPE_BLOCK_STATUS
        assert struct.unpack_from(">I", chunk.payload)[0] == ctx_id


def test_starttls_without_tls_configured_is_refused_politely(served):
    with connect(served) as cl:
        cl.start()
        # "NOTLS mode": STARTTLS gets NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP,
        # and no option may get NBD_REP_ERR_TLS_REQD.
        [rep] = cl.option(r.OPT_STARTTLS)
        assert rep.type in (r.REP_ERR_POLICY, r.REP_ERR_UNSUP)
        cl.go(VOL)


def test_abort_is_acked_then_closed(served):
    with connect(served) as cl:
        cl.start()
        # NBD_OPT_ABORT: "The server MUST reply with NBD_REP_ACK."
        [rep] = cl.option(r.OPT_ABORT)
        assert rep.type == r.REP_ACK
        cl.wait_closed(5)


def test_unknown_client_flags_close_the_connection(served):
    with connect(served) as cl:
        cl.greeting()
        # "the server MUST close the TCP connection if it does not recognize
        # the client's flags."
        cl.send(struct.pack(">I", r.C_FIXED_NEWSTYLE | 1 << 7))
        cl.wait_closed(5)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_and_padding(served, no_zeroes):
    with connect(served) as cl:
        cl.start(r.C_FIXED_NEWSTYLE | (r.C_NO_ZEROES if no_zeroes else 0))
        cl.send_option(r.OPT_EXPORT_NAME, VOL.encode())
        # 64 bits size, 16 bits flags, then 124 zero bytes unless NO_ZEROES.
        size, tflags = struct.unpack(">QH", cl.recv_exact(10))
        assert size == VOL_SIZE and tflags & r.TF_HAS_FLAGS
        if not no_zeroes:
            assert cl.recv_exact(124) == bytes(124)
        assert cl.read(0, 4096, cookie=77) == bytes(4096)


def test_export_name_for_unknown_export_disconnects(served):
    with connect(served) as cl:
        cl.start()
        # NBD_OPT_EXPORT_NAME cannot fail with an error: "the server MUST
        # terminate the session."
        cl.send_option(r.OPT_EXPORT_NAME, b"no-such-volume")
        cl.wait_closed(5)


# -- transmission --------------------------------------------------------------------------

def test_bad_request_magic_disconnects(served):
    with connect(served).open(VOL) as cl:
        assert cl.read(0, 512) == bytes(512)
        # "Transmission": a request with the wrong magic means client and server
        # are out of step; nothing after it can be trusted.
        cl.send(r.request(r.CMD_READ, 0, 512, cookie=2, magic=0x25609514))
        cl.wait_closed(5)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_unknown_command_is_einval_and_connection_goes_on(served, structured):
    with connect(served).open(VOL, structured=structured) as cl:
        # "Error values": "The server SHOULD return NBD_EINVAL if it receives an
        # unknown command", and likewise for an unknown command flag.
        for cmd in (8, 99, 0xFFFF):
            err, _ = cl.call(cmd, 0, 512, cookie=1000 + cmd)
            assert err == r.EINVAL
        err, _ = cl.call(r.CMD_READ, 0, 512, cookie=5, flags=1 << 12)
        assert err == r.EINVAL
        cl.write(0, b"x" * 512, cookie=6)
        assert cl.read(0, 512, cookie=7) == b"x" * 512


def test_cookies_come_back_unchanged(served):
    with connect(served).open(VOL) as cl:
        cookies = [0, 1, 2**63, 2**64 - 1, 0x0102030405060708]
        # Pipelined: every request goes out before any reply is read.
        for i, cookie in enumerate(cookies):
            cl.send_request(r.CMD_WRITE, i * 512, 512, cookie, payload=bytes([i + 1]) * 512)
        replies = [cl.reply() for _ in cookies]
        assert sorted(rep.cookie for rep in replies) == sorted(cookies)
        assert all(rep.error == 0 for rep in replies)
        for i, cookie in enumerate(cookies):
            assert cl.read(i * 512, 512, cookie=cookie) == bytes([i + 1]) * 512


def test_write_of_max_payload_is_served(served):
    data = os.urandom(1024) * (32 * 1024)            # 32 MiB: the default maximum payload
    served.create_volume("big", 48 * MiB)
    with connect(served).open("big") as cl:
        assert cl.write(4096, data) == 0
        assert cl.read(4096, len(data)) == data


def test_a_write_costs_at_most_its_payload_in_memory(served):
    # DESIGN.md "NBD", limits: payloads up to 32 MiB. Taking one in should cost
    # about one payload of buffer, not several.
    served.create_volume("big", 48 * MiB)
    pid = served.proc.pid
    data = b"\xa5" * (32 * MiB)
    with connect(served).open("big") as cl:
        assert cl.read(0, 4096) == bytes(4096)
        before = memory(pid)
        assert cl.write(0, data) == 0
        after = memory(pid)
        assert cl.read(32 * MiB - 4096, 4096) == data[:4096]
    grew = after["VmHWM"] - before["VmHWM"]
    assert grew < 64 * MiB, f"a 32 MiB write made the daemon grow by {grew / MiB:.0f} MiB"


def test_announced_payload_does_not_reserve_more_than_it(served):
    # A 28-byte header announcing a 32 MiB write, with no payload behind it,
    # must not make the daemon commit much more memory than that payload (we
    # allow 1.5 times): a multiple of it per connection, times the connection
    # cap, lets a few idle clients exhaust the host's memory.
    pid = served.proc.pid
    n = 4
    clients = [connect(served).open(VOL) for _ in range(n)]
    try:
        assert clients[0].read(0, 4096) == bytes(4096)
        before = memory(pid)
        for i, cl in enumerate(clients):
            cl.send_request(r.CMD_WRITE, 0, 32 * MiB, cookie=i)
        time.sleep(0.3)
        after = memory(pid)
        grew = after["VmRSS"] - before["VmRSS"]
        assert grew < n * 48 * MiB, (
            f"{n} write headers (no payload sent) made the daemon grow by {grew / MiB:.0f} MiB")
    finally:
        for cl in clients:
            cl.close()


def test_oversized_write_is_einval_without_buffering(served):
    pid = served.proc.pid
    length = 64 * MiB
    with connect(served).open(VOL) as cl:
        assert cl.read(0, 4096) == bytes(4096)
        before = memory(pid)
        # The verdict comes from the header; the reply comes once the payload
        # has been dropped (as nbdkit does: a client still sending the payload,
        # libnbd for one, cannot take a reply to it before).
        cl.send_request(r.CMD_WRITE, 0, length, cookie=64, payload=b"\xee" * MiB)
        chunk = b"\xee" * MiB
        for _ in range(length // MiB - 1):
            cl.send(chunk)
        rep = cl.reply()
        assert (rep.cookie, rep.error) == (64, r.EINVAL)
        # The payload was dropped, not written, and the stream is still in step.
        assert cl.read(0, 4096, cookie=65) == bytes(4096)
        after = memory(pid)
    grew = max(after["VmHWM"] - before["VmHWM"], after["VmRSS"] - before["VmRSS"])
    assert grew < 16 * MiB, f"daemon memory grew by {grew / MiB:.1f} MiB"


def test_disc_with_requests_in_flight_gets_their_replies_first(served):
    with connect(served).open(VOL) as cl:
        batch = b""
        expected = {}
        for i in range(16):
            cookie = 100 + i
            # FUA writes and flushes are served off the event loop: they are in
            # flight when DISC arrives.
            batch += r.request(r.CMD_WRITE, i * 65536, 65536, cookie, r.CMD_FLAG_FUA)
            batch += bytes([i]) * 65536
            expected[cookie] = 0
            batch += r.request(r.CMD_FLUSH, 0, 0, cookie + 1000)
            expected[cookie + 1000] = 0
        batch += r.request(r.CMD_READ, 0, 512, 7)
        expected[7] = 512
        # NBD_CMD_DISC: "The server MUST handle all outstanding requests ...
        # and close the TCP session." There is no reply to DISC itself.
        batch += r.request(r.CMD_DISC, 0, 0, 8)
        cl.send(batch)
        got = {}
        while len(got) < len(expected):
            cookie = _peek_cookie(cl)
            rep = cl.reply(expected.get(cookie, 0))
            assert rep.cookie in expected and rep.cookie not in got, rep.cookie
            assert rep.error == 0
            got[rep.cookie] = rep
        assert got[7].payload == bytes(512)
        cl.wait_closed(5)
    with connect(served).open(VOL) as cl:
        for i in range(16):
            assert cl.read(i * 65536, 65536) == bytes([i]) * 65536


def _peek_cookie(cl: RawClient) -> int:
    """The cookie of the next simple reply, left unread (we need it to know
    whether read data follows)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        head = cl.sock.recv(16, socket.MSG_PEEK)
        if not head:
            raise Closed("EOF while replies were still due")
        if len(head) == 16:
            magic, _, cookie = struct.unpack(">IIQ", head)
            assert magic == r.SIMPLE_MAGIC
            return cookie
        time.sleep(0.01)
    raise AssertionError("reply did not arrive")


# -- connections -----------------------------------------------------------------------------

def test_clients_that_vanish_early_do_not_hurt_the_daemon(make_daemon):
    d = make_daemon(["--max-connections", "3"])
    d.create_volume(VOL, VOL_SIZE)
    header = r.request(r.CMD_READ, 0, 512, 1)
    for i in range(150):
        with connect(d, tcp=i % 5 == 0) as cl:
            step = i % 6
            if step == 0:
                continue                      # connect, close at once
            cl.greeting()
            if step == 1:
                continue                      # after the greeting
            cl.send(struct.pack(">I", r.C_FIXED_NEWSTYLE | r.C_NO_ZEROES))
            if step == 2:
                cl.send(struct.pack(">QI", r.IHAVEOPT, r.OPT_GO))   # half an option
                continue
            if step == 3:
                cl.send_option(r.OPT_GO, r.info_data(VOL))          # GO, gone before the reply
                continue
            cl.go(VOL)
            if step == 4:
                cl.send(header[:10])          # half a request
            else:
                cl.send(header)               # a request whose reply nobody reads
    assert d.proc.poll() is None
    # Every one of those freed its slot: the cap of 3 still admits 3 clients.
    clients = _open_with_retry(d, 3)
    try:
        for i, cl in enumerate(clients):
            assert cl.read(0, 512, cookie=i) == bytes(512)
    finally:
        for cl in clients:
            cl.close()


def _open_with_retry(d, n: int, timeout: float = 5.0) -> list[RawClient]:
    """n clients in transmission; retries while closed slots are being freed."""
    deadline = time.monotonic() + timeout
    clients: list[RawClient] = []
    while len(clients) < n:
        try:
            clients.append(connect(d).open(VOL))
        except (Closed, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return clients


def test_stalled_handshake_is_disconnected_after_timeout(make_daemon):
    d = make_daemon(["--handshake-timeout", "1"])
    d.create_volume(VOL, VOL_SIZE)
    with connect(d) as silent, connect(d, tcp=True) as half, connect(d) as done:
        silent.greeting()                                     # never sends its flags
        half.start()
        half.send(struct.pack(">QII", r.IHAVEOPT, r.OPT_GO, 20) + b"\0\0")   # stalls mid-option
        done.open(VOL)                                        # finished in time
        results = {}

        def watch(name, cl):
            try:
                results[name] = cl.wait_closed(6)
            except AssertionError as e:
                results[name] = e

        threads = [threading.Thread(target=watch, args=a) for a in
                   (("silent", silent), ("half", half))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in ("silent", "half"):
            assert isinstance(results[name], float), f"{name}: {results[name]}"
            assert 0.5 <= results[name] <= 4, f"{name} closed after {results[name]:.2f}s"
        # The timeout is for the handshake only: an idle client in
        # transmission stays connected.
        assert done.read(0, 512) == bytes(512)


def test_connection_cap_refuses_the_extra_client(make_daemon):
    d = make_daemon(["--max-connections", "3"])
    d.create_volume(VOL, VOL_SIZE)
    first = [connect(d).open(VOL) for _ in range(3)]
    try:
        with connect(d, timeout=5) as extra:
            with pytest.raises(Closed):
                extra.greeting()
        with connect(d, tcp=True, timeout=5) as extra:
            with pytest.raises(Closed):
                extra.greeting()
        for i, cl in enumerate(first):
            cl.write(i * 512, bytes([i + 1]) * 512, cookie=i)
            assert cl.read(i * 512, 512, cookie=i) == bytes([i + 1]) * 512
        # A slot freed is a slot available again.
        first.pop().close()
        first += _open_with_retry(d, 1)
        assert first[-1].read(0, 512) == b"\x01" * 512
    finally:
        for cl in first:
            cl.close()


# -- the stream: pipelining, pieces, back-pressure ---------------------------------------------

def _fill(cl: RawClient, size: int) -> bytes:
    """Write random data over [0, size) in 1 MiB writes; returns it."""
    data = os.urandom(size)
    for off in range(0, size, MiB):
        assert cl.write(off, data[off:off + MiB], cookie=off) == 0
    return data


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_pipelined_reads_of_mixed_sizes_return_the_right_bytes(served, tcp, structured):
    # Large reads may leave by another path (sendfile) than small ones; the
    # bytes on the wire must still be one whole reply after another, each
    # with its own cookie and its own data ("Transmission").
    with connect(served, tcp).open(VOL, structured=structured) as cl:
        data = _fill(cl, 8 * MiB)
        sizes = [512, 1 * MiB, 4096, 200 * 1024, 1, 128 * 1024, 3 * MiB, 65536, 127 * 1024]
        wanted = {}
        batch = b""
        for i in range(40):
            length = sizes[i % len(sizes)]
            offset = (i * 999_983) % (8 * MiB - length)
            cookie = 5000 + i
            wanted[cookie] = (offset, length)
            batch += r.request(r.CMD_READ, offset, length, cookie)
        cl.send(batch)
        seen = set()
        while len(seen) < len(wanted):
            if structured:
                # One OFFSET_DATA chunk, final unless a NONE chunk closes the
                # reply (a sendfile'd read: its data is read after its header
                # went out, so that chunk cannot be marked final).
                rep, *rest = cl.full_reply()
                assert rep.type == r.REPLY_TYPE_OFFSET_DATA and rep.error == 0
                assert [ch.type for ch in rest] in ([], [r.REPLY_TYPE_NONE])
                offset, length = wanted[rep.cookie]
                assert struct.unpack_from(">Q", rep.payload)[0] == offset
                got = rep.payload[8:]
            else:
                cookie = _peek_cookie(cl)
                offset, length = wanted[cookie]
                rep = cl.reply(length)
                assert rep.error == 0
                got = rep.payload
            assert rep.cookie not in seen
            seen.add(rep.cookie)
            assert got == data[offset:offset + length], f"wrong data for cookie {rep.cookie}"


def test_requests_arriving_in_pieces(served):
    with connect(served).open(VOL) as cl:
        payload = os.urandom(300_000)
        msg = r.request(r.CMD_WRITE, 4096, len(payload), 11) + payload
        # Byte by byte through the header, then uneven pieces of the payload.
        for i in range(28):
            cl.send(msg[i:i + 1])
            time.sleep(0.001)
        pos = 28
        for n in (1, 7, 4093, 65536, 100_000):
            cl.send(msg[pos:pos + n])
            pos += n
            time.sleep(0.01)
        cl.send(msg[pos:])
        rep = cl.reply()
        assert (rep.cookie, rep.error) == (11, 0)
        assert cl.read(4096, len(payload), cookie=12) == payload


@pytest.mark.parametrize("how", ["go", "export_name"])
def test_requests_sent_right_behind_the_handshake(served, how):
    # Nothing stops a client from sending its first requests right behind
    # NBD_OPT_GO / NBD_OPT_EXPORT_NAME, before the reply that ends the
    # handshake: those bytes belong to the transmission phase, not lost.
    with connect(served) as cl:
        cl.greeting()
        flags = struct.pack(">I", r.C_FIXED_NEWSTYLE | r.C_NO_ZEROES)
        if how == "go":
            opt = struct.pack(">QII", r.IHAVEOPT, r.OPT_GO, len(r.info_data(VOL))) + r.info_data(VOL)
        else:
            opt = struct.pack(">QII", r.IHAVEOPT, r.OPT_EXPORT_NAME, len(VOL)) + VOL.encode()
        payload = b"\x5a" * 70_000
        cl.send(flags + opt + r.request(r.CMD_WRITE, 0, len(payload), 1) + payload
                + r.request(r.CMD_READ, 0, 512, 2))
        if how == "go":
            while cl.option_reply().type != r.REP_ACK:
                pass
        else:
            cl.recv_exact(10)
        rep = cl.reply()
        assert (rep.cookie, rep.error) == (1, 0)
        rep = cl.reply(512)
        assert (rep.cookie, rep.error, rep.payload) == (2, 0, b"\x5a" * 512)


def test_inflight_cap_throttles_without_losing_requests(make_daemon):
    d = make_daemon(["--max-inflight", "1"])
    d.create_volume(VOL, VOL_SIZE)
    with connect(d).open(VOL) as cl:
        batch = b""
        cookies = set()
        for i in range(60):
            batch += r.request(r.CMD_WRITE, i * 4096, 4096, i, r.CMD_FLAG_FUA) + bytes([i]) * 4096
            batch += r.request(r.CMD_FLUSH, 0, 0, 1000 + i)
            cookies |= {i, 1000 + i}
        cl.send(batch)
        got = set()
        for _ in cookies:
            rep = cl.reply()
            assert rep.error == 0 and rep.cookie in cookies and rep.cookie not in got
            got.add(rep.cookie)
        for i in range(60):
            assert cl.read(i * 4096, 4096, cookie=i) == bytes([i]) * 4096


def test_client_that_reads_replies_late_gets_them_all(served):
    # The server stops reading while its replies pile up unread, and goes on
    # once the client reads them: no loss, no hang.
    n, length = 120, 256 * 1024
    with connect(served).open(VOL) as cl:
        data = _fill(cl, 8 * MiB)
        batch = b"".join(r.request(r.CMD_READ, (i * length) % (8 * MiB), length, i)
                         for i in range(n))
        sender = threading.Thread(target=cl.send, args=(batch,))
        sender.start()
        time.sleep(0.5)                          # replies (30 MiB) pile up unread
        for i in range(n):
            rep = cl.reply(length)
            off = (i * length) % (8 * MiB)
            assert rep.cookie == i and rep.payload == data[off:off + length]
        sender.join(10)
        assert not sender.is_alive()


def test_zero_length_read_gets_a_well_formed_reply(served):
    # "NBD_CMD_READ": a read of length 0 is unspecified, but "the server SHOULD
    # NOT disconnect". Whatever it answers must be a valid reply: an
    # NBD_REPLY_TYPE_OFFSET_DATA chunk "MUST be at least 9" bytes long (it
    # describes at least one byte), so a zero-length read cannot be one.
    with connect(served).open(VOL, structured=True) as cl:
        cl.send_request(r.CMD_READ, 0, 0, cookie=21)
        for chunk in cl.full_reply():
            assert chunk.cookie == 21
            if chunk.type == r.REPLY_TYPE_OFFSET_DATA:
                assert len(chunk.payload) >= 9, "OFFSET_DATA chunk describing no data"
        assert cl.read(0, 512, cookie=22) == bytes(512)


def test_reply_forms_with_structured_replies(served):
    # "Structured reply chunk message": once structured replies are
    # negotiated, a READ MUST get a structured reply; every other request MAY
    # get either, and errors SHOULD be structured (they carry a message). We
    # answer successes without data simply (one receive less per request for
    # libnbd) and keep errors structured.
    with connect(served).open(VOL, structured=True) as cl:
        ok_requests = [
            (r.CMD_WRITE, 0, 4096, 0, b"w" * 4096),
            (r.CMD_WRITE, 4096, 512, r.CMD_FLAG_FUA, b"f" * 512),
            (r.CMD_WRITE_ZEROES, 8192, 4096, 0, b""),
            (r.CMD_TRIM, 65536, 4096, 0, b""),
            (r.CMD_FLUSH, 0, 0, 0, b""),
            (r.CMD_CACHE, 0, 4096, 0, b""),
        ]
        for cookie, (cmd, offset, length, flags, payload) in enumerate(ok_requests, 30):
            cl.send_request(cmd, offset, length, cookie, flags, payload)
            rep = cl.reply()
            assert (rep.cookie, rep.error, rep.structured) == (cookie, 0, False), cmd

        # A read: structured, with the data in OFFSET_DATA chunks.
        cl.send_request(r.CMD_READ, 0, 4096, cookie=40)
        chunks = cl.full_reply()
        assert all(ch.structured for ch in chunks)
        assert b"".join(ch.payload[8:] for ch in chunks
                        if ch.type == r.REPLY_TYPE_OFFSET_DATA) == b"w" * 4096
        # A zero-length read is still answered with a structured chunk.
        cl.send_request(r.CMD_READ, 0, 0, cookie=41)
        assert all(ch.structured for ch in cl.full_reply())

        # A failing write: a structured error chunk with a message.
        cl.send_request(r.CMD_WRITE, VOL_SIZE, 512, cookie=42, payload=b"x" * 512)
        (err,) = cl.full_reply()
        assert err.structured and err.error == r.ENOSPC and err.flags & r.REPLY_FLAG_DONE
        (msg_len,) = struct.unpack_from(">H", err.payload, 4)
        assert b"beyond the end" in err.payload[6:6 + msg_len]


def test_status_names_unix_clients_by_process(served):
    # A Unix-socket client has no address; status names it by process
    # (SO_PEERCRED), so two clients on one socket can be told apart.
    with connect(served).open(VOL) as cl, connect(served, tcp=True).open(VOL) as tcp_cl:
        peers = sorted(c["peer"] for c in served.call("status")["connections"])
        assert len(peers) == 2
        me = open("/proc/self/comm").read().strip()
        assert f"{me}[{os.getpid()}] uid {os.getuid()}" in peers
        assert any(p.startswith("127.0.0.1:") for p in peers)
        assert cl.read(0, 512) == tcp_cl.read(0, 512)
