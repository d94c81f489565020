"""Finer rules of proto.md, checked over raw sockets: which transmission
flags go with which negotiation, how SET_META_CONTEXT matches and forgets,
which command flags each command takes, DISC, and FAST_ZERO.
Section names refer to proto.md.
"""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import Closed, RawClient

MiB = 1 << 20
VOL = "vol"
TF_SEND_DF = 1 << 7
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
REP_ERR_TOO_BIG = 2**31 + 9
ENOTSUP = 95


@pytest.fixture
def served(daemon):
    daemon.create_volume(VOL, 16 * MiB)
    return daemon


def client(d) -> RawClient:
    return RawClient.unix(d.nbd_socket)


def export_flags(cl: RawClient, option: int) -> int:
    replies = cl.option(option, r.info_data(VOL))
    assert replies[-1].type == r.REP_ACK, replies
    for rep in replies[:-1]:
        if struct.unpack_from(">H", rep.data)[0] == r.INFO_EXPORT:
            return struct.unpack(">HQH", rep.data)[2]
    raise AssertionError("no NBD_INFO_EXPORT")


# -- negotiation -------------------------------------------------------------------

def test_send_df_is_advertised_only_with_structured_replies(served):
    # "Transmission flags", bit 7: "The server MUST leave this flag clear if
    # structured replies have not been negotiated."
    with client(served) as cl:
        cl.start()
        assert not export_flags(cl, r.OPT_INFO) & TF_SEND_DF
        cl.negotiate_structured()
        assert export_flags(cl, r.OPT_INFO) & TF_SEND_DF
    with client(served) as cl:
        cl.start()
        cl.send_option(r.OPT_EXPORT_NAME, VOL.encode())
        _size, tflags = struct.unpack(">QH", cl.recv_exact(10))
        assert not tflags & TF_SEND_DF


def meta(cl: RawClient, option: int, queries, name: str = VOL) -> tuple[list[str], int]:
    """The contexts a LIST/SET answer names, and its final reply type."""
    replies = cl.option(option, r.meta_data(name, tuple(queries)))
    names = [rep.data[4:].decode() for rep in replies[:-1]]
    return names, replies[-1].type


def test_set_meta_context_selects_exact_names_only(served):
    # "base:" lists every base context, but SET "MUST ignore this form"; an
    # empty leaf name "SHOULD NOT select any contexts" with SET.
    with client(served) as cl:
        cl.start()
        cl.negotiate_structured()
        assert meta(cl, r.OPT_LIST_META_CONTEXT, ["base:"]) == (["base:allocation"], r.REP_ACK)
        assert meta(cl, r.OPT_SET_META_CONTEXT, ["base:"]) == ([], r.REP_ACK)
        assert meta(cl, r.OPT_SET_META_CONTEXT, ["base:allocation"]) == (
            ["base:allocation"], r.REP_ACK)


def test_our_contexts_are_in_an_x_namespace(make_daemon):
    # "Metadata querying": a namespace is base, nbd-server, x-* or a
    # registered third party; ours are x-splitd:*.
    d = make_daemon()
    d.create_volume("p", 8 * MiB)
    d.call("pair.create", primary="p", secondary="s", create_secondary=True)
    d.call("pair.split", name="s")
    with client(d) as cl:
        cl.start()
        cl.negotiate_structured()
        names, last = meta(cl, r.OPT_LIST_META_CONTEXT, [], name="s")
        assert last == r.REP_ACK
        assert sorted(names) == ["base:allocation", "x-splitd:delta", "x-splitd:pending"]


def test_a_failed_set_meta_context_forgets_the_earlier_choice(served):
    # "NBD_OPT_SET_META_CONTEXT": it "replaces all previously-set metadata
    # contexts (including when this command fails)"; BLOCK_STATUS with none
    # selected is EINVAL ("Metadata querying").
    with client(served) as cl:
        cl.start()
        cl.negotiate_structured()
        assert meta(cl, r.OPT_SET_META_CONTEXT, ["base:allocation"])[1] == r.REP_ACK
        assert meta(cl, r.OPT_SET_META_CONTEXT, ["base:allocation"], name="nope")[1] == \
            r.REP_ERR_UNKNOWN
        cl.go(VOL)
        error, _ = cl.call(r.CMD_BLOCK_STATUS, 0, 4096, cookie=3)
        assert error == r.EINVAL


def test_too_many_meta_context_queries_is_too_big(served):
    with client(served) as cl:
        cl.start()
        cl.negotiate_structured()
        names, last = meta(cl, r.OPT_LIST_META_CONTEXT, ["base:allocation"] * 1025)
        assert (names, last) == ([], REP_ERR_TOO_BIG)
        # ... and negotiation goes on.
        assert meta(cl, r.OPT_LIST_META_CONTEXT, ["base:"])[1] == r.REP_ACK


# -- command flags ----------------------------------------------------------------

