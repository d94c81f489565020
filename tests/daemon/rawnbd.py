"""A tiny NBD client that speaks fixed newstyle by hand, for the tests.

libnbd is a polite client: it will not send a bad magic, a 64 MiB write, an
unknown command or an option out of order. This one sends whatever a test
asks for, byte for byte, and reads back exactly what the server answers.

It deliberately does not import nbdwire: the numbers below are copied
from the protocol document (/tmp/proto.md, section names in the comments),
so a wrong constant in the server cannot hide behind the same wrong constant
in its test.
"""
from __future__ import annotations

import errno
import socket
import ssl
import struct
import time
from typing import NamedTuple

# "Newstyle negotiation"
NBDMAGIC = 0x4E42444D41474943            # ASCII "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # ASCII "IHAVEOPT"
# "Fixed newstyle negotiation": magic of every option reply.
REPLY_MAGIC = 0x0003E889045565A9
# "Request message", "Simple reply message", "Structured reply chunk message"
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

# "Handshake flags" / "Client flags"
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

# "Transmission flags"
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_TRIM = 1 << 5

# "Option types"
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# "Option reply types"
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7

# NBD_REP_INFO types ("Option reply types", NBD_REP_INFO)
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# "Request types"
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# "Command flags"
CMD_FLAG_FUA = 1 << 0

# "Structured reply flags" / "Structured reply types"
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1

# "Error values"
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
ESHUTDOWN = 108

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


# How a closed connection shows on a plain or a TLS socket.
_GONE = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class OptionReply(NamedTuple):
    option: int
    type: int
    data: bytes


class Reply(NamedTuple):
    """One reply: a simple reply, or one structured chunk."""
    cookie: int
    error: int              # 0 on success; the NBD error of a simple reply or error chunk
    structured: bool
    flags: int = 0          # structured only
    type: int = 0           # structured only
    payload: bytes = b""    # chunk payload (structured) or read data (simple)


def request(cmd: int, offset: int = 0, length: int = 0, cookie: int = 1, flags: int = 0,
            magic: int = REQUEST_MAGIC) -> bytes:
    return _REQUEST.pack(magic, flags, cmd, cookie, offset, length)


def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: 32 bits name length, name, 16 bits count, infos."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name: str, queries: tuple[str, ...]) -> bytes:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: name, query count, queries."""
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


