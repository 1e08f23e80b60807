"""``pgcapture capture``: a source's changes into its NATS JetStream stream, never lost or doubled.

Settings come from the configuration file (``--config`` or ``$PGCAPTURE_CONFIG``), then
``PGCAPTURE_<SECTION>__<KEY>`` environment variables, then these flags (docs/configuration.md);
everything is validated before anything starts. SIGINT/SIGTERM stop it cleanly: what was read is
published, acknowledged and confirmed, and the lease is released.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from pgcapture.cli.options import (
    config_option,
    nats_option,
    ops_options,
    pick_source,
    run_service,
    service_overrides,
    set_option,
    with_settings,
)
from pgcapture.config import load_config
from pgcapture.ops.service import serve_capture


def _overrides(source: str, flags: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    src = f"sources.{source}"
    return with_settings(
        {
            **service_overrides(flags),
            f"{src}.dsn": flags["dsn"],
            f"{src}.slot": flags["slot"],
            f"{src}.publication": flags["publication"],
            f"{src}.tables": _split(flags["tables"]),
            f"{src}.stream.replicas": flags["replicas"],
            f"{src}.stream.storage": flags["storage"],
            f"{src}.stream.max_age": flags["max_age"],
            f"{src}.stream.max_bytes": flags["max_bytes"],
            f"{src}.lock.wait": flags["lock_wait"],
        },
        settings,
    )


def _split(tables: str | None) -> list[str] | None:
    return [t.strip() for t in tables.split(",") if t.strip()] if tables else None


@click.command()
@config_option
@click.option("--source", help="Source name (a [sources.NAME] section; names the stream).")
@click.option("--dsn", help="libpq connection string of the source database.")
@nats_option
@click.option("--slot", help="Replication slot (default pgcapture_<source>).")
@click.option("--publication", help="Publication (default: the slot name).")
@click.option("--tables", help="Comma-separated tables to capture (default: all).")
@click.option("--replicas", type=click.Choice(["1", "3", "5"]), help="Stream replicas.")
@click.option("--storage", type=click.Choice(["file", "memory"]), help="Stream storage.")
@click.option("--max-age", help='Stream retention by age, e.g. "7d" (0 = unlimited).')
@click.option("--max-bytes", help='Stream retention by size, e.g. "50GiB" (-1 = unlimited).')
@click.option(
    "--lock-wait",
    help="Give up after this long if another capture holds the lease (default: wait until "
    "it is released or expires; a crashed holder on this host is taken over at once).",
)
@ops_options(":9187")
@set_option("sources.app.batch.linger=10ms")
def capture(
    config_path: Path | None, source: str | None, settings: tuple[str, ...], **flags: Any
) -> None:
    """Publish a source database's changes to its JetStream stream, in commit order.

    \b
    Examples:
      pgcapture capture --dsn "host=/tmp dbname=app" --nats nats://127.0.0.1:4222 --source app
      pgcapture capture --config pgcapture.toml --source app --metrics-listen :9187
      pgcapture capture --config pgcapture.toml --source app --tables public.orders,public.users
      pgcapture capture --config pgcapture.toml --source app --replicas 3 --max-age 7d \\
          --max-bytes 200GiB
      pgcapture capture --config pgcapture.toml --source app --lock-wait 30s \\
          --set sources.app.batch.linger=10ms
    """
    name = pick_source(config_path, source)
    if flags.get("replicas"):
        flags["replicas"] = int(flags["replicas"])
    config = load_config(config_path, os.environ, _overrides(name, flags, settings))
    source_config = config.source(name)  # fails here, before anything starts, when unknown
    run_service(config, lambda stop: serve_capture(config, source_config, stop))
