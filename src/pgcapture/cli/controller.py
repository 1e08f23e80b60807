"""``pgcapture controller``: schedule dumps and hand their chunks to gateways (DBLogController).

Settings come from the configuration file (``--config`` or ``$PGCAPTURE_CONFIG``), then
``PGCAPTURE_<SECTION>__<KEY>`` environment variables, then these flags (docs/configuration.md).
Dumps and their progress live in the ``[controller] bucket`` of NATS, so several controllers may
share it and a restarted one resumes every dump. SIGINT/SIGTERM stop it cleanly: chunks in flight
go back to pending for the next controller.
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
    run_service,
    service_overrides,
    set_option,
    with_settings,
)
from pgcapture.config import load_config
from pgcapture.dump.controller import serve_controller


@click.command()
@config_option
@click.option("--listen", help='HOST:PORT to serve gRPC on (default "127.0.0.1:10002").')
@nats_option
@click.option(
    "--instance",
    help="This controller's name in its claims on chunks (default HOSTNAME:PORT). Keep it the "
    "same across restarts, so a restarted controller takes its chunks back at once, and "
    "distinct between controllers sharing a bucket.",
)
@ops_options(":9190")
@set_option("controller.chunk_rows=50000")
def controller(
    config_path: Path | None, instance: str | None, settings: tuple[str, ...], **flags: Any
) -> None:
    """Schedule dumps of tables and hand their chunks to gateways (pgcapture.DBLogController).

    Chunks are planned on each URI's logical replica ([sources.NAME.replica] dsn), never on
    the source.

    \b
    Examples:
      pgcapture controller --config pgcapture.toml --metrics-listen :9190
      pgcapture controller --config pgcapture.toml --listen 0.0.0.0:10002 --instance ctl-a
      pgcapture controller --config pgcapture.toml --set controller.chunk_rows=50000
    """
    overrides = {**service_overrides(flags), "controller.listen": flags["listen"]}
    config = load_config(config_path, os.environ, with_settings(overrides, settings))
    run_service(config, lambda stop: serve_controller(config, stop, instance=instance))
