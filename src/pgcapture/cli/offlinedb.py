"""``pgcapture offlinedb``: on-demand, masked copies of source databases.

``offlinedb serve`` runs the PostgreSQL endpoint (``pgcapture.offlinedb.service``);
``offlinedb status`` shows its copies and the snapshots in the store. ``offlinedb snapshot
NAME`` takes one snapshot of ``[offlinedb.databases.NAME]`` into the store and rotates older
ones (``pgcapture.offlinedb.snapshots``); with ``--every`` it takes one per period until
SIGINT/SIGTERM, logging a failed run and trying again at the next period. Settings come from
the configuration file, ``PGCAPTURE_<SECTION>__<KEY>`` variables and ``--set``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from pgcapture.cli.options import config_option, run_service, set_option, with_settings
from pgcapture.config import Config, load_config, parse_duration
from pgcapture.errors import PgCaptureError
from pgcapture.offlinedb.service import read_status, serve_offlinedb
from pgcapture.offlinedb.snapshots import (
    Rotation,
    Snapshot,
    list_snapshots,
    rotate,
    take_snapshot,
)

log = logging.getLogger("pgcapture.offlinedb")


@click.group()
def offlinedb() -> None:
    """On-demand, masked copies of source databases behind one PostgreSQL endpoint.

    \b
    Examples:
      pgcapture offlinedb snapshot --config pgcapture.toml app
      pgcapture offlinedb snapshot --config pgcapture.toml app --every 6h
      pgcapture offlinedb serve --config pgcapture.toml --listen 0.0.0.0:6432
      pgcapture offlinedb status --config pgcapture.toml
    """


def _period(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(parse_duration(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("the period must be longer than 0 seconds")
    return seconds


@offlinedb.command()
@config_option
@set_option("offlinedb.keep=5")
@click.option(
    "--every", "period", metavar="DURATION", callback=_period,
    help='Take one snapshot per period (e.g. "30m", "6h", "1d") until SIGINT/SIGTERM.',
)  # fmt: skip
@click.argument("name")
def snapshot(
    config_path: Path | None, settings: tuple[str, ...], period: float | None, name: str
) -> None:
    """Take a snapshot of [offlinedb.databases.NAME] with pg_basebackup and keep the newest
    [offlinedb] keep of them (snapshots in use by a copy are never removed).

    The role of the snapshot dsn (else the source's dsn) needs the REPLICATION attribute and a
    `replication` line in the server's pg_hba.conf.

    \b
    Examples:
      pgcapture offlinedb snapshot --config pgcapture.toml app
      pgcapture offlinedb snapshot --config pgcapture.toml app --every 6h
      pgcapture offlinedb snapshot --config pgcapture.toml --set offlinedb.keep=5 app
    """
    config = load_config(config_path, os.environ, with_settings({}, settings))
    if period is None:
        run_service(config, lambda stop: _until_stopped(_once(config, name), stop))
    else:
        run_service(config, lambda stop: _every(config, name, period, stop))


async def _once(config: Config, name: str) -> None:
    snap = await take_snapshot(config, name, rotate_after=False)
    _report(snap, await rotate(config, name))


async def _every(config: Config, name: str, period: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        try:
            await _until_stopped(_once(config, name), stop)
        except PgCaptureError as exc:
            log.error(
                "snapshot failed; trying again at the next period",
                extra={"database": name, "error": str(exc)},
            )
        delay = max(0.0, started + period - loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends or ``stop`` is set, which cancels it (a snapshot being taken
    is abandoned and its partial directory removed). Its error, if any, is raised."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopper.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if not task.cancelled():
        task.result()


def _report(snap: Snapshot, rotation: Rotation) -> None:
    click.echo(f"snapshot  {snap.id} of {snap.database!r} in {snap.path}")
    click.echo(f"lsn       {snap.end_lsn} (start {snap.start_lsn}, timeline {snap.timeline})")
    click.echo(f"size      {snap.size} bytes ({snap.size / (1 << 20):.1f} MiB)")
    removed = ", ".join(rotation.removed) or "nothing"
    kept = f"; kept in use: {', '.join(rotation.in_use)}" if rotation.in_use else ""
    click.echo(f"rotation  removed {removed}{kept}")


@offlinedb.command()
@config_option
@set_option("offlinedb.idle_timeout=10m")
@click.option("--listen", metavar="HOST:PORT", help="Address for clients (offlinedb.listen).")
def serve(config_path: Path | None, settings: tuple[str, ...], listen: str | None) -> None:
    """Serve [offlinedb.databases] to PostgreSQL clients: the database name a client asks for
    selects a copy, started from the newest snapshot on the first connection, masked before
    any client reads it, kept fresh from the change log, removed when idle.

    \b
    Examples:
      pgcapture offlinedb serve --config pgcapture.toml
      pgcapture offlinedb serve --config pgcapture.toml --listen 0.0.0.0:6432
      psql "host=127.0.0.1 port=6432 dbname=app user=analyst"
    """
    config = load_config(
        config_path, os.environ, with_settings({"offlinedb.listen": listen}, settings)
    )
    run_service(config, lambda stop: serve_offlinedb(config, stop))


@offlinedb.command()
@config_option
@set_option("offlinedb.store=/var/lib/offlinedb")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_path: Path | None, settings: tuple[str, ...], as_json: bool) -> None:
    """The copies the server runs (from its status file) and the snapshots of each database.

    \b
    Examples:
      pgcapture offlinedb status --config pgcapture.toml
      pgcapture offlinedb status --config pgcapture.toml --json
    """
    config = load_config(config_path, os.environ, with_settings({}, settings))
    running = read_status(config)
    snapshots = {
        name: [s.to_json() for s in list_snapshots(config, name)]
        for name in config.offlinedb.databases
    }
    if as_json:
        click.echo(json.dumps({"server": running, "snapshots": snapshots}, indent=2))
        return
    if running is None:
        click.echo("server: no status file (pgcapture offlinedb serve has not run here)")
    else:
        copies = running.get("copies", [])
        click.echo(f"copies: {len(copies)} of at most {running.get('max_copies')}")
        for c in copies:
            click.echo(
                f"  {c['database']}: {c['state']}, port {c['port']}, snapshot {c['snapshot']} "
                f"({c['snapshot_lsn']}), {c['connections']} connections, "
                f"idle {c['idle_seconds']} s{', error: ' + c['error'] if c['error'] else ''}"
            )
    for name, snaps in snapshots.items():
        newest = f", newest {snaps[0]['id']} at {snaps[0]['end_lsn']}" if snaps else ""
        click.echo(f"snapshots of {name}: {len(snaps)}{newest}")
