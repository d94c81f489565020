"""PlainStrEnum: a StrEnum whose members read exactly as their strings.

The names in `common` go over the wire (JSON), into the metadata database and
into messages. A StrEnum member already equals, hashes, formats and encodes to
JSON as its value; only repr() differs ("<PairState.SPLIT: 'split'>"), and
messages quote states and policies with !r. Here repr() is the value's too, so
"state 'split'" reads the same whether the state came from a constant or from
the database.
"""
from __future__ import annotations

import enum


class PlainStrEnum(enum.StrEnum):
    def __repr__(self) -> str:
        return repr(self.value)
