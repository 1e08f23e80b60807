"""``pgcapture tail``: print a slot's decoded changes, one JSON object per line.

Like ``pg_recvlogical``, but decoded into the wire schema: each line is
``{"checkpoint": ..., "message": ...}``, both in protobuf's canonical JSON mapping. Whole
transactions are confirmed to the slot once their lines are written and flushed, so a restart
continues after the last complete transaction printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from typing import IO

import click
from google.protobuf import json_format

from pgcapture.capture.changes import Record
from pgcapture.capture.reader import SlotReader
from pgcapture.proto import pb


def record_json(record: Record) -> str:
    checkpoint = pb.Checkpoint(lsn=record.lsn, seq=record.seq)
    message = pb.Message.FromString(record.message)
    return json.dumps(
        {
            "checkpoint": json_format.MessageToDict(checkpoint),
            "message": json_format.MessageToDict(message),
        },
        separators=(",", ":"),
    )


async def run_tail(reader: SlotReader, out: IO[str], stop: asyncio.Event) -> None:
    """Print records until ``stop`` is set; confirm each transaction once printed."""
    await reader.open()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            read = asyncio.ensure_future(reader.read())
            await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
                break
            _print_and_confirm(reader, read.result(), out)
    finally:
        stopped.cancel()
        await reader.close()


def _print_and_confirm(reader: SlotReader, records: list[Record], out: IO[str]) -> None:
    out.write("".join(record_json(r) + "\n" for r in records))
    out.flush()
    commits = [r.end_lsn for r in records if r.is_commit]
    if commits:
        reader.confirm(commits[-1])


@click.command()
@click.option("--dsn", required=True, help="libpq connection string of the source database.")
@click.option("--slot", required=True, help="Replication slot name (created if missing).")
@click.option("--publication", help="Publication name (default: the slot name).")
@click.option("--tables", help="Comma-separated tables to capture (default: all tables).")
@click.option(
    "--temporary", is_flag=True, help="Use a temporary slot that retains no WAL after exit."
)
@click.option(
    "--status-interval",
    type=click.FloatRange(min=0.05),
    default=10.0,
    show_default=True,
    help="Seconds between status updates that report the confirmed position to the server.",
)
def tail(
    dsn: str,
    slot: str,
    publication: str | None,
    tables: str | None,
    temporary: bool,
    status_interval: float,
) -> None:
    """Print a slot's changes as JSON lines until interrupted.

    \b
    Examples:
      pgcapture tail --dsn "host=/tmp dbname=app" --slot debug --temporary
      pgcapture tail --dsn postgresql://cdc@db/app --slot app --tables public.orders,public.users
      pgcapture tail --dsn "dbname=app" --slot audit --publication audit --status-interval 1
    """
    table_list = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
    reader = SlotReader(dsn, slot, publication, table_list, temporary, status_interval)
    asyncio.run(_main(reader))


async def _main(reader: SlotReader) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(BrokenPipeError):
        await run_tail(reader, sys.stdout, stop)