class RawClient:
    """One connection; every method does exactly one protocol step."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.structured = False
        self.size = None
        self.tflags = None

    @classmethod
    def unix(cls, path, timeout: float = 10.0) -> RawClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
        return cls(s, timeout)

    @classmethod
    def tcp(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawClient:
        s = socket.create_connection((host, port), timeout=timeout)
        return cls(s, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bytes ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except _GONE as e:
            raise Closed(str(e)) from None

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except _GONE as e:
                raise Closed(str(e)) from None
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout: float) -> float:
        """Read (and drop) until the server closes; returns the seconds it took.
        Raises AssertionError if the connection is still open after `timeout`."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server kept the connection open for {timeout}s")
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return time.monotonic() - start
            except _GONE:
                return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    return time.monotonic() - start
                raise

    # -- handshake ----------------------------------------------------------------

    def greeting(self) -> int:
        """Read the server's greeting; returns its handshake flags."""
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        return flags

    def start(self, client_flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> int:
        """Greeting in, client flags out: the connection is in option haggling."""
        flags = self.greeting()
        assert flags & FLAG_FIXED_NEWSTYLE
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> OptionReply:
        magic, option, rtype, length = _OPTION_REPLY.unpack(self.recv_exact(_OPTION_REPLY.size))
        assert magic == REPLY_MAGIC, hex(magic)
        return OptionReply(option, rtype, self.recv_exact(length) if length else b"")

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; every reply up to the final one (ACK or error), in order."""
        self.send_option(option, data)
        replies = []
        while True:
            rep = self.option_reply()
            assert rep.option == option, (rep, option)
            replies.append(rep)
            if rep.type == REP_ACK or rep.type & 2**31:
                return replies

    def go(self, name: str, infos: tuple[int, ...] = ()) -> tuple[int, int]:
        """NBD_OPT_GO; returns (export size, transmission flags)."""
        replies = self.option(OPT_GO, info_data(name, infos))
        assert replies[-1].type == REP_ACK, replies[-1]
        for rep in replies[:-1]:
            assert rep.type == REP_INFO, rep
            if struct.unpack_from(">H", rep.data)[0] == INFO_EXPORT:
                assert len(rep.data) == 12, rep
                _, self.size, self.tflags = struct.unpack(">HQH", rep.data)
        assert self.size is not None, "no NBD_INFO_EXPORT before the ACK"
        return self.size, self.tflags

    def negotiate_structured(self) -> None:
        replies = self.option(OPT_STRUCTURED_REPLY)
        assert [r.type for r in replies] == [REP_ACK], replies
        self.structured = True

    def open(self, name: str, structured: bool = False,
             meta: tuple[str, ...] = ()) -> RawClient:
        """Handshake all the way into transmission on export `name`."""
        self.start()
        if structured:
            self.negotiate_structured()
        if meta:
            replies = self.option(OPT_SET_META_CONTEXT, meta_data(name, meta))
            assert replies[-1].type == REP_ACK, replies
        self.go(name)
        return self

    # -- transmission -------------------------------------------------------------

    def send_request(self, cmd: int, offset: int = 0, length: int = 0, cookie: int = 1,
                     flags: int = 0, payload: bytes = b"") -> None:
        self.send(request(cmd, offset, length, cookie, flags) + payload)

    def reply(self, read_length: int = 0) -> Reply:
        """The next reply message (or structured chunk). `read_length`: the data
        a successful simple reply to a READ carries, which only the client knows."""
        head = self.recv_exact(4)
        (magic,) = struct.unpack(">I", head)
        if magic == SIMPLE_MAGIC:
            _, error, cookie = _SIMPLE.unpack(head + self.recv_exact(_SIMPLE.size - 4))
            data = self.recv_exact(read_length) if read_length and not error else b""
            return Reply(cookie, error, False, payload=data)
        assert magic == STRUCTURED_MAGIC, f"bad reply magic 0x{magic:08x}"
        _, flags, rtype, cookie, length = _CHUNK.unpack(head + self.recv_exact(_CHUNK.size - 4))
        payload = self.recv_exact(length) if length else b""
        error = 0
        if rtype & 2**15:
            (error,) = struct.unpack_from(">I", payload)
        return Reply(cookie, error, True, flags, rtype, payload)

    def full_reply(self, read_length: int = 0) -> list[Reply]:
        """Every chunk of one structured reply (up to DONE), or one simple reply."""
        first = self.reply(read_length)
        out = [first]
        while first.structured and not out[-1].flags & REPLY_FLAG_DONE:
            nxt = self.reply()
            assert nxt.cookie == first.cookie, "chunks of two replies interleaved"
            out.append(nxt)
        return out

    def call(self, cmd: int, offset: int = 0, length: int = 0, cookie: int = 1,
             flags: int = 0, payload: bytes = b"") -> tuple[int, bytes]:
        """One request, its whole reply: (error, read data or chunk payloads)."""
        self.send_request(cmd, offset, length, cookie, flags, payload)
        replies = self.full_reply(length if cmd == CMD_READ else 0)
        for r in replies:
            assert r.cookie == cookie, (r.cookie, cookie)
        errors = [r.error for r in replies if r.error]
        if not replies[0].structured:
            return replies[0].error, replies[0].payload
        data = b""
        for r in replies:
            if r.type == REPLY_TYPE_OFFSET_DATA:
                data += r.payload[8:]
        return (errors[0] if errors else 0), data

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        error, data = self.call(CMD_READ, offset, length, cookie)
        assert error == 0, f"read {offset}+{length} failed with NBD error {error}"
        assert len(data) == length
        return data

    def write(self, offset: int, data: bytes, cookie: int = 1, flags: int = 0) -> int:
        error, _ = self.call(CMD_WRITE, offset, len(data), cookie, flags, data)
        return error
