"""Concurrent handling that keeps the order of each row.

``KeyedScheduler`` runs at most ``limit`` jobs at once. A job names the keys of the rows it
touches: one change of a row never runs beside another change of the same row, and changes of
a row run in the order they were submitted (the stream's order). An UPDATE that changes its
row's key names both keys, so whatever comes later under either key waits for it; under
``REPLICA IDENTITY FULL`` (where the key is the whole row) consecutive changes of a row share
a key the same way, the new image of one being the old image of the next. A change without
key columns is ordered with its whole table. A TRUNCATE is a barrier of its tables: it waits
for every earlier job of them, and later jobs wait for it; a DDL statement (a row of
``pgcapture.ddl_logs``) is a barrier of every table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping
from typing import Any, Final

from pgcapture.client.change import Change, Row, Truncate

log = logging.getLogger("pgcapture.client")

Job = Callable[[], Awaitable[None]]

_ALL: Final = ("*",)  # the ordering "table" every change belongs to; DDL is its barrier


class KeyedScheduler:
    """Jobs with per-key order, at most ``limit`` submitted and unfinished at a time."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._active = 0
        self._closed = False
        self._slot_free = asyncio.Event()
        self._last: dict[Hashable, asyncio.Task[None]] = {}
        self._by_table: dict[Hashable, set[asyncio.Task[None]]] = {}
        self._barriers: dict[Hashable, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    @property
    def active(self) -> int:
        return self._active

    async def submit(
        self, keys: Collection[Hashable], tables: Collection[Hashable], barrier: bool, job: Job
    ) -> bool:
        """Queue ``job`` once a slot is free; ``False`` if the scheduler closed meanwhile."""
        while self._active >= self._limit and not self._closed:
            self._slot_free.clear()
            await self._slot_free.wait()
        if self._closed:
            return False
        deps: set[asyncio.Task[None]] = {t for k in keys if (t := self._last.get(k)) is not None}
        for table in tables:
            if (b := self._barriers.get(table)) is not None:
                deps.add(b)
            if barrier:
                deps |= self._by_table.get(table, set())
        self._active += 1
        task = asyncio.create_task(self._run(deps, job))
        self._tasks.add(task)
        for k in keys:
            self._last[k] = task
        for table in tables:
            self._by_table.setdefault(table, set()).add(task)
            if barrier:
                self._barriers[table] = task
        task.add_done_callback(lambda t: self._finished(t, keys, tables))
        return True

    async def _run(self, deps: set[asyncio.Task[None]], job: Job) -> None:
        if deps:
            await asyncio.wait(deps)
        task = asyncio.current_task()
        assert task is not None
        self._started.add(task)
        try:
            await job()
        except Exception as exc:  # jobs handle handler errors; this is a bug to report
            log.exception("consumer job failed")
            if self.error is None:
                self.error = exc

    def _finished(
        self, task: asyncio.Task[None], keys: Collection[Hashable], tables: Collection[Hashable]
    ) -> None:
        self._active -= 1
        self._tasks.discard(task)
        self._started.discard(task)
        for k in keys:
            if self._last.get(k) is task:
                del self._last[k]
        for table in tables:
            running = self._by_table.get(table)
            if running is not None:
                running.discard(task)
                if not running:
                    del self._by_table[table]
            if self._barriers.get(table) is task:
                del self._barriers[table]
        self._slot_free.set()

    def close(self) -> None:
        """Refuse further jobs; a ``submit`` waiting for a slot returns ``False``."""
        self._closed = True
        self._slot_free.set()

    def cancel(self) -> None:
        """Close and cancel every job, running or not (the consumer itself was cancelled)."""
        self.close()
        for task in self._tasks:
            task.cancel()

    async def drain(self, cancel_waiting: bool) -> None:
        """Close and wait for the jobs; with ``cancel_waiting``, those that did not start yet
        are cancelled instead (they never ran, so nothing of theirs is settled)."""
        self.close()
        if cancel_waiting:
            for task in self._tasks - self._started:
                task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))


def _frozen(value: Any) -> Hashable:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value  # type: ignore[no-any-return]


def _key_of(schema: str, table: str, key: Row) -> Hashable:
    return (schema, table, tuple((k, _frozen(v)) for k, v in key.items()))


def ordering_of(event: Change[Any] | Truncate) -> tuple[set[Hashable], list[Hashable], bool]:
    """(row keys, tables, is a barrier) of an event, for the ``KeyedScheduler``."""
    if isinstance(event, Truncate):
        return set(), [(t.schema, t.table) for t in event.tables], True
    if event.is_ddl:
        return set(), [_ALL], True
    table = (event.schema, event.table)
    if not event.key and not event.old_key:
        return {table}, [table, _ALL], False  # no identity: keep the table's order
    keys = {_key_of(event.schema, event.table, event.key)}
    if event.old_key:
        keys.add(_key_of(event.schema, event.table, event.old_key))
    return keys, [table, _ALL], False
