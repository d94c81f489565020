"""A sans-IO NBD client handshake: bytes from the server in, events out.

Rule of this module: it never touches a socket. The caller feeds whatever
the server sent to `receive()` and acts on the events it gets back, in
order: `Send` (write these bytes), `StartTLS` (wrap the socket in TLS now,
then call `resume()`), `Ready` (the handshake is over: transmission starts),
`Closing` (write what came before, then hang up). The other events report
what the server said: export details, list entries, meta context ids, and
refusals, each carrying the server's message.

Options go out one at a time, each after the final reply to the one before
("Fixed newstyle negotiation": the client MUST NOT send an option until it
has received a final reply to any option it has sent), in this order:

    STARTTLS (if asked) -> LIST (if asked) -> STRUCTURED_REPLY (if asked)
    -> SET_META_CONTEXT (if asked, and structured replies were agreed)
    -> GO, or INFO then ABORT (info_only), or EXPORT_NAME

Whatever the server sends, receive() returns events or raises ProtocolError.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .client import (
    DEFAULT_INFOS,
    InfoBlockSize,
    InfoDescription,
    InfoExport,
    InfoName,
    InfoUnknown,
    OptionReply,
    _message,
    decode_export_name_reply,
    decode_greeting,
    decode_option_reply,
    decode_rep_info,
    decode_rep_meta_context,
    decode_rep_server,
    encode_client_flags,
    encode_info_request_data,
    encode_meta_context_request_data,
    encode_option,
)
from .constants import (
    CLIENT_FIXED_NEWSTYLE,
    CLIENT_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_NAMES,
    REP_ACK,
    REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD,
    REP_ERR_UNSUP,
    REP_FLAG_ERROR,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_NAMES,
)
from .errors import OptionRefused, ProtocolError
from .layouts import GREETING

__all__ = [
    "TLS_OFF",
    "TLS_PREFER",
    "TLS_REQUIRE",
    "Acked",
    "ClientHandshake",
    "Closing",
    "Event",
    "ListEntry",
    "MetaContext",
    "Ready",
    "Refused",
    "Send",
    "StartTLS",
]

TLS_OFF, TLS_PREFER, TLS_REQUIRE = "off", "prefer", "require"


# -- events -------------------------------------------------------------------

class Send(NamedTuple):
    """Write these bytes to the server."""
    data: bytes


class StartTLS(NamedTuple):
    """The server acknowledged STARTTLS: wrap the socket in TLS now (the
    client side of the TLS handshake), then call resume()."""


class ListEntry(NamedTuple):
    """One export from NBD_OPT_LIST."""
    name: str
    description: str


class MetaContext(NamedTuple):
    """NBD_OPT_SET_META_CONTEXT chose this context: BLOCK_STATUS replies name
    it by this id."""
    id: int
    name: str


class Acked(NamedTuple):
    """The server accepted an option (STRUCTURED_REPLY, LIST, SET_META_CONTEXT...)."""
    option: int


class Refused(NamedTuple):
    """The server answered an option with an error. A fatal refusal ends the
    handshake (a Send of NBD_OPT_ABORT and a Closing follow); otherwise the
    handshake goes on without what the option would have given."""
    option: int
    reply: int
    message: str
    fatal: bool

    def exception(self) -> OptionRefused:
        return OptionRefused(self.option, self.reply, self.message)


@dataclass(frozen=True)
class Ready:
    """The handshake is over: requests may be sent. `trailing` is what the
    server sent after its last handshake reply (transmission bytes)."""
    size: int
    flags: int                      # transmission flags (TF_*)
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)    # id -> meta context
    name: str | None = None
    description: str | None = None
    block_size: InfoBlockSize | None = None
    trailing: bytes = b""


class Closing(NamedTuple):
    """Write what the events before asked, then close the connection."""
    reason: str


Event = (Send | StartTLS | ListEntry | MetaContext | Acked | Refused | Ready | Closing
         | InfoExport | InfoName | InfoDescription | InfoBlockSize)


# -- the state machine ----------------------------------------------------------

GREETING_WAIT, OPTIONS, TLS_WAIT, EXPORT_NAME_WAIT, DONE = (
    "greeting", "options", "tls", "export-name", "done")


class ClientHandshake:
    """One client's side of fixed newstyle negotiation, for one connection."""

    def __init__(self, export: str = "", *, structured: bool = True,
                 meta_contexts: Sequence[str] = (), list_exports: bool = False,
                 tls: str = TLS_OFF, info_only: bool = False, export_name: bool = False,
                 infos: Sequence[int] = DEFAULT_INFOS):
        if tls not in (TLS_OFF, TLS_PREFER, TLS_REQUIRE):
            raise ValueError(f"tls must be off, prefer or require, not {tls!r}")
        self.export = export
        self.want_structured = structured
        self.want_contexts = list(meta_contexts)
        self.tls = tls
        self.info_only = info_only
        self.infos = list(infos)
        self.state = GREETING_WAIT
        self.buf = bytearray()
        self.no_zeroes = False
        self.tls_active = False
        # What the server told us.
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.export_info: InfoExport | None = None
        self.name: str | None = None
        self.description: str | None = None
        self.block_size: InfoBlockSize | None = None
        # Options still to send, first first; `pending` awaits its final reply.
        self.todo: list[int] = []
        if tls != TLS_OFF:
            self.todo.append(OPT_STARTTLS)
        if list_exports:
            self.todo.append(OPT_LIST)
        if structured:
            self.todo.append(OPT_STRUCTURED_REPLY)
        if meta_contexts:
            self.todo.append(OPT_SET_META_CONTEXT)
        self.todo.append(OPT_INFO if info_only else OPT_EXPORT_NAME if export_name else OPT_GO)
        self.pending: int | None = None

    # -- input ------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; returns what to do, in order."""
        if self.state == DONE:
            return []       # e.g. the ACK of our NBD_OPT_ABORT: nothing to do
        if self.state == TLS_WAIT and data:
            # "After an NBD_REP_ACK ... all further data MUST be sent and
            # received over TLS" ("TLS support"): plaintext here is an error.
            raise ProtocolError("server sent data before the TLS handshake")
        self.buf += data
        events: list[Event] = []
        while self.state not in (DONE, TLS_WAIT):
            if self.state == GREETING_WAIT:
                if not self._greeting(events):
                    break
            elif self.state == EXPORT_NAME_WAIT:
                if not self._export_name_reply(events):
                    break
            else:
                got = decode_option_reply(self.buf)
                if got is None:
                    break
                reply, used = got
                del self.buf[:used]
                self._reply(reply, events)
        return events

    def resume(self) -> list[Event]:
        """Go on after the caller has started TLS on the socket."""
        if self.state != TLS_WAIT:
            raise RuntimeError("resume() is only for after a StartTLS event")
        self.tls_active = True
        self.state = OPTIONS
        events: list[Event] = []
        self._next(events)
        return events

    # -- steps --------------------------------------------------------------------

    def _greeting(self, events: list[Event]) -> bool:
        flags = decode_greeting(self.buf)
        if flags is None:
            return False
        del self.buf[:GREETING.size]
        if not flags & FLAG_FIXED_NEWSTYLE:
            # Plain newstyle allows only EXPORT_NAME; we speak fixed newstyle only.
            raise ProtocolError("server does not speak fixed newstyle")
        # "Newstyle negotiation": the client SHOULD ignore handshake flags it
        # does not know, and sets only those the server offered.
        self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
        cflags = CLIENT_FIXED_NEWSTYLE | (CLIENT_NO_ZEROES if self.no_zeroes else 0)
        events.append(Send(encode_client_flags(cflags)))
        self.state = OPTIONS
        self._next(events)
        return True

    def _next(self, events: list[Event]) -> None:
        """Send the next option that still makes sense."""
        while self.todo:
            code = self.todo.pop(0)
            if code == OPT_SET_META_CONTEXT and not self.structured:
                continue    # "Metadata querying": needs structured replies first
            self.pending = code
            if code in (OPT_GO, OPT_INFO):
                data = encode_info_request_data(self.export, self.infos)
            elif code == OPT_SET_META_CONTEXT:
                data = encode_meta_context_request_data(self.export, self.want_contexts)
            elif code == OPT_EXPORT_NAME:
                data = self.export.encode("utf-8")
                self.state = EXPORT_NAME_WAIT
            else:
                data = b""
            events.append(Send(encode_option(code, data)))
            return
        raise AssertionError("no option left to send")   # GO/INFO/EXPORT_NAME end the list

    def _reply(self, reply: OptionReply, events: list[Event]) -> None:
        code = self.pending
        if reply.option != code:
            raise ProtocolError(f"reply to option {reply.option} while waiting for {code}")
        assert code is not None
        if reply.type & REP_FLAG_ERROR:
            self._refused(code, reply, events)
            return
        if reply.type == REP_ACK:
            self._acked(code, events)
            return
        if code == OPT_LIST and reply.type == REP_SERVER:
            events.append(ListEntry(*decode_rep_server(reply.data)))
        elif code == OPT_SET_META_CONTEXT and reply.type == REP_META_CONTEXT:
            ctx_id, name = decode_rep_meta_context(reply.data)
            if name not in self.want_contexts:
                raise ProtocolError(f"server chose meta context {name!r} we did not ask for")
            self.contexts[ctx_id] = name
            events.append(MetaContext(ctx_id, name))
        elif code in (OPT_GO, OPT_INFO) and reply.type == REP_INFO:
            info = decode_rep_info(reply.data)
            if isinstance(info, InfoExport):
                self.export_info = info
            elif isinstance(info, InfoName):
                self.name = info.name
            elif isinstance(info, InfoDescription):
                self.description = info.description
            elif isinstance(info, InfoBlockSize):
                self.block_size = info
            if not isinstance(info, InfoUnknown):
                events.append(info)
        else:
            rtype = REPLY_NAMES.get(reply.type, str(reply.type))
            raise ProtocolError(f"unexpected reply {rtype} to {OPTION_NAMES.get(code, code)}")

    def _acked(self, code: int, events: list[Event]) -> None:
        if code == OPT_STARTTLS:
            self.state = TLS_WAIT
            events.append(StartTLS())
            return
        if code in (OPT_GO, OPT_INFO):
            if self.export_info is None:
                # "NBD_OPT_INFO": the server MUST send NBD_INFO_EXPORT before the ACK.
                raise ProtocolError(f"{OPTION_NAMES[code]} acknowledged without NBD_INFO_EXPORT")
            if code == OPT_INFO:
                self._close(events, "export information received")
                return
            self._ready(events)
            return
        if code == OPT_STRUCTURED_REPLY:
            self.structured = True
        events.append(Acked(code))
        self._next(events)

    def _refused(self, code: int, reply: OptionReply, events: list[Event]) -> None:
        message = _message(reply.data)
        if code == OPT_GO and reply.type == REP_ERR_UNSUP:
            # An old server without GO: fall back to EXPORT_NAME ("NBD_OPT_GO").
            events.append(Refused(code, reply.type, message, fatal=False))
            self.todo = [OPT_EXPORT_NAME]
            self._next(events)
            return
        fatal = (code in (OPT_GO, OPT_INFO)
                 or (code == OPT_STARTTLS and self.tls == TLS_REQUIRE)
                 # "Termination of the session during option haggling": the
                 # client MUST soft disconnect on NBD_REP_ERR_SHUTDOWN.
                 or reply.type == REP_ERR_SHUTDOWN
                 # "TLS support": nothing will succeed without TLS, and we
                 # did not (or could not) start it.
                 or (reply.type == REP_ERR_TLS_REQD and not self.tls_active))
        events.append(Refused(code, reply.type, message, fatal))
        if fatal:
            self._close(events, str(OptionRefused(code, reply.type, message)))
            return
        if code == OPT_SET_META_CONTEXT:
            self.contexts = {}      # a failed SET selects nothing
        self._next(events)

    def _close(self, events: list[Event], reason: str) -> None:
        # A soft disconnect: NBD_OPT_ABORT, then hang up without waiting.
        events.append(Send(encode_option(OPT_ABORT)))
        events.append(Closing(reason))
        self.state = DONE

    def _export_name_reply(self, events: list[Event]) -> bool:
        got = decode_export_name_reply(self.buf, self.no_zeroes)
        if got is None:
            return False
        info, used = got
        del self.buf[:used]
        self.export_info = info
        events.append(info)
        self._ready(events)
        return True

    def _ready(self, events: list[Event]) -> None:
        assert self.export_info is not None
        self.state = DONE
        trailing, self.buf = bytes(self.buf), bytearray()
        events.append(Ready(self.export_info.size, self.export_info.flags, self.structured,
                            dict(self.contexts), self.name, self.description, self.block_size,
                            trailing))
