"""``pgcapture quickstart``: every part of pgcapture working together, in one command.

Throw-away source and replica PostgreSQL clusters (from the machine's PostgreSQL server
programs) and a nats-server; capture, replicate, the dumper, the controller and the gateway; a
workload with DDL whose changes a consumer prints as they arrive; a dump with its progress; a
check that the replica equals the source. It exits 0 when all of that happened, leaving nothing
running and nothing on disk (``pgcapture.quickstart`` has the details).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pgcapture.cli.dump_view import follow, progress_view
from pgcapture.quickstart import Demo, Poll


@click.command()
@click.option("--quiet", is_flag=True, help="Print only the summary.")
@click.option(
    "--follow",
    "keep",
    is_flag=True,
    help="Keep everything running after the demo, printing changes, until Ctrl-C/SIGTERM.",
)
@click.option(
    "--info",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the endpoints (source and replica DSNs, NATS URL, gateway, controller, "
    "dumper, URI) as a JSON object to this file once everything runs.",
)
def quickstart(quiet: bool, keep: bool, info: Path | None) -> None:
    """Run capture, replica sync, dumps and the gateway on throw-away servers and show them.

    \b
    Examples:
      pgcapture quickstart
      pgcapture quickstart --follow --info endpoints.json
      psql "$(jq -r .source_dsn endpoints.json)"    # in another terminal
    """
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    echo = (lambda line: None) if quiet else click.echo
    summary = asyncio.run(_run(echo, keep, info))
    click.echo(
        f"quickstart: {summary['changes']} changes received as they happened, "
        f"{summary['dump_rows']} rows dumped in {summary['dump_chunks']} chunks, the replica "
        f"equal to the source ({summary['tables']} tables), in {summary['seconds']} s; "
        "nothing left running",
        err=True,
    )
    if info is not None:
        info.unlink(missing_ok=True)


async def _run(echo: Any, keep: bool, info: Path | None) -> dict[str, Any]:
    async def watch(poll: Poll) -> None:
        await follow(poll, progress_view(echo))

    demo = Demo(echo, watch)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(demo.run(stop if keep else None, info))
    if not keep:  # a signal ends the demo early, cleanly
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, stop_task}, return_when="FIRST_COMPLETED")
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            click.echo("quickstart: stopped; nothing left running", err=True)
            sys.exit(130)
        stop_task.cancel()
    summary: dict[str, Any] = await task
    return summary
