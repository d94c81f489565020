"""The client's half of the wire: encode options and requests, decode the
server's greeting, option replies, simple replies and structured reply chunks.

Rule of this module: no I/O and no state. Whatever bytes a server sends, the
decoders return a value, return None ("need more bytes"), or raise
ProtocolError -- never anything else. A server that breaks a MUST of the
spec is a ProtocolError: the client must hang up ("Terminating the
transmission phase": either side MAY hard disconnect on a violation).
"""
from __future__ import annotations

from typing import NamedTuple

from .constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_BIT,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)
from .errors import ProtocolError
from .layouts import (
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXTENT,
    GREETING,
    INFO_BLOCK_SIZE_LAYOUT,
    INFO_EXPORT_LAYOUT,
    OFFSET_HOLE,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    U16,
    U32,
    U64,
)
from .limits import MAX_CHUNK_PAYLOAD, MAX_OPTION_LENGTH, MAX_STRING

__all__ = [
    "DEFAULT_INFOS",
    "BlockStatus",
    "Chunk",
    "ChunkHeader",
    "ErrorChunk",
    "Info",
    "InfoBlockSize",
    "InfoDescription",
    "InfoExport",
    "InfoName",
    "InfoUnknown",
    "NoneChunk",
    "OffsetData",
    "OffsetHole",
    "OptionReply",
    "SimpleReply",
    "decode_chunk",
    "decode_export_name_reply",
    "decode_greeting",
    "decode_option_reply",
    "decode_rep_info",
    "decode_rep_meta_context",
    "decode_rep_server",
    "decode_reply",
    "decode_reply_header",
    "encode_client_flags",
    "encode_info_request_data",
    "encode_meta_context_request_data",
    "encode_option",
    "encode_request",
]

Buffer = bytes | bytearray | memoryview

# What a client asks for in NBD_OPT_INFO / NBD_OPT_GO (INFO_EXPORT comes anyway).
DEFAULT_INFOS = (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)


def _string(raw: Buffer, what: str) -> str:
    """A protocol string ("Conventions"): UTF-8, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise ProtocolError(f"{what} of {len(raw)} bytes is longer than {MAX_STRING}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None


def _message(raw: Buffer) -> str:
    """An error message, for a human: never a reason to hang up by itself."""
    return bytes(raw[:MAX_STRING]).decode("utf-8", "replace")


def _text(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} of {len(raw)} bytes is longer than {MAX_STRING}")
    return raw


# -- Handshake encoding -----------------------------------------------------

def encode_client_flags(flags: int) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def encode_option(code: int, data: bytes = b"") -> bytes:
    """An option request: header and data ("Newstyle negotiation")."""
    return OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data


def encode_info_request_data(name: str, infos: tuple[int, ...] | list[int] = DEFAULT_INFOS) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: 32 bits name length, name, 16 bits
    number of information requests, 16 bits each."""
    raw = _text(name, "export name")
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def encode_meta_context_request_data(name: str, queries: tuple[str, ...] | list[str]
                                     = (BASE_ALLOCATION,)) -> bytes:
    """NBD_OPT_LIST/SET_META_CONTEXT data: 32 bits export name length, name,
    32 bits number of queries, each as 32 bits length + query."""
    raw = _text(name, "export name")
    out = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for q in queries:
        rq = _text(q, "meta context query")
        out += [U32.pack(len(rq)), rq]
    return b"".join(out)


# -- Handshake decoding -----------------------------------------------------

def decode_greeting(buf: Buffer) -> int | None:
    """The server's first 18 bytes: its handshake flags, or None."""
    if len(buf) < GREETING.size:
        return None
    magic, opt_magic, flags = GREETING.unpack_from(buf, 0)
    if magic != NBDMAGIC:
        raise ProtocolError(f"not an NBD server (magic 0x{magic:x})")
    if opt_magic != IHAVEOPT:
        # 0x00420281861253 would be oldstyle, which we do not speak.
        raise ProtocolError(f"not a newstyle NBD server (magic 0x{opt_magic:x})")
    return int(flags)


class OptionReply(NamedTuple):
    option: int
    type: int
    data: bytes


def decode_option_reply(buf: Buffer, pos: int = 0) -> tuple[OptionReply, int] | None:
    """One option reply from buf[pos:]: (reply, bytes consumed), or None."""
    if len(buf) - pos < OPTION_REPLY_HEADER.size:
        return None
    magic, option, rtype, length = OPTION_REPLY_HEADER.unpack_from(buf, pos)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic 0x{magic:x}")
    if length > MAX_OPTION_LENGTH:
        raise ProtocolError(f"option reply of {length} bytes is longer than {MAX_OPTION_LENGTH}")
    start = pos + OPTION_REPLY_HEADER.size
    if len(buf) < start + length:
        return None
    return OptionReply(option, rtype, bytes(buf[start:start + length])), start + length - pos