@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_flags_that_do_not_apply_to_a_command_are_einval(served, structured):
    # "Error values": the server "SHOULD return NBD_EINVAL if it receives a
    # request with a flag not explicitly documented as applicable to the
    # given request". FUA applies to every command ("Request flags").
    with client(served).open(VOL, structured=structured) as cl:
        refused = [
            (r.CMD_READ, 0, 4096, CMD_FLAG_REQ_ONE, b""),
            (r.CMD_WRITE, 0, 512, CMD_FLAG_DF, b"x" * 512),
            (r.CMD_WRITE, 0, 512, CMD_FLAG_NO_HOLE, b"x" * 512),
            (r.CMD_TRIM, 0, 4096, CMD_FLAG_NO_HOLE, b""),
            (r.CMD_CACHE, 0, 4096, CMD_FLAG_REQ_ONE, b""),
            (r.CMD_FLUSH, 0, 0, CMD_FLAG_FAST_ZERO, b""),
            (r.CMD_WRITE_ZEROES, 0, 4096, CMD_FLAG_DF, b""),
        ]
        if not structured:
            # DF needs NBD_FLAG_SEND_DF, which needs structured replies.
            refused.append((r.CMD_READ, 0, 4096, CMD_FLAG_DF, b""))
        for cookie, (cmd, offset, length, flags, payload) in enumerate(refused, 100):
            error, _ = cl.call(cmd, offset, length, cookie, flags, payload)
            assert error == r.EINVAL, (cmd, flags)
        assert cl.read(0, 512, cookie=1) == bytes(512), "a refused write changed data"

        accepted = [
            (r.CMD_WRITE, 0, 512, r.CMD_FLAG_FUA, b"y" * 512),
            (r.CMD_READ, 0, 512, r.CMD_FLAG_FUA, b""),
            (r.CMD_WRITE_ZEROES, 4096, 4096, CMD_FLAG_NO_HOLE | r.CMD_FLAG_FUA, b""),
            (r.CMD_TRIM, 8192, 4096, r.CMD_FLAG_FUA, b""),
            (r.CMD_FLUSH, 0, 0, r.CMD_FLAG_FUA, b""),
        ]
        if structured:
            accepted.append((r.CMD_READ, 0, 512, CMD_FLAG_DF, b""))
        for cookie, (cmd, offset, length, flags, payload) in enumerate(accepted, 200):
            error, _ = cl.call(cmd, offset, length, cookie, flags, payload)
            assert error == 0, (cmd, flags)


def test_disc_with_stray_flags_still_disconnects_without_a_reply(served):
    # "NBD_CMD_DISC": "There is no reply"; the server closes the connection.
    with client(served).open(VOL) as cl:
        cl.send_request(r.CMD_DISC, flags=1 << 6, cookie=9)
        with pytest.raises(Closed):
            cl.reply()


# -- FAST_ZERO --------------------------------------------------------------------------

def test_fast_zero_that_would_write_zeroes_is_enotsup(make_daemon, tmp_path):
    # "NBD_CMD_FLAG_FAST_ZERO": if the server "cannot perform the write zeroes
    # any faster than it would for an equivalent NBD_CMD_WRITE", it "MUST fail
    # quickly with an error of NBD_ENOTSUP". tmpfs punches holes but has no
    # FALLOC_FL_ZERO_RANGE, so zeroing with NO_HOLE would mean writing.
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("needs /dev/shm (tmpfs)")
    data = shm / f"splitd-test-{os.getpid()}-{tmp_path.name}"
    d = make_daemon(["--data-dir", str(data)])
    try:
        d.create_volume(VOL, 16 * MiB)
        img = data / "volumes" / f"{VOL}.img"
        with client(d).open(VOL, structured=True) as cl:
            error, _ = cl.call(r.CMD_WRITE_ZEROES, 0, 8 * MiB, cookie=1,
                               flags=CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE)
            assert error == ENOTSUP
            assert img.stat().st_blocks == 0, "the refused zeroing wrote zeroes"
            # Punching is fast there: FAST_ZERO without NO_HOLE succeeds, and
            # so does a plain NO_HOLE zeroing (slowly).
            for cookie, flags in ((2, CMD_FLAG_FAST_ZERO), (3, CMD_FLAG_NO_HOLE)):
                error, _ = cl.call(r.CMD_WRITE_ZEROES, 0, MiB, cookie=cookie, flags=flags)
                assert error == 0, flags
            assert img.stat().st_blocks > 0
            error, _ = cl.call(r.CMD_WRITE_ZEROES, 0, MiB, cookie=4,
                               flags=CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE)
            assert error == ENOTSUP, "refused again once the slow path is known"
    finally:
        d.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_an_option_too_long_to_take_is_skipped_and_refused(served):
    # The option length "allows the server to skip any options presented by
    # the client that it does not understand" ("Newstyle negotiation"): more
    # data than we take (64 KiB) is dropped unread and answered
    # NBD_REP_ERR_TOO_BIG; the negotiation goes on.
    big = 4 * MiB + 5
    with client(served) as cl:
        cl.start()
        cl.negotiate_structured()
        assert meta(cl, r.OPT_SET_META_CONTEXT, ["base:allocation"])[1] == r.REP_ACK
        for option in (r.OPT_GO, r.OPT_LIST, r.OPT_SET_META_CONTEXT, 4242):
            cl.send(struct.pack(">QII", r.IHAVEOPT, option, big))
            for i in range(0, big, MiB):
                cl.send(bytes(min(MiB, big - i)))
            rep = cl.option_reply()
            assert (rep.option, rep.type) == (option, REP_ERR_TOO_BIG)
        # The failed SET forgot base:allocation; the export opens as usual.
        cl.go(VOL)
        error, _ = cl.call(r.CMD_BLOCK_STATUS, 0, 4096, cookie=3)
        assert error == r.EINVAL
        assert cl.read(0, 512, cookie=4) == bytes(512)


def test_export_name_too_long_to_take_disconnects(served):
    # NBD_OPT_EXPORT_NAME has no error reply: the server closes.
    with client(served) as cl:
        cl.start()
        cl.send(struct.pack(">QII", r.IHAVEOPT, r.OPT_EXPORT_NAME, MiB))
        with pytest.raises(Closed):
            cl.recv_exact(1)
