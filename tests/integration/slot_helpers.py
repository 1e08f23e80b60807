"""Helpers for integration tests that read a slot (imported by plain name, as pytest puts this
folder on ``sys.path``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pgcapture.capture.changes import Record
from pgcapture.capture.reader import SlotReader
from pgcapture.proto import pb


@dataclass
class Captured:
    record: Record
    message: pb.Message

    @property
    def kind(self) -> str:
        return str(self.message.WhichOneof("type"))


async def collect(reader: SlotReader, commits: int, timeout: float = 30.0) -> list[Captured]:
    """Read until ``commits`` Commit records arrived, confirming each transaction."""
    out: list[Captured] = []
    seen = 0

    async def run() -> None:
        nonlocal seen
        while seen < commits:
            for record in await reader.read():
                out.append(Captured(record, pb.Message.FromString(record.message)))
                if record.is_commit:
                    seen += 1
                    reader.confirm(record.end_lsn)

    await asyncio.wait_for(run(), timeout)
    return out


def changes(captured: list[Captured]) -> list[pb.Change]:
    return [c.message.change for c in captured if c.kind == "change"]


def user_changes(captured: list[Captured]) -> list[pb.Change]:
    """Row changes of user tables (not of pgcapture's own DDL log)."""
    return [c for c in changes(captured) if c.schema != "pgcapture"]


def fields(row: list[pb.Field] | object) -> dict[str, pb.Field]:
    return {f.name: f for f in row}  # type: ignore[attr-defined]
