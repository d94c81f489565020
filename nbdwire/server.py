"""The server's half of the wire: decode what a client sends in the
handshake, encode every reply.

Rule of this module: no I/O and no state. Whatever bytes arrive, the
decoders return a value, return None ("need more bytes"), or raise
ProtocolError / OptionDataError (see errors.py) -- never anything else.

Requests are decoded by the connection itself, inline, with the REQUEST
layout (layouts.py) and a magic check: a function call per request would
cost the hot path for nothing. The encoders of the transmission phase are
single precompiled Struct packs for the same reason.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from .constants import (
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)
from .errors import OptionDataError, OptionTooBig, OptionTooLong, ProtocolError
from .layouts import (
    ERROR_CHUNK,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    EXTENT,
    GREETING,
    INFO_BLOCK_SIZE_LAYOUT,
    INFO_EXPORT_LAYOUT,
    OFFSET,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    U16,
    U32,
)
from .limits import MAX_META_QUERIES, MAX_OPTION_LENGTH, MAX_STRING

__all__ = [
    "Option",
    "decode_export_name",
    "decode_info_request",
    "decode_meta_context_request",
    "decode_option",
    "encode_block_status",
    "encode_chunk_header",
    "encode_done",
    "encode_error_chunk",
    "encode_export_name_reply",
    "encode_greeting",
    "encode_info_block_size",
    "encode_info_export",
    "encode_info_string",
    "encode_meta_context",
    "encode_offset_data_header",
    "encode_option_error",
    "encode_option_reply",
    "encode_rep_server",
    "encode_simple_reply",
    "utf8_cut",
]

Buffer = bytes | bytearray | memoryview


# -- Handshake decoding -----------------------------------------------------

class Option(NamedTuple):
    code: int
    data: bytes


def decode_option(buf: Buffer, pos: int = 0) -> tuple[Option, int] | None:
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


# -- Handshake encoding -----------------------------------------------------

def encode_greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def utf8_cut(text: str, limit: int) -> bytes:
    """UTF-8 of text, cut to at most `limit` bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_option_error(option: int, reply_type: int, message: str = "") -> bytes:
    return encode_option_reply(option, reply_type, utf8_cut(message, MAX_STRING))


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


# -- Transmission encoding --------------------------------------------------

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
    raw = utf8_cut(message, MAX_STRING)
    return (STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                  cookie, ERROR_CHUNK.size + len(raw))
            + ERROR_CHUNK.pack(error, len(raw)) + raw)


def encode_block_status(cookie: int, context_id: int, extents: list[tuple[int, int]],
                        done: bool) -> bytes:
    body = U32.pack(context_id) + b"".join(EXTENT.pack(n, f) for n, f in extents)
    return encode_chunk_header(cookie, REPLY_FLAG_DONE if done else 0,
                               REPLY_TYPE_BLOCK_STATUS, len(body)) + body
