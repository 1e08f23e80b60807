"""Compiled row layouts: wire bytes for rows that repeat a table's byte shape.

Most rows of a table have the same skeleton in pgoutput: the same column count, the same kind
per column, the same value lengths (fixed-size binary types always do). For such a skeleton
the wire ``Change.new`` entries are constant bytes with the values in between (a field's key
flag, after its value, is part of the constant bytes that follow it), so a row can be
encoded with one ``struct`` unpack that reads every kind, length and value, one comparison that
checks the skeleton, and one join. ``RowLayout.encode`` returns None for a row of another
shape; the caller then takes the general path, so the result never depends on the layout
(``tests/unit/test_changes.py`` checks both paths agree).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from struct import Struct
from struct import error as StructError

from pgcapture import wire


class RowLayout:
    """One skeleton of one relation's tuples, for one kind of ``Change`` (head + entry tag)."""

    __slots__ = ("_check", "_expected", "_prefix", "_read", "_template", "_values", "size")

    def __init__(
        self,
        skeleton: list[tuple[int, int]],
        prefixes: tuple[bytes, ...],
        suffixes: tuple[bytes, ...],
        head: bytes,
        entry_tag: bytes,
    ) -> None:
        """``skeleton``: per column (kind byte, value length); length -1 for NULL. ``prefixes``
        and ``suffixes``: per column, the bytes of its ``Field`` before and after the value."""
        codes = [">H"]
        checks, values, expected = [0], [], [len(skeleton)]
        pieces: list[bytes] = []  # constant bytes before each value, and after the last one
        pending = b""
        at = 1
        for (kind, length), prefix, suffix in zip(skeleton, prefixes, suffixes, strict=True):
            if length < 0:
                codes.append("B")
                checks.append(at)
                expected.append(kind)
                pending += wire.entry(entry_tag, prefix + suffix)
                at += 1
                continue
            codes.append(f"Bi{length}s")
            checks += (at, at + 1)
            expected += (kind, length)
            values.append(at + 2)
            value_head = wire.value_head(kind, length)
            field_len = len(prefix) + len(value_head) + length + len(suffix)
            pieces.append(pending + entry_tag + wire.varint(field_len) + prefix + value_head)
            pending = suffix  # after the value
            at += 3
        struct = Struct("".join(codes))
        self.size = struct.size
        self._read = struct.unpack_from
        self._check = _getter(checks)
        self._expected = tuple(expected)
        self._values = _getter(values)
        template: list[bytes] = []
        for piece in pieces:
            template += (piece, b"")
        template.append(pending)
        self._template = template
        body_len = len(head) + sum(len(p) for p in template) + sum(n for _, n in skeleton if n > 0)
        self._prefix = wire.field_head(wire.MESSAGE_CHANGE, body_len) + head

    def encode(self, data: bytes, off: int) -> bytes | None:
        """The ``Message{change}`` bytes for the tuple at ``off`` (ending the message), or None
        if it does not have this skeleton."""
        row = self._read(data, off)
        if self._check(row) != self._expected:
            return None
        parts = self._template.copy()
        parts[1::2] = self._values(row)  # type: ignore[assignment]
        return self._prefix + b"".join(parts)


def _getter(positions: list[int]) -> Callable[[tuple[object, ...]], tuple[object, ...]]:
    """``itemgetter`` that always returns a tuple, whatever the number of positions."""
    if len(positions) > 1:
        return itemgetter(*positions)
    return lambda row: tuple(row[p] for p in positions)


def skeleton_of(data: bytes, off: int) -> list[tuple[int, int]] | None:
    """The (kind, length) skeleton of the well-formed tuple at ``off`` that ends the message,
    or None if it has an unchanged-TOAST column or is not well formed."""
    try:
        (natts,) = Struct(">H").unpack_from(data, off)
        off += 2
        out = []
        for _ in range(natts):
            kind = data[off]
            if kind in (98, 116):
                (n,) = Struct(">i").unpack_from(data, off + 1)
                if n < 0:
                    return None
                out.append((kind, n))
                off += 5 + n
            elif kind == 110:
                out.append((kind, -1))
                off += 1
            else:
                return None
    except (IndexError, StructError):
        return None
    return out if off == len(data) else None