def decode_rep_server(data: bytes) -> tuple[str, str]:
    """NBD_REP_SERVER: 32 bits name length, name, then the description
    (the rest of the reply): (name, description)."""
    if len(data) < U32.size:
        raise ProtocolError("NBD_REP_SERVER is shorter than its name length")
    (n,) = U32.unpack_from(data, 0)
    if n > len(data) - U32.size:
        raise ProtocolError("NBD_REP_SERVER name is longer than the reply")
    name = _string(data[4:4 + n], "export name")
    return name, _string(data[4 + n:], "export description")


def decode_rep_meta_context(data: bytes) -> tuple[int, str]:
    """NBD_REP_META_CONTEXT: 32 bits context id, then the context name."""
    if len(data) < U32.size:
        raise ProtocolError("NBD_REP_META_CONTEXT is shorter than its id")
    (ctx_id,) = U32.unpack_from(data, 0)
    return ctx_id, _string(data[4:], "meta context name")


class InfoExport(NamedTuple):
    size: int
    flags: int          # transmission flags


class InfoName(NamedTuple):
    name: str


class InfoDescription(NamedTuple):
    description: str


class InfoBlockSize(NamedTuple):
    minimum: int
    preferred: int
    maximum: int


class InfoUnknown(NamedTuple):
    type: int
    data: bytes


Info = InfoExport | InfoName | InfoDescription | InfoBlockSize | InfoUnknown


def decode_rep_info(data: bytes) -> Info:
    """NBD_REP_INFO data: 16 bits information type, then its fields. Unknown
    types are returned as InfoUnknown for the caller to ignore ("NBD_OPT_INFO":
    the client MUST ignore information types it does not recognise)."""
    if len(data) < U16.size:
        raise ProtocolError("NBD_REP_INFO is shorter than its type")
    (itype,) = U16.unpack_from(data, 0)
    if itype == INFO_EXPORT:
        if len(data) != INFO_EXPORT_LAYOUT.size:     # "length MUST be 12"
            raise ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes, not 12")
        _, size, flags = INFO_EXPORT_LAYOUT.unpack(data)
        return InfoExport(size, flags)
    if itype == INFO_BLOCK_SIZE:
        if len(data) != INFO_BLOCK_SIZE_LAYOUT.size:  # "length MUST be 14"
            raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, not 14")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE_LAYOUT.unpack(data)
        return InfoBlockSize(minimum, preferred, maximum)
    if itype == INFO_NAME:
        return InfoName(_string(data[2:], "export name"))
    if itype == INFO_DESCRIPTION:
        return InfoDescription(_string(data[2:], "export description"))
    return InfoUnknown(itype, data[2:])


def decode_export_name_reply(buf: Buffer, no_zeroes: bool) -> tuple[InfoExport, int] | None:
    """The reply to NBD_OPT_EXPORT_NAME: 64 bits size, 16 bits transmission
    flags, 124 zero bytes unless NO_ZEROES was agreed."""
    need = EXPORT_NAME_REPLY.size + (0 if no_zeroes else 124)
    if len(buf) < need:
        return None
    size, flags = EXPORT_NAME_REPLY.unpack_from(buf, 0)
    return InfoExport(size, flags), need


# -- Transmission encoding --------------------------------------------------

def encode_request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    """A request header ("Request message"); a WRITE's payload follows it."""
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# -- Transmission decoding --------------------------------------------------

class SimpleReply(NamedTuple):
    """A simple reply header. A successful READ's data follows it on the wire:
    only the client knows how long it is (the request's length)."""
    cookie: int
    error: int


class ChunkHeader(NamedTuple):
    flags: int
    type: int
    cookie: int
    length: int


class OffsetData(NamedTuple):
    cookie: int
    done: bool
    offset: int
    data: bytes


class OffsetHole(NamedTuple):
    cookie: int
    done: bool
    offset: int
    length: int


class BlockStatus(NamedTuple):
    cookie: int
    done: bool
    context_id: int
    extents: list[tuple[int, int]]      # (length, status flags)


class ErrorChunk(NamedTuple):
    """NBD_REPLY_TYPE_ERROR, ERROR_OFFSET (offset set), or an error type we do
    not know (type has bit 15 set): the request failed, the connection goes on."""
    cookie: int
    done: bool
    error: int
    message: str
    offset: int | None
    type: int


class NoneChunk(NamedTuple):
    cookie: int
    done: bool


Chunk = OffsetData | OffsetHole | BlockStatus | ErrorChunk | NoneChunk


