"""Fixed newstyle option negotiation ("Handshake" in proto.md), without I/O.

`Negotiation.handle(option)` takes one decoded option and returns a Step: the
bytes to send and what the connection must do next (nothing, start TLS, enter
transmission with an export, or close). Everything that changes negotiation
state lives here; the connection only moves bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import nbdwire as c
from nbdwire import MAX_PAYLOAD

from .exports import Export, ExportUnavailable, ExportUnknown, VolumeExports

log = logging.getLogger("splitd.nbd")

# Block size constraints we advertise (NBD_INFO_BLOCK_SIZE): any alignment is
# accepted (the kernel sends 512-byte I/O, qemu-io 1-byte I/O), 4 KiB is best,
# MAX_PAYLOAD (nbdwire.limits) at most.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096

CONTINUE, STARTTLS, TRANSMISSION, CLOSE = "continue", "starttls", "transmission", "close"


@dataclass
class Step:
    out: bytes = b""
    action: str = CONTINUE
    export: Export | None = None
    reason: str = ""


@dataclass
class Negotiation:
    exports: VolumeExports
    tls_available: bool = False
    tls_required: bool = False
    tls_active: bool = False
    no_zeroes: bool = False
    structured: bool = False
    # Meta contexts chosen by SET_META_CONTEXT: (export name, {id: context name}).
    meta_export: str | None = None
    meta: dict[int, str] = field(default_factory=dict)
    shutting_down: bool = False

    def client_flags(self, flags: int) -> str | None:
        """Check the client's flags; returns a reason to close, or None."""
        known = c.CLIENT_FIXED_NEWSTYLE | c.CLIENT_NO_ZEROES
        if flags & ~known:
            return f"unknown client flags 0x{flags:x}"
        if not flags & c.CLIENT_FIXED_NEWSTYLE:
            return "client does not speak fixed newstyle"
        self.no_zeroes = bool(flags & c.CLIENT_NO_ZEROES)
        return None

    # -- dispatch -----------------------------------------------------------

    def handle(self, opt: c.Option) -> Step:
        code = opt.code
        if code == c.OPT_SET_META_CONTEXT:
            # "NBD_OPT_SET_META_CONTEXT ... replaces all previously-set metadata
            # contexts (including when this command fails)".
            self.meta_export, self.meta = None, {}
        if code == c.OPT_ABORT:
            # The spec asks for an ACK before the server closes.
            return Step(c.encode_option_reply(code, c.REP_ACK), CLOSE, reason="client aborted")
        if code == c.OPT_EXPORT_NAME:
            return self._export_name(opt.data)
        if self.shutting_down:
            return self._error(code, c.REP_ERR_SHUTDOWN, "server is shutting down")
        if code == c.OPT_STARTTLS:
            return self._starttls(opt.data)
        # FORCEDTLS mode ("TLS support"): every other option before TLS is
        # answered ERR_TLS_REQD, including unknown ones.
        if self.tls_required and not self.tls_active:
            return self._error(code, c.REP_ERR_TLS_REQD, "TLS is required on this listener")
        try:
            if code == c.OPT_LIST:
                return self._list(opt.data)
            if code in (c.OPT_INFO, c.OPT_GO):
                return self._info_go(code, opt.data)
            if code == c.OPT_STRUCTURED_REPLY:
                return self._structured_reply(opt.data)
            if code in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
                return self._meta_context(code, opt.data)
        except c.OptionDataError as e:
            return self._error(code, e.reply, str(e))
        name = c.OPTION_NAMES.get(code, str(code))
        return self._error(code, c.REP_ERR_UNSUP, f"option {name} is not supported")

    def too_big(self, code: int) -> Step:
        """The answer to an option whose data was too long to take, skipped
        unread: what handle() would say before looking at the data, else
        NBD_REP_ERR_TOO_BIG."""
        if code in (c.OPT_ABORT, c.OPT_STARTTLS) or self.shutting_down or (
                self.tls_required and not self.tls_active):
            # ABORT ignores its data; the others refuse whatever the data.
            return self.handle(c.Option(code, b"\0" if code == c.OPT_STARTTLS else b""))
        if code == c.OPT_SET_META_CONTEXT:
            self.meta_export, self.meta = None, {}   # a failed SET forgets, too
        return self._error(code, c.REP_ERR_TOO_BIG,
                           f"option data longer than {c.MAX_OPTION_LENGTH} bytes")

    @staticmethod
    def _error(code: int, err: int, message: str) -> Step:
        return Step(c.encode_option_error(code, err, message))

    # -- options --------------------------------------------------------------

    def _export_name(self, data: bytes) -> Step:
        # NBD_OPT_EXPORT_NAME cannot fail politely: any refusal is a disconnect.
        if self.shutting_down:
            return Step(action=CLOSE, reason="shutting down")
        if self.tls_required and not self.tls_active:
            return Step(action=CLOSE, reason="EXPORT_NAME without TLS on a TLS-only listener")
        name = c.decode_export_name(data)
        try:
            export = self.exports.lookup(name)
        except (ExportUnknown, ExportUnavailable) as e:
            return Step(action=CLOSE, reason=str(e))
        self._keep_meta_for(export.name)
        out = c.encode_export_name_reply(export.size, self.transmission_flags(export),
                                         self.no_zeroes)
        return Step(out, TRANSMISSION, export)

    def _starttls(self, data: bytes) -> Step:
        code = c.OPT_STARTTLS
        if data:
            return self._error(code, c.REP_ERR_INVALID, "STARTTLS takes no data")
        if not self.tls_available:
            return self._error(code, c.REP_ERR_POLICY, "TLS is not configured on this server")
        if self.tls_active:
            return self._error(code, c.REP_ERR_INVALID, "TLS is already active")
        # Anything negotiated in plaintext is forgotten once TLS starts.
        self.structured = False
        self.meta_export, self.meta = None, {}
        return Step(c.encode_option_reply(code, c.REP_ACK), STARTTLS)

    def _list(self, data: bytes) -> Step:
        if data:
            return self._error(c.OPT_LIST, c.REP_ERR_INVALID, "LIST takes no data")
        out = [c.encode_rep_server(c.OPT_LIST, name) for name in self.exports.names()]
        out.append(c.encode_option_reply(c.OPT_LIST, c.REP_ACK))
        return Step(b"".join(out))

    def _info_go(self, code: int, data: bytes) -> Step:
        name, infos = c.decode_info_request(data)
        try:
            export = self.exports.lookup(name)
        except (ExportUnknown, ExportUnavailable) as e:
            return self._error(code, c.REP_ERR_UNKNOWN, str(e))
        out = [c.encode_info_export(code, export.size, self.transmission_flags(export))]
        if c.INFO_NAME in infos:
            out.append(c.encode_info_string(code, c.INFO_NAME, export.name))
        if c.INFO_DESCRIPTION in infos and export.description:
            out.append(c.encode_info_string(code, c.INFO_DESCRIPTION, export.description))
        out.append(c.encode_info_block_size(code, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        out.append(c.encode_option_reply(code, c.REP_ACK))
        if code == c.OPT_INFO:
            return Step(b"".join(out))
        self._keep_meta_for(export.name)
        return Step(b"".join(out), TRANSMISSION, export)

    def _structured_reply(self, data: bytes) -> Step:
        if data:
            return self._error(c.OPT_STRUCTURED_REPLY, c.REP_ERR_INVALID, "takes no data")
        self.structured = True
        return Step(c.encode_option_reply(c.OPT_STRUCTURED_REPLY, c.REP_ACK))

    def _meta_context(self, code: int, data: bytes) -> Step:
        name, queries = c.decode_meta_context_request(data)
        if code == c.OPT_SET_META_CONTEXT and not self.structured:
            # "Metadata querying": SET needs structured replies first.
            return self._error(code, c.REP_ERR_INVALID, "negotiate structured replies first")
        try:
            export = self.exports.lookup(name)
        except (ExportUnknown, ExportUnavailable) as e:
            return self._error(code, c.REP_ERR_UNKNOWN, str(e))
        available = list(export.contexts)
        if code == c.OPT_SET_META_CONTEXT:
            # Only exact names select: "base:" MUST be ignored by SET, and an
            # empty leaf name SHOULD NOT select anything ("Metadata querying").
            chosen = [ctx for ctx in available if ctx in queries]
        elif not queries:
            chosen = available
        else:
            chosen = [ctx for ctx in available if any(_lists(q, ctx) for q in queries)]
        out = []
        if code == c.OPT_SET_META_CONTEXT:
            self.meta_export = export.name
            for ctx in chosen:
                ctx_id = available.index(ctx) + 1
                self.meta[ctx_id] = ctx
                out.append(c.encode_meta_context(code, ctx_id, ctx))
        else:
            # LIST answers with id 0: ids mean something only after SET.
            out = [c.encode_meta_context(code, 0, ctx) for ctx in chosen]
        out.append(c.encode_option_reply(code, c.REP_ACK))
        return Step(b"".join(out))

    def _keep_meta_for(self, export_name: str) -> None:
        # Contexts set for another export do not carry over to this one.
        if self.meta_export != export_name:
            self.meta_export, self.meta = None, {}

    # -- flags ------------------------------------------------------------------

    def transmission_flags(self, export: Export) -> int:
        f = (c.TF_HAS_FLAGS | c.TF_SEND_FLUSH | c.TF_SEND_FUA | c.TF_SEND_CACHE
             # One file per volume: fdatasync from any connection covers the
             # writes of every connection, so FLUSH is connection-wide.
             | c.TF_CAN_MULTI_CONN)
        if self.structured:
            # "Transmission flags": SEND_DF MUST be clear without structured replies.
            f |= c.TF_SEND_DF
        if export.read_only:
            f |= c.TF_READ_ONLY
        else:
            f |= c.TF_SEND_TRIM | c.TF_SEND_WRITE_ZEROES | c.TF_SEND_FAST_ZERO
        return f


def _lists(query: str, context: str) -> bool:
    """For LIST_META_CONTEXT: a query names a context exactly, or a whole
    namespace as "ns:" (the spec's "base:" form)."""
    if query == context:
        return True
    return query.endswith(":") and context.startswith(query)
