"""splitd's asyncio NBD client, on the shared wire package (nbdwire).

    uri         NBD URIs as libnbd parses them; the TLS context they ask for
    errors      RequestError, ConnectError, Disconnected, RequestTimeout
    connection  one connection: handshake, requests in flight, the reply reader
    client      open(uri, connections=N) -> Client: read / write / zero /
                trim / flush / extents over one or several connections

Fixed newstyle only, structured replies required, TLS (X.509) when the URI
says nbds:. Works under asyncio's loop and uvloop.
"""
from .client import DEFAULT_CONTEXTS, DELTA, PENDING, Client, Stats, open
from .errors import ConnectError, Disconnected, RequestError, RequestTimeout
from .uri import Target, parse_uri, tls_context
