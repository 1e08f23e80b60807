"""``pgcapture replicate``: keep a replica database equal to the source, from the source's stream.

Settings come from the configuration file (``--config`` or ``$PGCAPTURE_CONFIG``), then
``PGCAPTURE_<SECTION>__<KEY>`` environment variables, then these flags (docs/configuration.md);
the replica's connection string is ``--dsn`` or ``[sources.NAME.replica] dsn``. SIGINT/SIGTERM
stop it cleanly: complete source transactions are committed, the rest is applied next time.
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
from pgcapture.errors import ConfigError
from pgcapture.replica.service import serve_replicate


def _overrides(source: str, flags: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    rep = f"sources.{source}.replica"
    return with_settings(
        {
            **service_overrides(flags),
            f"{rep}.dsn": flags["dsn"],
            f"{rep}.max_changes": flags["max_changes"],
            f"{rep}.max_delay": flags["max_delay"],
            f"{rep}.skip_ddl": list(flags["skip_ddl"]) or None,
            f"{rep}.create_missing": list(flags["create_missing"]) or None,
        },
        settings,
    )


@click.command()
@config_option
@click.option("--source", help="Source name (a [sources.NAME] section; names the stream).")
@click.option("--dsn", help="libpq connection string of the replica database.")
@nats_option
@click.option(
    "--from-start", is_flag=True,
    help="A replica without a position starts at the stream's beginning (it must then hold "
    "the source's schema as it was when capture started).",
)  # fmt: skip
@click.option(
    "--skip-ddl", type=int, multiple=True, metavar="ID",
    help="Do not replay this pgcapture.ddl_logs row (its effect was applied by hand).",
)  # fmt: skip
@click.option(
    "--create-missing", multiple=True, metavar="SCHEMA.TABLE",
    help="When a change of this table arrives and the table does not exist on the replica, "
    "create it from the change (columns, built-in types and key only; docs/replica.md).",
)  # fmt: skip
@click.option("--max-changes", type=int, help="Changes per replica transaction (default 20000).")
@click.option("--max-delay", help='How long a replica transaction may stay open, e.g. "1s".')
@ops_options(":9188")
@set_option("sources.app.replica.max_delay=500ms")
def replicate(
    config_path: Path | None,
    source: str | None,
    from_start: bool,
    settings: tuple[str, ...],
    **flags: Any,
) -> None:
    """Apply a source's stream to a replica database, exactly once, DDL included.

    \b
    Examples:
      pgcapture replicate --nats nats://127.0.0.1:4222 --source app --dsn "dbname=replica"
      pgcapture replicate --config pgcapture.toml --source app --metrics-listen :9188
      pgcapture replicate --config pgcapture.toml --source app --max-changes 5000 \\
          --max-delay 200ms
      pgcapture replicate --config pgcapture.toml --source app --skip-ddl 42
      pgcapture replicate --config pgcapture.toml --source app --skip-ddl 42 \\
          --create-missing public.orders
      pgcapture replicate --nats nats://127.0.0.1:4222 --source app --dsn "dbname=replica" \\
          --from-start
    """
    name = pick_source(config_path, source)
    config = load_config(config_path, os.environ, _overrides(name, flags, settings))
    src = config.source(name, need_dsn=False)
    if not src.replica.dsn:
        raise ConfigError(
            f"no replica to apply to: pass --dsn REPLICA_DSN or set dsn in [sources.{name}.replica]"
        )
    run_service(config, lambda stop: serve_replicate(config, src, stop, from_start))
