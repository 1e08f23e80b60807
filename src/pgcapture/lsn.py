"""Log sequence numbers.

An LSN is a 64-bit position in PostgreSQL's write-ahead log, written by the server as two
hexadecimal halves, ``"16/B374D848"`` (high 32 bits / low 32 bits). ``LSN`` is an ``int`` so it
costs nothing on hot paths; it adds parsing, formatting and a readable ``repr``.
"""

from __future__ import annotations

import re
from typing import Final

from pgcapture.errors import ConfigError

_LSN_RE: Final = re.compile(r"^\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$")
_MAX: Final = (1 << 64) - 1


class LSN(int):
    """A WAL position. Compares and hashes as its integer value."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> LSN:
        if not 0 <= value <= _MAX:
            raise ValueError(f"lsn {value} is outside 0..2^64-1")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> LSN:
        """Parse ``"X/Y"`` as PostgreSQL prints it (``pg_lsn`` text form)."""
        match = _LSN_RE.match(text)
        if match is None:
            raise ConfigError(
                f"lsn {text!r} is not of the form X/Y with hexadecimal halves, e.g. 16/B374D848"
            )
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"LSN('{self}')"


def format_lsn(value: int) -> str:
    """Format an integer WAL position as ``X/Y`` without building an ``LSN``."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
