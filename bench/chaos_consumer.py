"""A consumer of the chaos soak (bench/chaos.py), run as its own process: it follows one gateway
URI with ``pgcapture.client`` and keeps the state of the tables it receives in a SQLite file.

    python bench/chaos_consumer.py --target 127.0.0.1:10001 --uri all --db all.sqlite
    python bench/chaos_consumer.py --target 127.0.0.1:10001 --uri some --db some.sqlite \
        --table-regex '^(items|t_[0-9]+)$'

Every change of a ``public`` table is applied as an upsert or a delete, keyed by ``id``, and
committed to the file before the handler returns (so before it is acknowledged): a SIGKILL
loses nothing that was acknowledged. Per row the file keeps each column's ``canonical`` form
(what the soak compares with the source), the ``version`` column and the checkpoint of the last
change applied; a deleted or truncated row stays as a tombstone with its last version.

What counts as time travel, recorded in the ``events`` table:

- a stream change whose checkpoint is above the row's last one but whose ``version`` is lower;
- a dump row (checkpoint lsn 0) older than what is held: a lower version, or the version of a
  row that was deleted or truncated since.

A stream change at or below the row's last checkpoint is a redelivery (at least once): it is
counted as ``replays`` and not applied, as docs/consumer.md advises consumers to do. A dump row
that travels back in time is not applied either, so the final comparison judges the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, NamedTuple

from pgcapture.backoff import Backoff
from pgcapture.client import Change, Consumer, Op, Row, Truncate

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rows (
    tbl TEXT NOT NULL, id INTEGER NOT NULL, version INTEGER, lsn INTEGER NOT NULL,
    seq INTEGER NOT NULL, deleted INTEGER NOT NULL, cols TEXT NOT NULL, via TEXT NOT NULL,
    PRIMARY KEY (tbl, id));
CREATE TABLE IF NOT EXISTS events (kind TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS starts (pid INTEGER, started REAL, first_handled REAL);
"""
COUNTERS: Final = ("changes", "dump_rows", "replays", "truncates", "time_travel")


def canonical(value: Any) -> str:
    """A short text standing for a decoded value, equal for equal values whether psycopg read
    them from the source or the client library decoded them from the stream."""
    if value is None:
        return "N"
    if isinstance(value, bool):
        return f"b{int(value)}"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, Decimal):
        return f"d{value}"
    if isinstance(value, str):
        return "s" + hashlib.md5(value.encode()).hexdigest()
    if isinstance(value, bytes):
        return "x" + hashlib.md5(value).hexdigest()
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return "t" + value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dict | list):
        return "j" + json.dumps(value, sort_keys=True, default=str)
    return f"r{value!r}"


class Held(NamedTuple):
    version: int | None
    lsn: int
    seq: int
    deleted: bool
    cols: dict[str, str]
    via: str = ""  # "": the change at lsn/seq; else the dump row that set the version, and when


