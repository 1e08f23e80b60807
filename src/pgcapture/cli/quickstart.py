"""``pgcapture quickstart``: see capture work on a throw-away database in one command.

Starts a private PostgreSQL cluster (from the machine's PostgreSQL server programs), opens a
temporary slot on it like ``pgcapture tail --temporary``, runs a small workload with DDL and
prints every captured message as ``tail`` would. It exits when the workload's last transaction
has been printed and leaves nothing running and nothing on disk.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Final

import click
import psycopg

from pgcapture.capture.reader import SlotReader
from pgcapture.cli.tail import record_json
from pgcapture.local import LocalPostgres
from pgcapture.proto import pb

WORKLOAD: Final = (
    "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10,2))",
    "INSERT INTO items VALUES (1, 'apple', 0.50), (2, 'pear', 0.75)",
    "UPDATE items SET price = 0.55 WHERE id = 1",
    "ALTER TABLE items ADD COLUMN tags text[] DEFAULT '{}'",
    "INSERT INTO items VALUES (3, 'fig', NULL, '{sweet,dried}')",
    "DELETE FROM items WHERE id = 2",
    "TRUNCATE items",
)


async def _run(echo: bool) -> int:
    cluster = LocalPostgres.create()
    try:
        await asyncio.to_thread(cluster.start)
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        dsn = cluster.dsn("app")
        click.echo(f"source database: {dsn}", err=True)
        reader = SlotReader(dsn, "quickstart", temporary=True)
        await reader.open()
        try:
            return await _workload_and_print(reader, dsn, echo)
        finally:
            await reader.close()
    finally:
        await asyncio.to_thread(cluster.destroy)


async def _workload_and_print(reader: SlotReader, dsn: str, echo: bool) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in WORKLOAD:
            await conn.execute(statement)
    commits = 0
    count = 0
    while commits < len(WORKLOAD):
        records = await asyncio.wait_for(reader.read(), 30)
        for record in records:
            count += 1
            if echo:
                sys.stdout.write(record_json(record) + "\n")
            if record.is_commit:
                commits += 1
                reader.confirm(record.end_lsn)
    sys.stdout.flush()
    return count


@click.command()
@click.option("--quiet", is_flag=True, help="Print only the summary.")
def quickstart(quiet: bool) -> None:
    """Capture a small workload with DDL from a throw-away PostgreSQL and print it."""
    count = asyncio.run(_run(not quiet))
    click.echo(
        f"captured {count} messages from {len(WORKLOAD)} transactions "
        f"(wire schema package {pb.DESCRIPTOR.package!r}); nothing left running",
        err=True,
    )
