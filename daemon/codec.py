"""The NBD wire format: constants, layouts, and pure encode/decode functions.

Rule of this module: no I/O and no state. Bytes in, values out; values in,
bytes out. Whatever bytes arrive, the decoders return a value, return None
("need more bytes"), or raise ProtocolError -- never any other exception.
That invariant is what tests/daemon/test_codec.py fuzzes.

Section names in comments refer to the NBD protocol document,
NetworkBlockDevice/nbd doc/proto.md.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

# -- Magic numbers ("Handshake", "Transmission") -----------------------------
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- Handshake flags (server) and client flags ("Newstyle negotiation") ------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

# -- Transmission flags ("Transmission flags") --------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- Options ("Option types") --------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT", OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO",
    OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT", OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# -- Option reply types ("Option reply types") ---------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# NBD_OPT_INFO / NBD_OPT_GO information types ("Option reply types", NBD_REP_INFO)
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- Commands and command flags ("Request types", "Command flags") ----------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- Structured reply types and flags ("Structured reply chunk message types")
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- Error values ("Error values") ---------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- Layouts ---------------------------------------------------------------------

# Server greeting: 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits handshake flags.
GREETING = struct.Struct(">QQH")
# Client flags, right after the greeting: 32 bits.
CLIENT_FLAGS = struct.Struct(">I")
# Option request header: 64 bits IHAVEOPT, 32 bits option, 32 bits data length.
OPTION_HEADER = struct.Struct(">QII")
# Option reply header: 64 bits reply magic, 32 bits option, 32 bits reply type,
# 32 bits length of the reply data.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME reply: 64 bits export size, 16 bits transmission flags
# (then 124 zero bytes unless NO_ZEROES was agreed).
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_INFO_EXPORT: 16 bits type, 64 bits size, 16 bits transmission flags.
INFO_EXPORT_LAYOUT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: 16 bits type, 32 bits min, 32 bits preferred, 32 bits max payload.
INFO_BLOCK_SIZE_LAYOUT = struct.Struct(">HIII")
# Request: 32 bits magic, 16 bits command flags, 16 bits type, 64 bits cookie,
# 64 bits offset, 32 bits length.
REQUEST = struct.Struct(">IHHQQI")
# Simple reply: 32 bits magic, 32 bits error, 64 bits cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
# Structured reply chunk header: 32 bits magic, 16 bits flags, 16 bits type,
# 64 bits cookie, 32 bits payload length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA / OFFSET_HOLE payload start: 64 bits offset.
OFFSET = struct.Struct(">Q")
# NBD_REPLY_TYPE_ERROR payload: 32 bits error, 16 bits message length (then message).
ERROR_CHUNK = struct.Struct(">IH")
# Block status descriptor: 32 bits extent length, 32 bits status flags.
EXTENT = struct.Struct(">II")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# NBD_OPT_EXPORT_NAME's reply pads with 124 zero bytes unless NO_ZEROES.
EXPORT_NAME_PADDING = bytes(124)

MAX_OPTION_LENGTH = 64 * 1024   # option data we accept; more is hostile
MAX_STRING = 4096               # export names and other strings, per the spec


class ProtocolError(Exception):
    """The peer broke the protocol: the connection must be closed."""


class OptionTooLong(ProtocolError):
    """An option announces more data than we take. The connection may skip
    the data and answer NBD_REP_ERR_TOO_BIG (the option length is there so
    that a server can skip what it will not process, proto.md "Newstyle
    negotiation"). The header has not been consumed."""

    def __init__(self, code: int, length: int):
        super().__init__(f"option {code} data of {length} bytes is too long")
        self.code = code
        self.length = length


# -- Handshake decoding -----------------------------------------------------------

class Option(NamedTuple):
    code: int
    data: bytes


def decode_option(buf, pos: int = 0) -> tuple[Option, int] | None:
    """One option request from buf[pos:]: (option, bytes consumed), or None."""
    if len(buf) - pos < OPTION_HEADER.size:
        return None
    magic, code, length = OPTION_HEADER.unpack_from(buf, pos)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic 0x{magic:x}")
    if length > MAX_OPTION_LENGTH:
        raise OptionTooLong(code, length)
    end = pos + OPTION_HEADER.size + length
    if len(buf) < end:
        return None
    return Option(code, bytes(buf[pos + OPTION_HEADER.size:end])), end - pos


class OptionDataError(Exception):
    """An option's data is malformed: reply NBD_REP_ERR_INVALID and go on."""
    reply = REP_ERR_INVALID


class OptionTooBig(OptionDataError):
    """Well formed, but more than we process: NBD_REP_ERR_TOO_BIG."""
    reply = REP_ERR_TOO_BIG


MAX_META_QUERIES = 1024


class _Reader:
    """Sequential reads from one option's data, raising OptionDataError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return self._unpack(U16)

    def u32(self) -> int:
        return self._unpack(U32)

    def _unpack(self, layout: struct.Struct) -> int:
        if self.pos + layout.size > len(self.data):
            raise OptionDataError("option data is truncated")
        (value,) = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return value

    def string(self, length: int) -> str:
        if length > MAX_STRING:
            raise OptionDataError(f"string of {length} bytes is longer than {MAX_STRING}")
        if self.pos + length > len(self.data):
            raise OptionDataError("option data is truncated")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OptionDataError("string is not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionDataError("option data has trailing bytes")


def decode_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data: 32 bits name length, name, 16 bits count,
    then that many 16-bit information types."""
    r = _Reader(data)
    name = r.string(r.u32())
    count = r.u16()
    infos = [r.u16() for _ in range(count)]
    r.end()
    return name, infos


def decode_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT data: 32 bits export name length, name,
    32 bits number of queries, then each query as 32 bits length + string."""
    r = _Reader(data)
    name = r.string(r.u32())
    count = r.u32()
    if count > MAX_META_QUERIES:
        # "NBD_OPT_LIST_META_CONTEXT": the server MAY fail with
        # NBD_REP_ERR_TOO_BIG if too many queries are requested.
        raise OptionTooBig(f"{count} meta context queries is more than {MAX_META_QUERIES}")
    queries = [r.string(r.u32()) for _ in range(count)]
    r.end()
    return name, queries


def decode_export_name(data: bytes) -> str:
    if len(data) > MAX_STRING:
        raise ProtocolError("export name too long")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("export name is not valid UTF-8") from None


# -- Handshake encoding -------------------------------------------------------------

def encode_greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def _utf8(text: str, limit: int) -> bytes:
    """UTF-8 of text, cut to at most `limit` bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_option_error(option: int, reply_type: int, message: str = "") -> bytes:
    return encode_option_reply(option, reply_type, _utf8(message, MAX_STRING))


def encode_rep_server(option: int, name: str, description: str = "") -> bytes:
    raw = name.encode("utf-8")
    return encode_option_reply(option, REP_SERVER,
                               U32.pack(len(raw)) + raw + description.encode("utf-8"))


def encode_info_export(option: int, size: int, tflags: int) -> bytes:
    return encode_option_reply(option, REP_INFO, INFO_EXPORT_LAYOUT.pack(INFO_EXPORT, size, tflags))


def encode_info_string(option: int, info_type: int, text: str) -> bytes:
    return encode_option_reply(option, REP_INFO, U16.pack(info_type) + text.encode("utf-8"))


def encode_info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return encode_option_reply(option, REP_INFO,
                               INFO_BLOCK_SIZE_LAYOUT.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum))


