"""``pgcapture bootstrap``: give a new replica database its first position in a source's stream.

``--from physical``: the replica is a promoted physical copy of the source (pg_basebackup,
standby, point-in-time recovery); its position is where the copy left the source's history.
``--from snapshot``: the replica is an empty database; the source is copied into it from a
snapshot consistent with the capture slot. Either way ``pgcapture replicate`` then applies the
stream from after that position (docs/replica.md ("Bootstrapping a replica")).

Settings come from the configuration file (``--config`` or ``$PGCAPTURE_CONFIG``), then
``PGCAPTURE_<SECTION>__<KEY>`` environment variables, then these flags.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

from pgcapture.config import load_config
from pgcapture.errors import ConfigError
from pgcapture.ops.logs import setup_logging
from pgcapture.replica.bootstrap import bootstrap_physical, bootstrap_snapshot
from pgcapture.replica.store import Position


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="PGCAPTURE_CONFIG", help="Configuration file (TOML). Env: PGCAPTURE_CONFIG.",
)  # fmt: skip
@click.option("--source", required=True, help="Source name (whose stream the replica follows).")
@click.option("--dsn", required=True, help="libpq connection string of the replica database.")
@click.option(
    "--from", "method", required=True, type=click.Choice(["physical", "snapshot"]),
    help="physical: the replica is a promoted physical copy of the source; snapshot: copy the "
    "source into an empty replica database.",
)  # fmt: skip
@click.option(
    "--source-dsn",
    help="libpq connection string of the source database (default: the configured "
    "sources.NAME.dsn). Needed for --from snapshot; with --from physical, used to check that "
    "the replica is a copy of this source.",
)
@click.option("--slot", help="Capture's replication slot (default pgcapture_<source>).")
@click.option(
    "--replace",
    is_flag=True,
    help="Overwrite an existing position (and, with --from snapshot, drop and recreate the "
    "source's objects on the replica).",
)
def bootstrap(
    config_path: Path | None,
    source: str,
    dsn: str,
    method: str,
    source_dsn: str | None,
    slot: str | None,
    replace: bool,
) -> None:
    """Record where a new replica database stands in a source's stream.

    \b
    Examples:
      pgcapture bootstrap --source app --dsn "host=replica dbname=app" --from physical \\
          --source-dsn "host=primary dbname=app"
      pgcapture bootstrap --config pgcapture.toml --source app \\
          --dsn "host=replica dbname=app" --from snapshot
      pgcapture bootstrap --config pgcapture.toml --source app \\
          --dsn "host=replica dbname=app" --from snapshot --replace
    """
    config = load_config(config_path, os.environ)
    if source in config.sources or source_dsn is not None:
        overrides = {f"sources.{source}.dsn": source_dsn, f"sources.{source}.slot": slot}
        config = load_config(config_path, os.environ, overrides)
    setup_logging(config.log.level, config.log.format)
    section = config.sources.get(source)
    if method == "physical":
        src_dsn = section.dsn if section is not None else None
        position = asyncio.run(bootstrap_physical(dsn, source, src_dsn, replace))
    else:
        if section is None:
            raise ConfigError(
                f"--from snapshot needs the source database of {source!r}: pass --source-dsn, "
                f"or configure [sources.{source}] with its dsn"
            )
        position = asyncio.run(bootstrap_snapshot(section, dsn, replace))
    _report(position)


def _report(position: Position) -> None:
    click.echo(
        f"source {position.source}: the replica holds every transaction committed at or "
        f"before {position.lsn} ({position.origin})"
    )
    click.echo(
        f"next: pgcapture replicate --source {position.source} --dsn <replica dsn> applies the "
        "stream from there"
    )