def decode_reply_header(buf: Buffer, pos: int = 0, max_payload: int = MAX_CHUNK_PAYLOAD
                        ) -> tuple[SimpleReply | ChunkHeader, int] | None:
    """The next reply header from buf[pos:], without its payload: a simple
    reply (16 bytes) or a structured chunk header (20 bytes) whose payload
    length is checked against max_payload. (header, bytes consumed), or None.
    For a client that puts an OFFSET_DATA payload straight where it belongs
    instead of copying it out of a buffer."""
    if len(buf) - pos < 4:
        return None
    (magic,) = U32.unpack_from(buf, pos)
    if magic == SIMPLE_REPLY_MAGIC:
        if len(buf) - pos < SIMPLE_REPLY.size:
            return None
        _, error, cookie = SIMPLE_REPLY.unpack_from(buf, pos)
        return SimpleReply(cookie, error), SIMPLE_REPLY.size
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")
    if len(buf) - pos < STRUCTURED_REPLY.size:
        return None
    _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack_from(buf, pos)
    if length > max_payload:
        raise ProtocolError(f"reply chunk of {length} bytes is longer than {max_payload}")
    return ChunkHeader(flags, rtype, cookie, length), STRUCTURED_REPLY.size


def decode_reply(buf: Buffer, pos: int = 0, max_payload: int = MAX_CHUNK_PAYLOAD
                 ) -> tuple[SimpleReply | Chunk, int] | None:
    """The next reply message from buf[pos:]: a simple reply header (16
    bytes; a READ's data, if any, is the caller's to take next) or a whole
    structured chunk. (message, bytes consumed), or None for "need more"."""
    got = decode_reply_header(buf, pos, max_payload)
    if got is None:
        return None
    header, used = got
    if isinstance(header, SimpleReply):
        return header, used
    start = pos + used
    if len(buf) - start < header.length:
        return None
    chunk = decode_chunk(header, bytes(buf[start:start + header.length]))
    return chunk, used + header.length


def decode_chunk(header: ChunkHeader, payload: bytes) -> Chunk:
    """One structured reply chunk's payload, checked against "Structured
    reply types"."""
    flags, rtype, cookie, length = header
    if len(payload) != length:
        raise ProtocolError(f"chunk payload of {len(payload)} bytes, header says {length}")
    done = bool(flags & REPLY_FLAG_DONE)
    if rtype == REPLY_TYPE_NONE:
        # "length MUST be 0 ... MUST always be used with NBD_REPLY_FLAG_DONE".
        if length or not done:
            raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload or without DONE")
        return NoneChunk(cookie, done)
    if rtype == REPLY_TYPE_OFFSET_DATA:
        if length < 9:                                  # "MUST be at least 9"
            raise ProtocolError(f"OFFSET_DATA chunk of {length} bytes")
        (offset,) = U64.unpack_from(payload, 0)
        return OffsetData(cookie, done, offset, payload[8:])
    if rtype == REPLY_TYPE_OFFSET_HOLE:
        if length != OFFSET_HOLE.size:                  # "MUST be exactly 12"
            raise ProtocolError(f"OFFSET_HOLE chunk of {length} bytes")
        offset, size = OFFSET_HOLE.unpack(payload)
        if size == 0:                                   # "MUST be nonzero"
            raise ProtocolError("OFFSET_HOLE of 0 bytes")
        return OffsetHole(cookie, done, offset, size)
    if rtype == REPLY_TYPE_BLOCK_STATUS:
        # "length MUST be 4 + (a positive integer multiple of 8)".
        if length < 12 or (length - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS chunk of {length} bytes")
        (ctx_id,) = U32.unpack_from(payload, 0)
        extents = [EXTENT.unpack_from(payload, at) for at in range(4, length, 8)]
        if any(n == 0 for n, _ in extents):            # "MUST NOT be zero"
            raise ProtocolError("BLOCK_STATUS descriptor of length 0")
        return BlockStatus(cookie, done, ctx_id, extents)
    if rtype & REPLY_TYPE_ERROR_BIT:
        # Every error type starts with error and message length. A type we
        # do not know still fails only its request, unless the message does
        # not fit ("Structured reply types", last paragraphs).
        if length < ERROR_CHUNK.size:
            raise ProtocolError(f"error chunk of {length} bytes")
        error, mlen = ERROR_CHUNK.unpack_from(payload, 0)
        end = ERROR_CHUNK.size + mlen
        if end > length:
            raise ProtocolError("error chunk message is longer than the chunk")
        message = _message(payload[ERROR_CHUNK.size:end])
        offset = None
        if rtype == REPLY_TYPE_ERROR_OFFSET:
            if length != end + U64.size:
                raise ProtocolError(f"ERROR_OFFSET chunk of {length} bytes, not {end + 8}")
            (offset,) = U64.unpack_from(payload, end)
        if error == 0 and rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
            raise ProtocolError("error chunk with error 0")     # "MUST be nonzero"
        return ErrorChunk(cookie, done, error, message, offset, rtype)
    raise ProtocolError(f"unknown reply chunk type {rtype}")

