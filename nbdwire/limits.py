"""Sizes splitd holds both peers to. The spec fixes only MAX_STRING; the
others are our policy, shared by the server and the client."""

# "Conventions": a string MUST be no longer than 4096 bytes.
MAX_STRING = 4096
# Largest READ or WRITE payload, advertised as NBD_INFO_BLOCK_SIZE's maximum.
# TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload and may exceed it.
MAX_PAYLOAD = 32 * 1024 * 1024
# Option data (and option reply data) we take; more is hostile.
MAX_OPTION_LENGTH = 64 * 1024
# Meta context queries in one LIST/SET_META_CONTEXT.
MAX_META_QUERIES = 1024
# Structured reply chunk payload a client takes: one MAX_PAYLOAD of data and
# its 64-bit offset. A block status chunk for a request of any size fits too
# unless a server sends millions of extents, which is hostile.
MAX_CHUNK_PAYLOAD = MAX_PAYLOAD + 8
