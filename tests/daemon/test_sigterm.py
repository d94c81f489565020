"""A clean stop (SIGTERM) under load.

DESIGN.md "Crash safety": a clean stop finishes in-flight requests, flushes,
and exits 0. proto.md "Terminating the transmission phase": "On a server
shutdown, the server SHOULD wait for inflight requests to be serviced prior
to initiating a hard disconnect ... The error value issued in respect of
these requests and any subsequently received requests SHOULD be
NBD_ESHUTDOWN."

So: every write acknowledged before the stop is on disk after a restart;
the daemon exits 0 within --shutdown-grace; and a request that arrives once
the stop has begun gets ESHUTDOWN or a closed connection -- never a success,
never a reply to a cookie that was not asked for.
"""
from __future__ import annotations

import errno
import signal
import struct
import threading
import time

import pytest

from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import Closed, RawClient

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
GRACE = 5.0
BLOCK = 16 * 1024
REGION = 64 * MiB            # each writer has its own; blocks are never rewritten
SYNC_WRITERS = 3
AIO_DEPTH = 16
# What a client may see when the daemon stops under it: NBD_ESHUTDOWN, or the
# connection going away (libnbd reports that in several ways).
STOP_ERRORS = {errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE}


def pattern(writer: int, seq: int) -> bytes:
    """A block nobody else writes: (writer, seq) all over it."""
    return struct.pack(">II", writer, seq) * (BLOCK // 8)


def wait_for_log(d, text: str, timeout: float = 10.0) -> float:
    """Poll the daemon's log for a line; returns when it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in d.log():
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"{text!r} never appeared in the log:\n{d.log()}")


class SyncWriter(threading.Thread):
    """pwrite one fresh block after another until the daemon stops us."""

    def __init__(self, d, writer: int):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(d.uri("vol"))
        self.writer = writer
        self.acked: list[tuple[int, int]] = []        # (offset, seq)
        self.error: nbd.Error | None = None
        self.stop = False

    def run(self) -> None:
        base = self.writer * REGION
        for seq in range(REGION // BLOCK):
            if self.stop:
                return
            # Every third write with FUA: those wait for fdatasync in a thread
            # of the daemon, so some are in flight when SIGTERM lands.
            flags = nbd.CMD_FLAG_FUA if seq % 3 == 0 else 0
            try:
                self.h.pwrite(pattern(self.writer, seq), base + seq * BLOCK, flags)
            except nbd.Error as e:
                self.error = e
                return
            self.acked.append((base + seq * BLOCK, seq))


class AioWriter(threading.Thread):
    """Keeps AIO_DEPTH writes in flight on one connection."""

    def __init__(self, d, writer: int):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(d.uri("vol"))
        self.writer = writer
        self.acked: list[tuple[int, int]] = []
        self.error: nbd.Error | None = None
        self.stop = False

    def run(self) -> None:
        base = self.writer * REGION
        pending: dict[int, tuple[int, int, bytes]] = {}
        seq = 0
        try:
            while not self.stop or pending:
                while not self.stop and len(pending) < AIO_DEPTH and seq < REGION // BLOCK:
                    buf = pattern(self.writer, seq)
                    flags = nbd.CMD_FLAG_FUA if seq % 5 == 0 else 0
                    cookie = self.h.aio_pwrite(buf, base + seq * BLOCK, flags=flags)
                    pending[cookie] = (base + seq * BLOCK, seq, buf)
                    seq += 1
                if not pending:
                    return
                self.h.poll(1)
                for cookie in list(pending):
                    if self.h.aio_command_completed(cookie):
                        offset, s, _ = pending.pop(cookie)
                        self.acked.append((offset, s))
        except nbd.Error as e:
            self.error = e


def test_acknowledged_writes_survive_sigterm_under_load(make_daemon):
    d = make_daemon(["--shutdown-grace", str(GRACE)])
    d.create_volume("vol", (SYNC_WRITERS + 1) * REGION)
    writers = [SyncWriter(d, w) for w in range(SYNC_WRITERS)] + [AioWriter(d, SYNC_WRITERS)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 10
    while any(len(w.acked) < 40 for w in writers):
        assert time.monotonic() < deadline, [len(w.acked) for w in writers]
        assert all(w.is_alive() for w in writers), [w.error for w in writers]
        time.sleep(0.01)
    # Still writing (no writer ran out of fresh blocks): the stop hits them busy.
    assert all(w.is_alive() for w in writers), [len(w.acked) for w in writers]

    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(GRACE + 10)
    took = time.monotonic() - started
    for w in writers:
        w.stop = True
    for w in writers:
        w.join(10)
        assert not w.is_alive()
    log = d.log()
    assert rc == 0, log
    assert took < GRACE + 1, f"daemon took {took:.1f}s to stop (grace {GRACE}s)"
    assert "Traceback" not in log
    for w in writers:
        # Every writer was cut off by the stop, and saw it as a stop.
        assert w.error is not None, f"writer {w.writer} was never stopped"
        assert w.error.errnum in STOP_ERRORS, f"writer {w.writer}: {w.error}"

    d.stop()
    d.start()
    h = nbd.NBD()
    h.connect_uri(d.uri("vol"))
    try:
        total = 0
        for w in writers:
            for offset, seq in w.acked:
                got = h.pread(BLOCK, offset)
                assert got == pattern(w.writer, seq), (
                    f"acknowledged write {seq} of writer {w.writer} at {offset} is lost")
            total += len(w.acked)
        assert total >= 40 * len(writers)
    finally:
        h.shutdown()


# -- requests after the stop began -----------------------------------------------------------

KNOWN = bytes(range(256)) * 16          # 4 KiB the volume holds at every 4 KiB offset
SPAN = 1 * MiB


class Traffic:
    """One raw connection with a sender thread streaming requests and a reader
    thread checking every reply, until the server closes the connection."""

    def __init__(self, d, structured: bool):
        self.cl = RawClient.unix(d.nbd_socket).open("vol", structured=structured)
        self.structured = structured
        self.sent: dict[int, tuple[int, float]] = {}   # cookie -> (command, sent at)
        self.replies: dict[int, tuple[int, float]] = {}  # cookie -> (error, received at)
        self.problems: list[str] = []
        self.window = threading.Semaphore(32)
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(15)
            assert not t.is_alive()

    def _send(self) -> None:
        cookie = 0
        kinds = [r.CMD_READ, r.CMD_WRITE, r.CMD_READ, r.CMD_FLUSH]
        while not self.closed.is_set():
            if not self.window.acquire(timeout=0.1):
                continue
            cookie += 1
            cmd = kinds[cookie % len(kinds)]
            offset = (cookie * 4096) % SPAN
            with self.lock:
                self.sent[cookie] = (cmd, time.monotonic())
            try:
                if cmd == r.CMD_WRITE:
                    # Rewrites what is there already: reads stay predictable.
                    self.cl.send_request(cmd, offset, 4096, cookie, r.CMD_FLAG_FUA, KNOWN)
                elif cmd == r.CMD_READ:
                    self.cl.send_request(cmd, offset, 4096, cookie)
                else:
                    self.cl.send_request(cmd, 0, 0, cookie)
            except (Closed, OSError):
                return

    def _read(self) -> None:
        try:
            while True:
                self._one_reply()
        except (Closed, OSError):
            pass
        except AssertionError as e:
            self.problems.append(str(e))
        finally:
            self.closed.set()
            for _ in range(64):
                self.window.release()

    def _one_reply(self) -> None:
        cl = self.cl
        head = cl.recv_exact(4)
        (magic,) = struct.unpack(">I", head)
        if magic == r.SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", cl.recv_exact(12))
            with self.lock:
                cmd = self.sent.get(cookie, (None, 0))[0]
            assert cmd is not None, f"reply to cookie {cookie}, which was never sent"
            data = cl.recv_exact(4096) if cmd == r.CMD_READ and not error else None
        else:
            assert magic == r.STRUCTURED_MAGIC, f"bad reply magic 0x{magic:08x}"
            flags, rtype, cookie, length = struct.unpack(">HHQI", cl.recv_exact(16))
            payload = cl.recv_exact(length)
            with self.lock:
                cmd = self.sent.get(cookie, (None, 0))[0]
            assert cmd is not None, f"reply to cookie {cookie}, which was never sent"
            assert flags & r.REPLY_FLAG_DONE, "this server answers in one chunk"
            error = struct.unpack_from(">I", payload)[0] if rtype & 0x8000 else 0
            data = None
            if rtype == r.REPLY_TYPE_OFFSET_DATA:
                assert cmd == r.CMD_READ
                data = payload[8:]
            elif not error:
                assert rtype == r.REPLY_TYPE_NONE and cmd != r.CMD_READ, (cookie, rtype)
        assert cookie not in self.replies, f"cookie {cookie} answered twice"
        assert error in (0, r.ESHUTDOWN), f"cookie {cookie}: error {error}"
        if data is not None:
            assert data == KNOWN, f"wrong data for cookie {cookie}"
        self.replies[cookie] = (error, time.monotonic())
        self.window.release()


def test_requests_after_sigterm_get_eshutdown_or_a_disconnect(make_daemon):
    d = make_daemon(["--shutdown-grace", str(GRACE)])
    d.create_volume("vol", 4 * MiB)
    with RawClient.unix(d.nbd_socket).open("vol") as cl:
        for off in range(0, SPAN, 4096):
            assert cl.write(off, KNOWN, cookie=off) == 0
    # A client still in the handshake when the stop begins.
    waiting = RawClient.unix(d.nbd_socket)
    waiting.start()
    traffic = [Traffic(d, structured=False), Traffic(d, structured=True)]
    for t in traffic:
        t.start()
    time.sleep(0.3)
    assert all(len(t.replies) > 10 for t in traffic), [len(t.replies) for t in traffic]

    d.proc.send_signal(signal.SIGTERM)
    # The log line is written in the same step of the daemon's loop that
    # starts answering ESHUTDOWN: anything sent after we see it is "after".
    seen = wait_for_log(d, "stopping")
    try:
        [rep] = waiting.option(r.OPT_GO, r.info_data("vol"))
        assert rep.type == r.REP_ERR_SHUTDOWN
    except Closed:
        pass
    finally:
        waiting.close()
    assert d.proc.wait(GRACE + 10) == 0, d.log()
    for t in traffic:
        t.join()
        t.cl.close()
        assert not t.problems, t.problems
        late_successes = [c for c, (err, _) in t.replies.items()
                          if err == 0 and t.sent[c][1] > seen]
        assert not late_successes, (
            f"requests sent after the stop began were served: cookies {late_successes[:5]}")
    assert "Traceback" not in d.log()


def test_stop_does_not_wait_past_the_grace_period_for_a_stuck_client(make_daemon):
    grace = 1.0
    d = make_daemon(["--shutdown-grace", str(grace)])
    d.create_volume("vol", 8 * MiB)
    with RawClient.unix(d.nbd_socket).open("vol") as stuck:
        # 64 MiB of read replies the client never reads: the daemon cannot
        # finish sending them, so only the grace period ends the connection.
        stuck.send(b"".join(r.request(r.CMD_READ, 0, MiB, i) for i in range(64)))
        time.sleep(0.3)
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(grace + 10)
        took = time.monotonic() - started
    assert rc == 0, d.log()
    assert took < grace + 1.5, f"daemon took {took:.1f}s to stop (grace {grace}s)"
