"""Checkpoints: the identity and total order of every captured message.

Every message of a source transaction carries ``Checkpoint(lsn, seq)`` (DESIGN.md, contract 1):
Begin = (commit LSN, 0), its changes = (commit LSN, 1..n), Commit = (commit LSN, n + 1).
The total order is (lsn, seq). ``key()`` is a fixed-width string whose lexicographic order is
that same order, used as the JetStream message id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pgcapture.errors import ConfigError
from pgcapture.lsn import LSN, format_lsn

_KEY_RE: Final = re.compile(r"^([0-9A-F]{16}):([0-9A-F]{8})$")
_SEQ_MAX: Final = (1 << 32) - 1


@dataclass(frozen=True, order=True, slots=True)
class Checkpoint:
    """A position in the captured stream: the commit LSN and the index within the transaction."""

    lsn: int
    seq: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= _SEQ_MAX:
            raise ValueError(f"checkpoint seq {self.seq} is outside 0..2^32-1")
        if not 0 <= self.lsn < 1 << 64:
            raise ValueError(f"checkpoint lsn {self.lsn} is outside 0..2^64-1")

    def key(self) -> str:
        """``"000000000169A2F8:00000003"``: sortable as a string in checkpoint order."""
        return f"{self.lsn:016X}:{self.seq:08X}"

    @classmethod
    def from_key(cls, key: str) -> Checkpoint:
        match = _KEY_RE.match(key)
        if match is None:
            raise ConfigError(
                f"checkpoint key {key!r} is not of the form <16 hex digits>:<8 hex digits>"
            )
        return cls(int(match[1], 16), int(match[2], 16))

    @property
    def lsn_text(self) -> str:
        return format_lsn(self.lsn)

    def __str__(self) -> str:
        return f"{format_lsn(self.lsn)}#{self.seq}"


ZERO: Final = Checkpoint(LSN(0), 0)