def encode_meta_context(option: int, context_id: int, name: str) -> bytes:
    return encode_option_reply(option, REP_META_CONTEXT, U32.pack(context_id) + name.encode("utf-8"))


def encode_export_name_reply(size: int, tflags: int, no_zeroes: bool) -> bytes:
    out = EXPORT_NAME_REPLY.pack(size, tflags)
    return out if no_zeroes else out + EXPORT_NAME_PADDING


# -- Transmission -------------------------------------------------------------------

class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def decode_request(buf, pos: int = 0) -> Request | None:
    """One request header from buf[pos:], or None if fewer than 28 bytes."""
    if len(buf) - pos < REQUEST.size:
        return None
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, pos)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags, cmd, cookie, offset, length)


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(cookie: int, flags: int, reply_type: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def encode_done(cookie: int) -> bytes:
    """A structured NBD_REPLY_TYPE_NONE chunk with the DONE flag."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


def encode_offset_data_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header + offset of an OFFSET_DATA chunk; `length` data bytes follow."""
    return (STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                  REPLY_TYPE_OFFSET_DATA, cookie, 8 + length)
            + OFFSET.pack(offset))


def encode_error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    raw = _utf8(message, MAX_STRING)
    return (STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                  cookie, ERROR_CHUNK.size + len(raw))
            + ERROR_CHUNK.pack(error, len(raw)) + raw)


def encode_block_status(cookie: int, context_id: int, extents: list[tuple[int, int]],
                        done: bool) -> bytes:
    body = U32.pack(context_id) + b"".join(EXTENT.pack(n, f) for n, f in extents)
    return encode_chunk_header(cookie, REPLY_FLAG_DONE if done else 0,
                               REPLY_TYPE_BLOCK_STATUS, len(body)) + body
