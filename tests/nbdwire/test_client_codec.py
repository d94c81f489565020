"""nbdwire's client half: the fuzz invariant and the exact wire layouts.

The invariant (nbdwire.client's docstring): whatever a server sends, the
decoders and ClientHandshake.receive return a value (or None, "need more
bytes") or raise ProtocolError -- never IndexError, struct.error,
UnicodeDecodeError or anything else.

The byte strings in the layout tests are written out by hand from proto.md.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings, strategies as st

import nbdwire as c

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
buffer_kinds = st.sampled_from([bytes, bytearray, lambda b: memoryview(bytearray(b))])


@st.composite
def option_reply_like(draw) -> bytes:
    """Option replies whose fields and lengths may lie."""
    option = draw(st.sampled_from(sorted(c.OPTION_NAMES)) | u32)
    rtype = draw(st.sampled_from(sorted(c.REPLY_NAMES)) | u32)
    data = draw(st.binary(max_size=40) | st.sampled_from([
        struct.pack(">HQH", 0, 4096, 1), struct.pack(">HIII", 3, 1, 4096, 1 << 25),
        struct.pack(">I", 3) + b"vol", struct.pack(">I", 99) + b"v", struct.pack(">H", 1) + b"\xff",
        struct.pack(">I", 1) + c.BASE_ALLOCATION.encode()]))
    length = draw(st.sampled_from([len(data)] * 4 + [len(data) + 1, c.MAX_OPTION_LENGTH + 1]) | u32)
    magic = draw(st.sampled_from([c.OPTION_REPLY_MAGIC] * 4 + [0]))
    raw = struct.pack(">QIII", magic, option, rtype, length) + data
    return raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw


@st.composite
def reply_like(draw) -> bytes:
    """Simple replies and structured chunks of every type, lengths that may lie."""
    if draw(st.booleans()):
        return struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, draw(u32), draw(u64))[:draw(st.integers(0, 16))]
    rtype = draw(st.sampled_from([0, 1, 2, 5, 0x8001, 0x8002, 0x8003, 3]) | u16)
    payload = draw(st.binary(max_size=40) | st.sampled_from([
        struct.pack(">QI", 0, 0), struct.pack(">QI", 0, 512), struct.pack(">IH", 5, 2) + b"no",
        struct.pack(">IH", 5, 60000), struct.pack(">IH", 5, 0) + bytes(8),
        struct.pack(">III", 1, 0, 0), struct.pack(">III", 1, 512, 3)]))
    length = draw(st.sampled_from([len(payload)] * 4 + [len(payload) + 1, 2**32 - 1]) | u32)
    flags = draw(st.sampled_from([0, 1]) | u16)
    raw = struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, flags, rtype, draw(u64), length) + payload
    return raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw


# -- the fuzz invariant --------------------------------------------------------------

@given(st.binary(max_size=200) | option_reply_like(), buffer_kinds)
def test_decode_option_reply_never_raises_anything_else(raw, kind):
    try:
        got = c.decode_option_reply(kind(raw))
    except c.ProtocolError:
        return
    if got is None:
        return
    reply, used = got
    assert used == 20 + len(reply.data) <= len(raw)
    # Each kind of reply data decodes or raises ProtocolError.
    for decode in (c.decode_rep_server, c.decode_rep_info, c.decode_rep_meta_context):
        try:
            decode(reply.data)
        except c.ProtocolError:
            pass


@given(st.binary(max_size=100) | reply_like(), buffer_kinds)
@example(struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, 0, 5, 1, 4), bytes)  # no descriptor
def test_decode_reply_never_raises_anything_else(raw, kind):
    try:
        got = c.decode_reply(kind(raw))
    except c.ProtocolError:
        return
    if got is not None:
        _msg, used = got
        assert used <= len(raw)



@given(st.binary(max_size=100) | reply_like(), buffer_kinds, st.integers(0, 8))
def test_decode_reply_header_agrees_with_decode_reply(raw, kind, pos):
    # The header alone: the same verdict as decode_reply on the magic and
    # the length limit, and the header decode_reply's chunk was built from.
    buf = kind(bytes(pos) + raw)
    try:
        got = c.decode_reply_header(buf, pos)
    except c.ProtocolError:
        with pytest.raises(c.ProtocolError):
            c.decode_reply(buf, pos)
        return
    if got is None:
        assert len(raw) < 20
        return
    header, used = got
    if isinstance(header, c.SimpleReply):
        assert used == 16 and c.decode_reply(buf, pos) == (header, 16)
        return
    assert used == 20 and header.length <= c.MAX_CHUNK_PAYLOAD
    try:
        whole = c.decode_reply(buf, pos)
    except c.ProtocolError:
        return          # the payload broke a rule: decode_chunk's business
    if whole is not None:
        chunk, n = whole
        assert n == 20 + header.length and chunk.cookie == header.cookie


def test_decode_reply_header_leaves_the_payload():
    raw = struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, 1, 1, 7, 4105) + bytes(8)
    assert c.decode_reply_header(raw) == (c.ChunkHeader(1, 1, 7, 4105), 20)
    assert c.decode_reply(raw) is None      # the whole chunk is not there yet
    assert c.decode_reply_header(raw[:19]) is None
    with pytest.raises(c.ProtocolError):
        c.decode_reply_header(raw, max_payload=4096)

@given(st.binary(max_size=30), st.binary(max_size=30) | option_reply_like(),
       st.sampled_from([{}, {"meta_contexts": [c.BASE_ALLOCATION], "list_exports": True},
                        {"tls": "prefer"}, {"info_only": True}, {"export_name": True}]))
@settings(max_examples=300)
def test_client_handshake_never_raises_anything_else(noise, reply, options):
    # A valid greeting, then replies that may be wrong, or noise from the start.
    client = c.ClientHandshake("vol", **options)
    try:
        for data in (c.encode_greeting(), reply, noise):
            for ev in client.receive(data):
                if isinstance(ev, c.StartTLS):
                    client.resume()
    except c.ProtocolError:
        pass
    client = c.ClientHandshake("vol", **options)
    try:
        client.receive(noise + reply)
    except c.ProtocolError:
        pass


def test_hostile_lengths_are_refused_before_they_are_buffered():
    # A server announcing a 4 GiB option reply or chunk is refused from the
    # header alone, so it cannot make the client buffer it.
    with pytest.raises(c.ProtocolError):
        c.decode_option_reply(struct.pack(">QIII", c.OPTION_REPLY_MAGIC, 7, 3, 2**32 - 1))
    with pytest.raises(c.ProtocolError):
        c.decode_reply(struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, 1, 1, 1, 2**32 - 1))


@pytest.mark.parametrize("rtype, payload", [
    (c.REPLY_TYPE_NONE, b"x"),                                  # NONE has no payload
    (c.REPLY_TYPE_OFFSET_DATA, bytes(8)),                       # at least 9
    (c.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 0, 0)),       # hole size nonzero
    (c.REPLY_TYPE_OFFSET_HOLE, bytes(11)),                      # exactly 12
    (c.REPLY_TYPE_BLOCK_STATUS, bytes(4)),                      # 4 + 8n, n >= 1
    (c.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, 0, 0)),  # length MUST NOT be 0
    (c.REPLY_TYPE_ERROR, struct.pack(">IH", 0, 0)),             # error MUST be nonzero
    (c.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 3) + b"ab"),     # message too long
    (c.REPLY_TYPE_ERROR_OFFSET, struct.pack(">IH", 5, 0)),      # at least 14
    (3, b""),                                                   # unknown, bit 15 clear
])
def test_malformed_chunks_are_protocol_errors(rtype, payload):
    raw = struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, 1, rtype, 9, len(payload)) + payload
    with pytest.raises(c.ProtocolError):
        c.decode_reply(raw)


def test_unknown_error_chunk_fails_only_its_request():
    # "If the client receives an unknown or unexpected type with bit 15 set,
    # it MUST consider the current reply as errored, but MAY continue".
    raw = struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, 1, 0x8077, 9, 8) + struct.pack(">IH", 5, 2) + b"hi"
    assert c.decode_reply(raw) == (c.ErrorChunk(9, True, 5, "hi", None, 0x8077), 28)


# -- encoders and decoders against the spec, byte by byte ---------------------------------

def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


def test_option_and_request_layouts():
    # Option request: "IHAVEOPT", 32 bits option, 32 bits length, data.
    assert c.encode_option(c.OPT_STRUCTURED_REPLY) == b"IHAVEOPT" + h("00000008 | 00000000")
    # NBD_OPT_GO data: 32 bits name length, name, 16 bits count, 16 bits each.
    assert c.encode_info_request_data("vol", [c.INFO_NAME, c.INFO_BLOCK_SIZE]) == h(
        "00000003") + b"vol" + h("0002 | 0001 | 0003")
    # NBD_OPT_SET_META_CONTEXT data: name length, name, query count, each query.
    assert c.encode_meta_context_request_data("v", ["base:allocation"]) == h(
        "00000001") + b"v" + h("00000001 | 0000000f") + b"base:allocation"
    # Request: 0x25609513, 16 bits flags, 16 bits type, 64 bits cookie,
    # 64 bits offset, 32 bits length.
    assert c.encode_request(c.CMD_WRITE, 7, 4096, 512, c.CMD_FLAG_FUA) == h(
        "25609513 | 0001 | 0001 | 0000000000000007 | 0000000000001000 | 00000200")
    with pytest.raises(ValueError):
        c.encode_info_request_data("v" * 4097)


def test_chunk_layouts_decode():
    # NBD_REPLY_TYPE_OFFSET_HOLE (2): 64 bits offset, 32 bits hole size.
    assert c.decode_reply(h("668e33ef | 0000 | 0002 | 0000000000000003 | 0000000c"
                            "| 0000000000002000 | 00001000")) == (
        c.OffsetHole(3, False, 0x2000, 0x1000), 32)
    # NBD_REPLY_TYPE_ERROR_OFFSET (2^15 + 2): error, message length, message, offset.
    assert c.decode_reply(h("668e33ef | 0001 | 8002 | 0000000000000003 | 00000010"
                            "| 00000005 | 0002") + b"io" + h("0000000000000200")) == (
        c.ErrorChunk(3, True, c.EIO, "io", 0x200, c.REPLY_TYPE_ERROR_OFFSET), 36)


def test_greeting_and_info_decode():
    assert c.decode_greeting(b"NBDMAGIC" + b"IHAVEOPT" + h("0003")) == 3
    assert c.decode_greeting(b"NBDMAGIC") is None
    with pytest.raises(c.ProtocolError):      # oldstyle
        c.decode_greeting(b"NBDMAGIC" + h("0000420281861253 | 0000"))
    assert c.decode_rep_info(h("0000 | 0000000000100000 | 0003")) == c.InfoExport(1 << 20, 3)
    assert c.decode_rep_info(h("0003 | 00000001 | 00001000 | 02000000")) == c.InfoBlockSize(
        1, 4096, 32 << 20)
    assert c.decode_rep_info(h("0009 | 00")) == c.InfoUnknown(9, b"\0")
    with pytest.raises(c.ProtocolError):      # "length MUST be 12"
        c.decode_rep_info(h("0000 | 0000000000100000"))
