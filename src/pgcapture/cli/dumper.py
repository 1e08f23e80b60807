"""``pgcapture dumper``: serve dump chunks read on a source's logical replica over gRPC
(``pgcapture.Agent``: ``StreamDumpBatched`` and the Go project's ``StreamDump``).

Settings come from the configuration file (``--config`` or ``$PGCAPTURE_CONFIG``), then
``PGCAPTURE_<SECTION>__<KEY>`` environment variables, then these flags (docs/configuration.md).
The replica read is ``[sources.NAME.replica] dsn`` of ``[dumper] source``. SIGINT/SIGTERM stop
it; requests in flight get a few seconds to finish.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from pgcapture.cli.options import config_option, ops_options, run_service, set_option, with_settings
from pgcapture.config import load_config
from pgcapture.dump.agent import serve_dumper


def _overrides(flags: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    return with_settings(
        {
            "dumper.listen": flags["listen"],
            "dumper.source": flags["source"],
            "metrics.listen": flags["metrics_listen"],
            "log.level": flags["log_level"],
            "log.format": flags["log_format"],
        },
        settings,
    )


@click.command()
@config_option
@click.option("--listen", help='HOST:PORT to serve gRPC on (default "127.0.0.1:10003").')
@click.option(
    "--source", help="The source whose logical replica is read (default: the only one configured)."
)
@ops_options(":9190")
@set_option("dumper.batch_rows=2000")
def dumper(config_path: Path | None, settings: tuple[str, ...], **flags: Any) -> None:
    """Serve dump chunks read on a source's logical replica (pgcapture.Agent).

    Chunks are read on the replica only, at a position at or after the consumer's, so a dump
    never takes a consumer back in time. Gateways reach it through [gateway.uris.NAME] dumper.

    \b
    Examples:
      pgcapture dumper --config pgcapture.toml --source app
      pgcapture dumper --config pgcapture.toml --listen 0.0.0.0:10003 --metrics-listen :9190
      pgcapture dumper --config pgcapture.toml --source app --set dumper.batch_rows=2000
    """
    config = load_config(config_path, os.environ, _overrides(flags, settings))
    run_service(config, lambda stop: serve_dumper(config, stop))
