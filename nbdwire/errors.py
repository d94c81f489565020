"""What can go wrong on the wire, named by what the caller must do next.

    Exception
     +-- ProtocolError          the peer broke the protocol: close the connection
     |    +-- OptionTooLong     (server) an option longer than we take; its data
     |                          may be skipped and the option refused instead
     +-- OptionDataError        (server) malformed option data: reply
     |    |                     NBD_REP_ERR_INVALID and go on
     |    +-- OptionTooBig      ... well formed but too much: NBD_REP_ERR_TOO_BIG
     +-- OptionRefused          (client) the server refused an option the
                                client cannot do without; carries its message
"""
from __future__ import annotations

from .constants import OPTION_NAMES, REP_ERR_INVALID, REP_ERR_TOO_BIG, REPLY_NAMES

__all__ = [
    "OptionDataError",
    "OptionRefused",
    "OptionTooBig",
    "OptionTooLong",
    "ProtocolError",
]


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


class OptionDataError(Exception):
    """An option's data is malformed: reply NBD_REP_ERR_INVALID and go on."""
    reply = REP_ERR_INVALID


class OptionTooBig(OptionDataError):
    """Well formed, but more than we process: NBD_REP_ERR_TOO_BIG."""
    reply = REP_ERR_TOO_BIG


class OptionRefused(Exception):
    """The server answered an option with an NBD_REP_ERR_* reply."""

    def __init__(self, option: int, reply: int, message: str):
        opt = OPTION_NAMES.get(option, str(option))
        rep = REPLY_NAMES.get(reply, f"error 0x{reply:x}")
        super().__init__(f"server refused {opt}: {rep}" + (f": {message}" if message else ""))
        self.option = option
        self.reply = reply
        self.message = message
