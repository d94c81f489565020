"""Server-side TLS over memory buffers (ssl.MemoryBIO), for a protocol that
does TLS in its own callbacks rather than with loop.start_tls."""
from __future__ import annotations

import asyncio
import ssl


class TLSSession:
    """Bytes from the network in, plaintext out; plaintext in, bytes for the
    network out. No socket here, so nothing the client sends can arrive before
    TLS is ready for it (loop.start_tls on a fresh connection races the first
    read: uvloop starts reading after connection_made)."""

    def __init__(self, context: ssl.SSLContext):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        self.peer_closed = False

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the network; return the plaintext they complete.
        Raises ssl.SSLError for a failed handshake or a broken session."""
        self._incoming.write(data)
        if not self.established:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, plaintext: bytes) -> None:
        self._ssl.write(plaintext)

    def outgoing(self) -> bytes:
        """What TLS has for the network (handshake, records, alerts)."""
        return self._outgoing.read()

    def shutdown(self) -> None:
        """Start a proper close (close_notify); the peer's answer is not awaited."""
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass


def tls_reason(e: Exception) -> str:
    """A TLS failure in words: "wrong version number", "timed out"."""
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    return str(e) or type(e).__name__
