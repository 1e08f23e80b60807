"""How ``pgcapture dump`` shows dumps: the status table, JSON objects and the live progress.

Everything here turns ``DumpStatus`` messages into text; nothing talks to the controller.
``follow`` polls through the function it is handed until every dump it returns has ended (done
or stopped) or it is cancelled. Rates and ETAs are measured here, over the last
``RATE_WINDOW`` seconds of polls, since the controller reports only totals.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column, Table

from pgcapture.proto import pb

ENDED: Final = frozenset({"done", "stopped"})
POLL_INTERVAL = 0.5  # seconds between two ListDumps calls while watching
PLAIN_EVERY = 3.0  # seconds between two plain progress lines of one dump
RATE_WINDOW: Final = 10.0  # seconds of polls the rate is measured over

Key = tuple[str, str]  # (uri, id): ids are unique per URI


def key(status: pb.DumpStatus) -> Key:
    return (status.uri, status.id)


def ended(status: pb.DumpStatus) -> bool:
    return status.state in ENDED or status.HasField("finished")


def span(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h05m``, ``3d04h``."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def tables_text(tables: Sequence[str], limit: int = 2) -> str:
    """``public.a, public.b +3``; ``every table`` when the dump names none."""
    if not tables:
        return "every table"
    shown = ", ".join(tables[:limit])
    return shown + (f" +{len(tables) - limit}" if len(tables) > limit else "")


def chunks_text(status: pb.DumpStatus) -> str:
    running = f" ({status.chunks_running} running)" if status.chunks_running else ""
    return f"{status.chunks_done}/{status.chunks_total}{running}"


def rows_text(status: pb.DumpStatus) -> str:
    if status.rows_estimate:
        return f"{status.rows:,} / ~{status.rows_estimate:,}"
    return f"{status.rows:,}"


def _time(stamp: Timestamp, present: bool) -> str | None:
    return stamp.ToJsonString() if present else None


def status_json(status: pb.DumpStatus) -> dict[str, Any]:
    """One dump as a JSON object; every key is always present (absent times are null)."""
    return {
        "id": status.id,
        "uri": status.uri,
        "state": status.state,
        "tables": list(status.tables),
        "chunks_total": status.chunks_total,
        "chunks_done": status.chunks_done,
        "chunks_running": status.chunks_running,
        "rows": status.rows,
        "rows_estimate": status.rows_estimate,
        "retries": status.retries,
        "last_error": status.last_error,
        "created": _time(status.created, status.HasField("created")),
        "updated": _time(status.updated, status.HasField("updated")),
        "finished": _time(status.finished, status.HasField("finished")),
    }


def _age(status: pb.DumpStatus, now: datetime) -> str:
    if not status.HasField("created"):
        return "-"
    return span((now - status.created.ToDatetime(tzinfo=UTC)).total_seconds())


def status_table(statuses: Sequence[pb.DumpStatus], now: datetime) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("ID", "URI", "STATE", "TABLES", "CHUNKS", "ROWS", "RETRIES"):
        table.add_column(name, no_wrap=True, justify="right" if name == "RETRIES" else "left")
    table.add_column("LAST ERROR", overflow="fold", max_width=60)
    table.add_column("AGE", no_wrap=True, justify="right")
    for s in statuses:
        cells = (s.id, s.uri, s.state, tables_text(s.tables), chunks_text(s), rows_text(s))
        table.add_row(*cells, str(s.retries), s.last_error or "-", _age(s, now))
    return table


def print_table(statuses: Sequence[pb.DumpStatus], now: datetime) -> None:
    """The table on stdout; for a pipe or a file, wide enough that no line wraps."""
    console = Console()
    if not sys.stdout.isatty():
        console.width = max(console.width, 240)
    console.print(status_table(statuses, now))


def summary(status: pb.DumpStatus) -> str:
    """What ``schedule`` prints: the id, then what was scheduled."""
    estimate = f"~{status.rows_estimate:,} (estimate)" if status.rows_estimate else "no estimate"
    return (
        f"scheduled dump {status.id} on uri {status.uri} ({status.state})\n"
        f"  tables: {tables_text(status.tables, limit=10)}\n"
        f"  chunks: {status.chunks_total}\n"
        f"  rows:   {estimate}"
    )


@dataclass(frozen=True)
class Row:
    """One dump's progress, ready to show. The bar is ``done`` of ``total`` (None: not known):
    rows against the estimate, or chunks when the dump has no estimate."""

    label: str
    state: str
    done: int
    total: int | None
    rows: str  # "2,000/4,000 rows", or "2,000 rows" without an estimate
    chunks: str
    rate: str
    eta: str

    @property
    def percent(self) -> str:
        return f"{100 * self.done // self.total}%" if self.total else "?%"


@dataclass
class _Meter:
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, now: float, rows: int, chunks: int) -> tuple[float, float] | None:
        """Rows/s and chunks/s over the window, once two polls are far enough apart."""
        self.samples.append((now, rows, chunks))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        then, rows0, chunks0 = self.samples[0]
        if now - then < 0.2:
            return None
        return (rows - rows0) / (now - then), (chunks - chunks0) / (now - then)


@dataclass
class Tracker:
    """Turns successive statuses of the same dumps into rows with rates and ETAs."""

    meters: dict[Key, _Meter] = field(default_factory=dict)

    def row(self, status: pb.DumpStatus, now: float) -> Row:
        rates = self.meters.setdefault(key(status), _Meter()).add(
            now, status.rows, status.chunks_done
        )
        by_rows = status.rows_estimate > 0
        done = status.rows if by_rows else status.chunks_done
        total = max(status.rows_estimate, status.rows) if by_rows else status.chunks_total
        if status.state == "done":
            total = done
        speed = (rates[0] if by_rows else rates[1]) if rates else 0.0
        estimate = f"/{status.rows_estimate:,}" if by_rows else ""
        return Row(
            label=f"{status.id} {status.uri} {tables_text(status.tables)}",
            state=status.state,
            done=done,
            total=total or None,
            rows=f"{status.rows:,}{estimate} rows",
            chunks=f"{status.chunks_done}/{status.chunks_total}",
            rate=f"{rates[0]:,.0f} rows/s" if rates and not ended(status) else "- rows/s",
            eta=span((total - done) / speed) if speed > 0 and not ended(status) else "-",
        )


class View(Protocol):
    def show(self, statuses: Sequence[pb.DumpStatus], now: float) -> None: ...

    def __enter__(self) -> View: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class LiveView:
    """One rich progress bar per dump, for a terminal."""

    def __init__(self, console: Console) -> None:
        self._tracker = Tracker()
        self._tasks: dict[Key, TaskID] = {}
        fixed = Column(no_wrap=True)
        self._progress = Progress(
            TextColumn("{task.description}", table_column=Column(ratio=2, no_wrap=True)),
            TextColumn("[bold]{task.fields[state]}", table_column=fixed),
            BarColumn(bar_width=None, table_column=Column(ratio=1)),
            TextColumn("{task.fields[rows]}", table_column=fixed),
            TextColumn("{task.fields[chunks]} chunks", table_column=fixed),
            TextColumn("{task.fields[rate]}", table_column=fixed),
            TextColumn("eta {task.fields[eta]}", table_column=fixed),
            console=console,
            expand=True,
        )

    def __enter__(self) -> LiveView:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def show(self, statuses: Sequence[pb.DumpStatus], now: float) -> None:
        for status in statuses:
            row = self._tracker.row(status, now)
            fields = {k: getattr(row, k) for k in ("state", "rows", "chunks", "rate", "eta")}
            task = self._tasks.get(key(status))
            if task is None:
                task = self._tasks[key(status)] = self._progress.add_task(row.label, **fields)
            self._progress.update(task, total=row.total, completed=row.done, **fields)


class PlainView:
    """Progress lines for a pipe or a file: each dump at most every ``PLAIN_EVERY`` seconds,
    and whenever its state changes."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._tracker = Tracker()
        self._last: dict[Key, tuple[float, str]] = {}

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def show(self, statuses: Sequence[pb.DumpStatus], now: float) -> None:
        for status in statuses:
            row = self._tracker.row(status, now)
            printed, state = self._last.get(key(status), (-PLAIN_EVERY, ""))
            if now - printed >= PLAIN_EVERY or state != row.state:
                self._write(plain_line(row))
                self._last[key(status)] = (now, row.state)


def plain_line(row: Row) -> str:
    return (
        f"dump {row.label}: {row.state} {row.percent}, {row.rows}, chunks {row.chunks}, "
        f"{row.rate}, eta {row.eta}"
    )


def progress_view(write: Callable[[str], None]) -> View:
    """Live bars when stdout is a terminal, else plain lines handed to ``write``."""
    return LiveView(Console()) if sys.stdout.isatty() else PlainView(write)


async def follow(poll: Callable[[], Awaitable[Sequence[pb.DumpStatus]]], view: View) -> None:
    """Show the dumps ``poll`` returns until each has ended; cancel it to stop watching."""
    with view:
        while True:
            statuses = await poll()
            view.show(statuses, time.monotonic())
            if all(ended(s) for s in statuses):
                return
            await asyncio.sleep(POLL_INTERVAL)
