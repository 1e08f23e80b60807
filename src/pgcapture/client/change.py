"""The events a consumer receives: ``Change`` (a row) and ``Truncate`` (whole tables).

Each event is settled exactly once: acknowledged (``ack()``) or requeued with a reason
(``requeue(reason)``: the gateway delivers it again later). Handlers rarely call either: a
handler that returns acknowledges its event, one that raises requeues it. Iteration
acknowledges an event when the loop asks for the next one, unless it was settled before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Generic, TypeVar

from pgcapture.checkpoint import Checkpoint

M = TypeVar("M")

DDL_SCHEMA: Final = "pgcapture"
DDL_TABLE: Final = "ddl_logs"


class Op(Enum):
    """What a change did to its row."""

    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


class Row(Mapping[str, Any]):
    """Column name -> decoded value, for tables without a model (and for keys).

    A column absent from the change (an unchanged TOASTed value) is absent from the ``Row``.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values: dict[str, Any] = dict(values or {})

    def __getitem__(self, column: str) -> Any:
        return self._values[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({self._values!r})"


@dataclass(frozen=True, slots=True)
class TableName:
    schema: str
    table: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}"


class Ticket:
    """The settlement of one delivered event; the first ack or requeue wins.

    ``settle`` receives ``""`` for an acknowledgement or the requeue reason.
    """

    __slots__ = ("_settle", "outcome")

    def __init__(self, settle: Callable[[str], None] | None = None) -> None:
        self._settle = settle
        self.outcome: str | None = None

    @property
    def settled(self) -> bool:
        return self.outcome is not None

    def settle(self, reason: str) -> None:
        if self.outcome is not None:
            done = "acknowledged" if not self.outcome else f"requeued ({self.outcome!r})"
            raise RuntimeError(f"this event was already {done}; settle an event once")
        self.outcome = reason
        if self._settle is not None:
            self._settle(reason)


class _Settle:
    """``ack`` / ``requeue`` of an event holding a ``Ticket``."""

    __slots__ = ()
    _ticket: Ticket

    def ack(self) -> None:
        """Acknowledge: the gateway will not deliver this event again."""
        self._ticket.settle("")

    def requeue(self, reason: str) -> None:
        """Have the gateway deliver this event again later; ``reason`` must not be empty."""
        if not reason:
            raise ValueError("a requeue needs a non-empty reason (an empty one acknowledges)")
        self._ticket.settle(reason)

    @property
    def settled(self) -> bool:
        return self._ticket.settled


@dataclass(frozen=True, slots=True, eq=False)
class Change(_Settle, Generic[M]):
    """A row change: ``new`` / ``old`` are instances of the table's model, or ``Row``\\ s.

    - INSERT: ``new``; ``old`` is ``None``.
    - UPDATE: ``new``; ``old`` only when the key changed (its key columns) or under
      ``REPLICA IDENTITY FULL`` (the whole old row), else ``None``.
    - DELETE: ``old`` (its key columns, or the whole row under FULL); ``new`` is ``None``.

    ``key`` holds the replica-identity columns of the row as it is after the change (as it
    was before, for a DELETE); ``old_key`` those of ``old`` when it has any.
    """

    op: Op
    schema: str
    table: str
    checkpoint: Checkpoint
    new: M | None
    old: M | None
    key: Row
    old_key: Row | None = None
    _ticket: Ticket = field(default_factory=Ticket, repr=False)

    @property
    def is_ddl(self) -> bool:
        """A DDL statement, captured as an INSERT into ``pgcapture.ddl_logs``."""
        return self.schema == DDL_SCHEMA and self.table == DDL_TABLE


@dataclass(frozen=True, slots=True, eq=False)
class Truncate(_Settle):
    """TRUNCATE of ``tables`` by one statement (with those reached through CASCADE)."""

    tables: tuple[TableName, ...]
    cascade: bool
    restart_identity: bool
    checkpoint: Checkpoint
    _ticket: Ticket = field(default_factory=Ticket, repr=False)
