"""nbdwire's server half: the fuzz invariant, round trips, and the exact wire
layouts. (Moved from tests/daemon/test_codec.py with daemon/codec.py.)

The invariant the codec promises (nbdwire.server's docstring): whatever bytes
arrive, a decoder returns a value, returns None ("need more bytes"), or
raises one of our own errors -- ProtocolError (close the connection) or
OptionDataError (answer NBD_REP_ERR_INVALID, go on). Never IndexError,
struct.error, UnicodeDecodeError or anything else.

The byte strings in the layout tests are written out by hand from
proto.md (NetworkBlockDevice/nbd doc/proto.md), not computed with the
codec's own structs.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings, strategies as st

import nbdwire as c

OUR_ERRORS = (c.ProtocolError, c.OptionDataError)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

# The connection hands decoders bytearrays and memoryviews, not only bytes.
buffer_kinds = st.sampled_from([bytes, bytearray, lambda b: memoryview(bytearray(b))])


def pack_u32(n: int) -> bytes:
    return struct.pack(">I", n)


def pack_u16(n: int) -> bytes:
    return struct.pack(">H", n)


@st.composite
def option_like(draw) -> bytes:
    """Bytes that look like option requests often enough to get past the
    magic: a real header with a length that may lie, data, then noise."""
    magic = draw(st.sampled_from([c.IHAVEOPT, c.IHAVEOPT, c.REQUEST_MAGIC, 0]) | u64)
    code = draw(st.sampled_from(sorted(c.OPTION_NAMES)) | u32)
    data = draw(st.binary(max_size=64))
    length = draw(st.sampled_from([len(data), len(data) + 1, max(len(data) - 1, 0),
                                   c.MAX_OPTION_LENGTH, c.MAX_OPTION_LENGTH + 1]) | u32)
    raw = struct.pack(">QII", magic, code, length) + data
    return raw[:draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=16))


@st.composite
def request_like(draw) -> bytes:
    magic = draw(st.sampled_from([c.REQUEST_MAGIC, c.REQUEST_MAGIC, c.SIMPLE_REPLY_MAGIC]) | u32)
    raw = struct.pack(">IHHQQI", magic, draw(u16), draw(u16), draw(u64), draw(u64), draw(u32))
    return raw[:draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=40))


@st.composite
def string_field(draw) -> bytes:
    """32-bit length + string, where the length may lie about the string."""
    raw = draw(st.text(max_size=20)).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=20))           # maybe not UTF-8 at all
    length = draw(st.sampled_from([len(raw)] * 4 + [len(raw) + 1, max(len(raw) - 1, 0),
                                                    c.MAX_STRING + 1, 2**32 - 1]))
    return pack_u32(length) + raw


@st.composite
def info_like(draw) -> bytes:
    infos = draw(st.lists(u16, max_size=6))
    count = draw(st.sampled_from([len(infos)] * 3 + [len(infos) + 1, 0xFFFF]))
    raw = draw(string_field()) + pack_u16(count) + b"".join(pack_u16(i) for i in infos)
    raw = raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
    return raw + draw(st.binary(max_size=4))


@st.composite
def meta_like(draw) -> bytes:
    queries = draw(st.lists(string_field(), max_size=4))
    count = draw(st.sampled_from([len(queries)] * 3 + [len(queries) + 1, 1025, 2**32 - 1]))
    raw = draw(string_field()) + pack_u32(count) + b"".join(queries)
    raw = raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
    return raw + draw(st.binary(max_size=4))


# -- the fuzz invariant --------------------------------------------------------------

@given(st.binary(max_size=200) | option_like(), buffer_kinds, st.data())
@example(b"", bytes, None)
def test_decode_option_never_raises_anything_else(raw, kind, data):
    pos = data.draw(st.integers(0, len(raw))) if data is not None else 0
    buf = kind(raw)
    try:
        got = c.decode_option(buf, pos)
    except c.ProtocolError:
        return
    if got is None:
        return
    opt, used = got
    # What it consumed is exactly one header plus the length it announced.
    assert pos + used <= len(raw)
    assert used == c.OPTION_HEADER.size + len(opt.data)
    assert isinstance(opt.data, bytes)
    assert opt.data == bytes(raw[pos + c.OPTION_HEADER.size:pos + used])


def server_request(buf, pos: int = 0):
    """A request header decoded the way daemon/connection.py does inline (for
    speed, there is no decode function): the REQUEST layout and a magic check.
    None if fewer than 28 bytes."""
    if len(buf) - pos < c.REQUEST.size:
        return None
    magic, flags, cmd, cookie, offset, length = c.REQUEST.unpack_from(buf, pos)
    if magic != c.REQUEST_MAGIC:
        raise c.ProtocolError(f"bad request magic 0x{magic:08x}")
    return flags, cmd, cookie, offset, length


@given(st.binary(max_size=100) | request_like(), buffer_kinds, st.data())
def test_request_layout_never_raises_anything_else(raw, kind, data):
    pos = data.draw(st.integers(0, len(raw)))
    try:
        got = server_request(kind(raw), pos)
    except c.ProtocolError:
        return
    if got is None:
        assert len(raw) - pos < 28
        return
    assert len(got) == 5


@given(u16, u16, u64, u64, u32, st.binary(max_size=40), st.binary(max_size=40), buffer_kinds)
def test_request_round_trip(flags, cmd, cookie, offset, length, before, after, kind):
    # Encoded by the client codec, decoded as the server does.
    raw = before + c.encode_request(cmd, cookie, offset, length, flags) + after
    assert server_request(kind(raw), len(before)) == (flags, cmd, cookie, offset, length)


@given(u16, u16, u64, u64, u32)
def test_truncated_request_needs_more_bytes(flags, cmd, cookie, offset, length):
    raw = c.encode_request(cmd, cookie, offset, length, flags)
    for n in range(len(raw)):
        assert server_request(raw[:n]) is None


@given(st.lists(st.tuples(u32, st.binary(max_size=300)), min_size=1, max_size=5))
def test_options_round_trip_one_after_another(options):
    raw = b"".join(struct.pack(">QII", c.IHAVEOPT, code, len(data)) + data
                   for code, data in options)
    pos = 0
    for code, data in options:
        # Every strict prefix of the next option is "need more bytes".
        end = pos + 16 + len(data)
        for cut in (pos, pos + 15, end - 1):
            if cut >= pos and cut < end:
                assert c.decode_option(raw[:cut], pos) is None
        opt, used = c.decode_option(bytearray(raw), pos)
        assert opt == c.Option(code, data)
        pos += used
    assert pos == len(raw)


def test_option_too_long_is_refused_before_its_data_arrives():
    # A header announcing more than we accept is refused at once, so a hostile
    # client cannot make us buffer it.
    header = struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, c.MAX_OPTION_LENGTH + 1)
    with pytest.raises(c.ProtocolError):
        c.decode_option(header)
    header = struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, c.MAX_OPTION_LENGTH)
    assert c.decode_option(header) is None


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(names, st.lists(u16, max_size=10))
def test_info_request_round_trip(name, infos):
    raw = name.encode()
    data = pack_u32(len(raw)) + raw + pack_u16(len(infos)) + b"".join(pack_u16(i) for i in infos)
    assert c.decode_info_request(data) == (name, infos)
    # Any truncation, or one byte too many, is malformed.
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(c.OptionDataError):
            c.decode_info_request(bad)


@given(names, st.lists(names, max_size=6))
def test_meta_context_request_round_trip(name, queries):
    raw = name.encode()
    data = pack_u32(len(raw)) + raw + pack_u32(len(queries))
    for q in queries:
        data += pack_u32(len(q.encode())) + q.encode()
    assert c.decode_meta_context_request(data) == (name, queries)
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(c.OptionDataError):
            c.decode_meta_context_request(bad)


def test_strings_up_to_4096_bytes_are_accepted_and_longer_refused():
    # "Conventions": a string MUST be no longer than 4096 bytes.
    ok = "é" * 2048                                   # 4096 bytes of UTF-8
    data = pack_u32(4096) + ok.encode() + pack_u16(0)
    assert c.decode_info_request(data) == (ok, [])
    data = pack_u32(4097) + b"a" * 4097 + pack_u16(0)
    with pytest.raises(c.OptionDataError):
        c.decode_info_request(data)
    assert c.decode_export_name(b"v" * 4096) == "v" * 4096
    with pytest.raises(c.ProtocolError):
        c.decode_export_name(b"v" * 4097)


@given(names)
def test_export_name_round_trip(name):
    assert c.decode_export_name(name.encode()) == name


# -- encoders against the spec, byte by byte ----------------------------------------------

def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


def test_greeting_layout():
    # "Newstyle negotiation": 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits
    # handshake flags; we offer FIXED_NEWSTYLE (bit 0) and NO_ZEROES (bit 1).
    assert c.encode_greeting() == b"NBDMAGIC" + b"IHAVEOPT" + h("0003")


def test_option_reply_layouts():
    # "Fixed newstyle negotiation": 64 bits 0x3e889045565a9, 32 bits option,
    # 32 bits reply type, 32 bits length, data.
    magic = "0003e889045565a9"
    assert c.encode_option_reply(c.OPT_LIST, c.REP_ACK) == h(
        f"{magic} | 00000003 | 00000001 | 00000000")
    # NBD_REP_ERR_UNKNOWN is 2^31 + 6; error replies may carry a message.
    assert c.encode_option_error(c.OPT_GO, c.REP_ERR_UNKNOWN, "no") == h(
        f"{magic} | 00000007 | 80000006 | 00000002") + b"no"
    # NBD_REP_SERVER: 32 bits name length, name, then an optional description.
    assert c.encode_rep_server(c.OPT_LIST, "vol") == h(
        f"{magic} | 00000003 | 00000002 | 00000007 | 00000003") + b"vol"
    assert c.encode_rep_server(c.OPT_LIST, "vol", "d") == h(
        f"{magic} | 00000003 | 00000002 | 00000008 | 00000003") + b"vold"


def test_info_layouts():
    magic = "0003e889045565a9"
    # NBD_INFO_EXPORT: length MUST be 12: 16 bits type 0, 64 bits size, 16 bits flags.
    assert c.encode_info_export(c.OPT_GO, 1 << 30, 0x0123) == h(
        f"{magic} | 00000007 | 00000003 | 0000000c | 0000 | 0000000040000000 | 0123")
    # NBD_INFO_BLOCK_SIZE: length MUST be 14: type 3, min, preferred, max payload.
    assert c.encode_info_block_size(c.OPT_INFO, 1, 4096, 32 << 20) == h(
        f"{magic} | 00000006 | 00000003 | 0000000e | 0003 | 00000001 | 00001000 | 02000000")
    # NBD_INFO_NAME / NBD_INFO_DESCRIPTION: type, then the string (length - 2).
    assert c.encode_info_string(c.OPT_GO, c.INFO_NAME, "ab") == h(
        f"{magic} | 00000007 | 00000003 | 00000004 | 0001") + b"ab"
    # NBD_REP_META_CONTEXT: 32 bits context id, then the name.
    assert c.encode_meta_context(c.OPT_SET_META_CONTEXT, 1, "base:allocation") == h(
        f"{magic} | 0000000a | 00000004 | 00000013 | 00000001") + b"base:allocation"


def test_export_name_reply_layout():
    # NBD_OPT_EXPORT_NAME reply: 64 bits size, 16 bits transmission flags, then
    # 124 zero bytes unless NBD_FLAG_C_NO_ZEROES was negotiated.
    assert c.encode_export_name_reply(4096, 0x0003, no_zeroes=True) == h(
        "0000000000001000 | 0003")
    assert c.encode_export_name_reply(4096, 0x0003, no_zeroes=False) == h(
        "0000000000001000 | 0003") + bytes(124)


def test_transmission_reply_layouts():
    # "Simple reply message": 0x67446698, 32 bits error, 64 bits cookie.
    assert c.encode_simple_reply(0x0102030405060708, c.EINVAL) == h(
        "67446698 | 00000016 | 0102030405060708")
    # "Structured reply chunk message": 0x668e33ef, 16 bits flags, 16 bits
    # type, 64 bits cookie, 32 bits length. NBD_REPLY_TYPE_NONE: DONE, length 0.
    assert c.encode_done(7) == h("668e33ef | 0001 | 0000 | 0000000000000007 | 00000000")
    # NBD_REPLY_TYPE_OFFSET_DATA: length covers the 64-bit offset and the data.
    assert c.encode_offset_data_header(7, 0x1000, 512) == h(
        "668e33ef | 0001 | 0001 | 0000000000000007 | 00000208 | 0000000000001000")
    assert c.encode_offset_data_header(7, 0, 1, done=False)[4:6] == h("0000")
    # NBD_REPLY_TYPE_ERROR (2^15 + 1): 32 bits error, 16 bits message length, message.
    assert c.encode_error_chunk(9, c.EPERM, "ro") == h(
        "668e33ef | 0001 | 8001 | 0000000000000009 | 00000008 | 00000001 | 0002") + b"ro"
    # NBD_REPLY_TYPE_BLOCK_STATUS (5): 32 bits context id, then (length, flags) pairs.
    assert c.encode_block_status(9, 1, [(4096, 3), (512, 0)], done=True) == h(
        "668e33ef | 0001 | 0005 | 0000000000000009 | 00000014 | 00000001"
        "| 00001000 00000003 | 00000200 00000000")


def test_error_numbers_are_the_spec_values():
    # "Error values"
    assert (c.EPERM, c.EIO, c.ENOMEM, c.EINVAL, c.ENOSPC, c.EOVERFLOW, c.ENOTSUP,
            c.ESHUTDOWN) == (1, 5, 12, 22, 28, 75, 95, 108)


# -- encoder properties ------------------------------------------------------------------

messages = st.text(st.characters(blacklist_categories=("Cs",)), max_size=5000)
# 6000 bytes of two-byte characters: a cut at 4096 bytes falls inside one.
LONG_MESSAGES = ("é" * 3000, "a" + "é" * 3000)


@given(messages)
@settings(max_examples=100)
@example(LONG_MESSAGES[0])
@example(LONG_MESSAGES[1])
def test_option_error_message_is_a_valid_string(message):
    # "Conventions": strings (error messages among them) are UTF-8 and MUST be
    # no longer than 4096 bytes. Shortening a message must not cut a character.
    reply = c.encode_option_error(c.OPT_GO, c.REP_ERR_UNKNOWN, message)
    (length,) = struct.unpack_from(">I", reply, 16)
    text = reply[20:]
    assert len(text) == length <= 4096
    assert message.startswith(text.decode("utf-8"))


@given(messages)
@settings(max_examples=100)
@example(LONG_MESSAGES[0])
@example(LONG_MESSAGES[1])
def test_error_chunk_message_is_a_valid_string(message):
    # NBD_REPLY_TYPE_ERROR: "message length MUST NOT exceed the 4096 bytes
    # string length limit", and the message is a string ("Conventions").
    chunk = c.encode_error_chunk(1, c.EINVAL, message)
    (payload_len,) = struct.unpack_from(">I", chunk, 16)
    error, msg_len = struct.unpack_from(">IH", chunk, 20)
    assert error == c.EINVAL
    assert payload_len == 6 + msg_len == len(chunk) - 20 and msg_len <= 4096
    assert message.startswith(chunk[26:].decode("utf-8"))


@given(u64, st.integers(1, 1 << 20), st.booleans())
def test_offset_data_header_length_counts_offset_and_data(offset, length, done):
    raw = c.encode_offset_data_header(5, offset, length, done)
    magic, flags, rtype, cookie, plen = struct.unpack_from(">IHHQI", raw)
    assert (magic, rtype, cookie, plen) == (0x668E33EF, 1, 5, length + 8)
    assert flags == (1 if done else 0)
    assert struct.unpack_from(">Q", raw, 20) == (offset,)


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), u32), min_size=1, max_size=50), u32,
       st.booleans())
def test_block_status_chunk_length_is_4_plus_8n(extents, ctx, done):
    # NBD_REPLY_TYPE_BLOCK_STATUS: "length MUST be 4 + (a positive integer multiple of 8)".
    raw = c.encode_block_status(3, ctx, extents, done)
    (plen,) = struct.unpack_from(">I", raw, 16)
    assert plen == 4 + 8 * len(extents) == len(raw) - 20
    body = raw[24:]
    assert [struct.unpack_from(">II", body, 8 * i) for i in range(len(extents))] == extents
