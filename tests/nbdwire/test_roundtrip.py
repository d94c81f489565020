"""The sans-IO client handshake against the server's real Negotiation, in
memory; and transmission messages across the two codecs."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

import nbdwire as c

from .memserver import PENDING, MemoryServer, drive


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


def only(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_go_with_list_structured_replies_and_base_allocation(byte_by_byte):
    server = MemoryServer()
    client = c.ClientHandshake("vol", list_exports=True, meta_contexts=[c.BASE_ALLOCATION])
    events = drive(client, server, byte_by_byte)

    assert server.options == [c.OPT_LIST, c.OPT_STRUCTURED_REPLY, c.OPT_SET_META_CONTEXT,
                              c.OPT_GO]
    assert only(events, c.ListEntry) == [c.ListEntry("vol", ""), c.ListEntry("other", "")]
    assert only(events, c.Acked) == [c.Acked(c.OPT_LIST), c.Acked(c.OPT_STRUCTURED_REPLY),
                                     c.Acked(c.OPT_SET_META_CONTEXT)]
    [meta] = only(events, c.MetaContext)
    assert meta.name == c.BASE_ALLOCATION
    assert only(events, c.InfoName) == [c.InfoName("vol")]
    assert only(events, c.InfoDescription) == [c.InfoDescription("volume vol")]
    assert only(events, c.InfoBlockSize) == [c.InfoBlockSize(1, 4096, c.MAX_PAYLOAD)]
    ready = events[-1]
    assert isinstance(ready, c.Ready)
    assert (ready.size, ready.structured, ready.name) == (1 << 20, True, "vol")
    assert ready.contexts == {meta.id: c.BASE_ALLOCATION}
    assert ready.flags & c.TF_HAS_FLAGS and ready.flags & c.TF_SEND_DF
    assert not ready.flags & c.TF_READ_ONLY
    # Both sides agree on what was negotiated.
    assert server.export is not None and server.export.name == "vol"
    assert server.negotiation.structured
    assert server.negotiation.meta == ready.contexts
    assert server.negotiation.no_zeroes and client.no_zeroes


def test_two_meta_contexts_get_two_ids():
    server = MemoryServer()
    client = c.ClientHandshake("vol", meta_contexts=[c.BASE_ALLOCATION, PENDING, "x-none:nope"])
    ready = drive(client, server)[-1]
    assert sorted(ready.contexts.values()) == [c.BASE_ALLOCATION, PENDING]
    assert len(set(ready.contexts)) == 2
    assert server.negotiation.meta == ready.contexts


def test_without_structured_replies_no_meta_context_is_asked():
    server = MemoryServer()
    client = c.ClientHandshake("vol", structured=False, meta_contexts=[c.BASE_ALLOCATION])
    events = drive(client, server)
    assert server.options == [c.OPT_GO]
    ready = events[-1]
    assert isinstance(ready, c.Ready)
    assert not ready.structured and ready.contexts == {}
    # "Transmission flags": SEND_DF only with structured replies.
    assert not ready.flags & c.TF_SEND_DF


def test_info_only_then_abort():
    server = MemoryServer()
    client = c.ClientHandshake("other", info_only=True, structured=False)
    events = drive(client, server)
    assert server.options == [c.OPT_INFO, c.OPT_ABORT]
    assert server.closed == "client aborted" and server.export is None
    assert isinstance(events[-1], c.Closing)
    assert only(events, c.InfoExport)[0].size == 4096
    assert client.export_info is not None and client.name == "other"


@pytest.mark.parametrize("offer_no_zeroes", [True, False])
def test_export_name(offer_no_zeroes):
    flags = c.FLAG_FIXED_NEWSTYLE | (c.FLAG_NO_ZEROES if offer_no_zeroes else 0)
    server = MemoryServer(greeting_flags=flags)
    client = c.ClientHandshake("vol", export_name=True)
    events = drive(client, server)
    assert server.options == [c.OPT_STRUCTURED_REPLY, c.OPT_EXPORT_NAME]
    assert server.negotiation.no_zeroes is offer_no_zeroes
    ready = events[-1]
    assert isinstance(ready, c.Ready)
    # The 124 zero bytes, if any, were taken: nothing is left over.
    assert ready.size == 1 << 20 and ready.trailing == b""


def test_unknown_export_is_a_fatal_refusal_with_the_servers_message():
    server = MemoryServer()
    client = c.ClientHandshake("nope")
    events = drive(client, server)
    [refused] = only(events, c.Refused)
    assert refused.fatal and refused.option == c.OPT_GO
    assert refused.reply == c.REP_ERR_UNKNOWN
    assert "no export named 'nope'" in refused.message
    assert "ERR_UNKNOWN" in str(refused.exception())
    assert kinds(events)[-2:] == ["Send", "Closing"]
    assert server.options[-1] == c.OPT_ABORT


def test_starttls_then_go():
    server = MemoryServer(tls_available=True, tls_required=True)
    client = c.ClientHandshake("vol", tls="require", meta_contexts=[c.BASE_ALLOCATION])
    events = drive(client, server)
    assert server.options[0] == c.OPT_STARTTLS
    assert "StartTLS" in kinds(events)
    assert client.tls_active and isinstance(events[-1], c.Ready)
    assert events[-1].contexts


@pytest.mark.parametrize("tls, fatal", [("prefer", False), ("require", True)])
def test_starttls_refused(tls, fatal):
    server = MemoryServer()             # no TLS configured: NBD_REP_ERR_POLICY
    events = drive(c.ClientHandshake("vol", tls=tls), server)
    [refused] = only(events, c.Refused)
    assert (refused.option, refused.reply, refused.fatal) == (c.OPT_STARTTLS, c.REP_ERR_POLICY,
                                                             fatal)
    assert isinstance(events[-1], c.Closing if fatal else c.Ready)


def test_tls_required_by_the_server_ends_a_plaintext_client():
    server = MemoryServer(tls_available=True, tls_required=True)
    events = drive(c.ClientHandshake("vol"), server)
    [refused] = only(events, c.Refused)
    assert refused.reply == c.REP_ERR_TLS_REQD and refused.fatal


def test_shutting_down_server_ends_the_handshake():
    server = MemoryServer(shutting_down=True)
    events = drive(c.ClientHandshake("vol", list_exports=True), server)
    [refused] = only(events, c.Refused)
    assert refused.reply == c.REP_ERR_SHUTDOWN and refused.fatal
    assert isinstance(events[-1], c.Closing)


def test_data_before_tls_is_a_protocol_error():
    client = c.ClientHandshake("vol", tls="require")
    client.receive(c.encode_greeting())
    events = client.receive(c.encode_option_reply(c.OPT_STARTTLS, c.REP_ACK))
    assert events == [c.StartTLS()]
    with pytest.raises(c.ProtocolError):
        client.receive(b"\x16\x03\x01")


# -- transmission: client encodes, server decodes; server encodes, client decodes --------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
messages = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(u64, u32)
def test_simple_reply_round_trip(cookie, error):
    assert c.decode_reply(c.encode_simple_reply(cookie, error)) == (c.SimpleReply(cookie, error), 16)


@given(u64)
def test_done_round_trip(cookie):
    assert c.decode_reply(c.encode_done(cookie)) == (c.NoneChunk(cookie, True), 20)


@given(u64, u64, st.binary(min_size=1, max_size=300), st.booleans())
def test_offset_data_round_trip(cookie, offset, data, done):
    raw = c.encode_offset_data_header(cookie, offset, len(data), done) + data
    assert c.decode_reply(raw + b"x") == (c.OffsetData(cookie, done, offset, data), len(raw))
    assert c.decode_reply(raw[:-1]) is None


@given(u64, st.integers(1, 2**32 - 1), messages)
def test_error_chunk_round_trip(cookie, error, message):
    chunk, _ = c.decode_reply(c.encode_error_chunk(cookie, error, message))
    assert chunk == c.ErrorChunk(cookie, True, error, message, None, c.REPLY_TYPE_ERROR)


@given(u64, u32, st.lists(st.tuples(st.integers(1, 2**32 - 1), u32), min_size=1, max_size=20),
       st.booleans())
def test_block_status_round_trip(cookie, ctx, extents, done):
    chunk, _ = c.decode_reply(c.encode_block_status(cookie, ctx, extents, done))
    assert chunk == c.BlockStatus(cookie, done, ctx, extents)


def test_errno_mapping_both_ways():
    import errno
    for nbd, err in c.NBD_TO_ERRNO.items():
        assert c.ERRNO_TO_NBD[err] == nbd
        assert c.nbd_error(OSError(err, "x")) == nbd
        assert c.to_errno(nbd) == err
    assert c.nbd_error(OSError(errno.EDQUOT, "quota")) == c.ENOSPC
    assert c.nbd_error(ValueError()) == c.EIO
    assert c.to_errno(9999) == errno.EINVAL


def test_the_package_is_pure():
    # No sockets, no asyncio, nothing of splitd's: importable anywhere.
    import subprocess
    import sys
    code = ("import sys, nbdwire; bad = [m for m in ('socket', 'asyncio', 'ssl', 'daemon', "
            "'controller', 'volumes') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
