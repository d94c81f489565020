"""The fixed-size parts of NBD messages as precompiled struct layouts.

Each layout carries the spec's field list above it (proto.md, the section
in quotes). All fields are big-endian ("network byte order").
"""
import struct

# "Newstyle negotiation", server greeting:
#   64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits handshake flags.
GREETING = struct.Struct(">QQH")
# Client flags, right after the greeting: 32 bits.
CLIENT_FLAGS = struct.Struct(">I")
# Option request header: 64 bits IHAVEOPT, 32 bits option, 32 bits data length.
OPTION_HEADER = struct.Struct(">QII")
# "Fixed newstyle negotiation", option reply header: 64 bits reply magic,
#   32 bits option, 32 bits reply type, 32 bits length of the reply data.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME reply: 64 bits export size, 16 bits transmission flags
#   (then 124 zero bytes unless NO_ZEROES was agreed).
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_INFO_EXPORT: 16 bits type (0), 64 bits size, 16 bits transmission flags.
INFO_EXPORT_LAYOUT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: 16 bits type (3), 32 bits minimum, 32 bits preferred,
#   32 bits maximum payload.
INFO_BLOCK_SIZE_LAYOUT = struct.Struct(">HIII")
# "Request message": 32 bits magic, 16 bits command flags, 16 bits type,
#   64 bits cookie (handle), 64 bits offset, 32 bits length.
REQUEST = struct.Struct(">IHHQQI")
# "Simple reply message": 32 bits magic, 32 bits error, 64 bits cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
# "Structured reply chunk message": 32 bits magic, 16 bits flags, 16 bits
#   type, 64 bits cookie, 32 bits payload length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA payload start: 64 bits offset (data follows).
OFFSET = struct.Struct(">Q")
# NBD_REPLY_TYPE_OFFSET_HOLE payload: 64 bits offset, 32 bits hole size.
OFFSET_HOLE = struct.Struct(">QI")
# Error chunk payload start (NBD_REPLY_TYPE_ERROR and every error type):
#   32 bits error, 16 bits message length (then the message; ERROR_OFFSET
#   adds 64 bits offset after it).
ERROR_CHUNK = struct.Struct(">IH")
# NBD_REPLY_TYPE_BLOCK_STATUS descriptor: 32 bits extent length, 32 bits flags
#   (after one 32-bit context id at the start of the payload).
EXTENT = struct.Struct(">II")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# NBD_OPT_EXPORT_NAME's reply pads with 124 zero bytes unless NO_ZEROES.
EXPORT_NAME_PADDING = bytes(124)
