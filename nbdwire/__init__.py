"""nbdwire: the NBD wire format, for splitd's server and for NBD clients.

Pure: no sockets, no asyncio, no splitd imports. Bytes in, values or events
out; values in, bytes out. Malformed input from a peer raises
nbdwire.ProtocolError (or, for a server's option data, OptionDataError),
never anything else.

    constants   numbers and names from proto.md (OPT_*, REP_*, CMD_*, ...)
    layouts     struct.Struct layouts, the spec's fields beside each
    limits      MAX_PAYLOAD, MAX_STRING and the other sizes we hold peers to
    errors      the exception tree
    errnos      errno <-> NBD error values
    server      the server's decoders (options) and encoders (every reply)
    client      the client's encoders (options, requests) and decoders
    handshake   ClientHandshake, a sans-IO client handshake

Everything public is also here, at the top: `import nbdwire as c; c.OPT_GO`.
The daemon imports the package this way.
"""
from .client import *
from .constants import *
from .errnos import *
from .errors import *
from .handshake import *
from .layouts import *
from .limits import *
from .server import *