class Store:
    """The materialized state, in memory and in the SQLite file, one commit per change."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")  # a SIGKILL keeps what the OS was given
        self.db.executescript(SCHEMA)
        self.rows: dict[tuple[str, int], Held] = {}
        for tbl, ident, version, lsn, seq, deleted, cols, via in self.db.execute(
            "SELECT * FROM rows"
        ):
            self.rows[(tbl, ident)] = Held(version, lsn, seq, bool(deleted), json.loads(cols), via)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.counts.update(dict(self.db.execute("SELECT name, n FROM counters").fetchall()))
        self.pid = os.getpid()
        self.db.execute("INSERT INTO starts VALUES (?, ?, NULL)", (self.pid, time.time()))
        self.first = True
        self.undo: dict[tuple[str, int], Held | None] = {}  # what a rollback puts back

    def on_change(self, change: Change[Row]) -> None:
        if change.schema != "public" or "id" not in change.key:
            return
        key = (change.table, int(change.key["id"]))
        held = self.rows.get(key)
        lsn, seq = change.checkpoint.lsn, change.checkpoint.seq
        with self.transaction():
            if lsn == 0:
                self._dump_row(key, held, change)
            elif held is not None and (lsn, seq) <= (held.lsn, held.seq):
                self.counts["replays"] += 1
            else:
                self._stream_change(key, held, change)

    def on_truncate(self, event: Truncate) -> None:
        names = {t.table for t in event.tables if t.schema == "public"}
        cp = (event.checkpoint.lsn, event.checkpoint.seq)
        with self.transaction():
            self.counts["truncates"] += 1
            for key, held in list(self.rows.items()):
                if key[0] in names and cp > (held.lsn, held.seq):
                    self._save(key, Held(held.version, cp[0], cp[1], True, {}))

    def _stream_change(self, key: tuple[str, int], held: Held | None, change: Change[Row]) -> None:
        self.counts["changes"] += 1
        lsn, seq = change.checkpoint.lsn, change.checkpoint.seq
        if change.op is Op.DELETE or change.new is None:
            self._save(key, Held(held.version if held else None, lsn, seq, True, {}))
            return
        version = version_of(change.new)
        if held is not None and held.version is not None and (version or 0) < held.version:
            self._travel(
                f"{key[0]} id {key[1]}: stream change at {change.checkpoint} has version "
                f"{version}, after version {held.version} ({held_from(held)})"
            )
        cols = dict(held.cols) if held is not None and not held.deleted else {}
        cols.update((name, canonical(value)) for name, value in change.new.items())
        self._save(key, Held(version, lsn, seq, False, cols))

    def _dump_row(self, key: tuple[str, int], held: Held | None, change: Change[Row]) -> None:
        self.counts["dump_rows"] += 1
        assert change.new is not None
        version = version_of(change.new)
        if (
            held is not None
            and held.version is not None
            and version is not None
            and (held.version > version or (held.deleted and held.version >= version))
        ):
            what = "deleted at" if held.deleted else "after"
            self._travel(
                f"{key[0]} id {key[1]}: dump row with version {version}, {what} version "
                f"{held.version} ({held_from(held)})"
            )
            return
        cols = dict(held.cols) if held is not None and not held.deleted else {}
        cols.update((name, canonical(value)) for name, value in change.new.items())
        lsn, seq = (held.lsn, held.seq) if held is not None else (0, 0)
        via = f"a dump row handled at {time.strftime('%H:%M:%S')} by pid {self.pid}"
        self._save(key, Held(version, lsn, seq, False, cols, via))

    def _travel(self, detail: str) -> None:
        self.counts["time_travel"] += 1
        self.db.execute("INSERT INTO events VALUES ('time_travel', ?, ?)", (detail, time.time()))

    def _save(self, key: tuple[str, int], held: Held) -> None:
        self.undo.setdefault(key, self.rows.get(key))
        self.rows[key] = held
        self.db.execute(
            "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *key,
                held.version,
                held.lsn,
                held.seq,
                int(held.deleted),
                json.dumps(held.cols),
                held.via,
            ),
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction with the counters; in memory too, only if it commits."""
        counts = dict(self.counts)
        self.undo.clear()
        self.db.execute("BEGIN")
        try:
            yield
            self.db.executemany(
                "INSERT OR REPLACE INTO counters VALUES (?, ?)", self.counts.items()
            )
            if self.first:
                self.db.execute(
                    "UPDATE starts SET first_handled = ? WHERE pid = ?", (time.time(), self.pid)
                )
            self.db.execute("COMMIT")
            self.first = False
        except BaseException:
            self.db.execute("ROLLBACK")
            self.counts = counts
            for key, held in self.undo.items():
                if held is None:
                    self.rows.pop(key, None)
                else:
                    self.rows[key] = held
            raise


def held_from(held: Held) -> str:
    """Where the version held came from, for the event's text."""
    last = f"last change applied {held.lsn >> 32:X}/{held.lsn & 0xFFFFFFFF:X}#{held.seq}"
    return f"from {held.via}; {last}" if held.via else last


def version_of(row: Row) -> int | None:
    """The ``version`` column (tables without one, such as the transaction log: None)."""
    value = row.get("version")
    return None if value is None else int(value)


async def run(args: argparse.Namespace) -> None:
    store = Store(Path(args.db))
    consumer = Consumer(
        args.target,
        args.uri,
        table_regex=args.table_regex or None,
        backoff=Backoff(initial=0.2, maximum=2.0, multiplier=2.0, jitter=0.5),
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, consumer.stop)
    await consumer.run(handlers={Row: store.on_change, Truncate: store.on_truncate})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the gateway, HOST:PORT")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--db", required=True, help="the SQLite file")
    parser.add_argument("--table-regex", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
