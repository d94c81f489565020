"""JSON lines over TLS with bearer tokens: the server side that splitd's remote
admin API (daemon/remote_admin.py) and the host agent's service
(agents/host/service.py) share.

    lines.py    a request line in, a reply line out: parsing, the error
                envelope, exceptions -> error codes (sans-IO)
    tls.py      server-side TLS over memory buffers (sans-IO)
    server.py   the connection: TLS, the token line, then requests, with the
                bounds on what a client without a token can hold
    tokens.py   bearer tokens: random secrets shown once, SHA-256 stored,
                checked in constant time

Rule of this package: it knows nothing of volumes, pairs or filesystems; what
a token may do, and what a request does, is its owner's (a `Gate`).
"""
