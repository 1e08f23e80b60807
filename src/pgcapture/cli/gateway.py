"""``pgcapture gateway``: serve consumers the changes of their URIs over gRPC (DBLogGateway).

Settings come from the configuration file (``--config`` or ``$PGCAPTURE_CONFIG``), then
``PGCAPTURE_<SECTION>__<KEY>`` environment variables, then these flags (docs/configuration.md).
TLS and tokens are checked before anything connects: the gateway does not start open unless told
so. SIGINT/SIGTERM stop it cleanly: client streams end with UNAVAILABLE and resume elsewhere
from their URI's durable position.
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
from pgcapture.gateway.resolver import load_resolver
from pgcapture.gateway.server import serve_gateway


def _overrides(flags: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    insecure = True if flags["insecure"] else None
    return with_settings(
        {
            **service_overrides(flags),
            "gateway.listen": flags["listen"],
            "gateway.tls.disabled": insecure,
            "gateway.auth.disabled": insecure,
        },
        settings,
    )


@click.command()
@config_option
@click.option("--listen", help='HOST:PORT to serve gRPC on (default "127.0.0.1:10001").')
@nats_option
@click.option(
    "--resolver", "resolver_spec", metavar="MODULE:ATTRIBUTE",
    help="Resolve URIs with this object (or factory taking the configuration) instead of "
    "[gateway.uris]; see docs/gateway.md.",
)  # fmt: skip
@click.option(
    "--insecure", is_flag=True,
    help="No TLS and no tokens: sets gateway.tls.disabled and gateway.auth.disabled together. "
    "For local use only; anyone who reaches --listen reads every URI.",
)  # fmt: skip
@ops_options(":9189")
@set_option("gateway.uris.orders.max_unacked=500")
def gateway(
    config_path: Path | None,
    resolver_spec: str | None,
    settings: tuple[str, ...],
    **flags: Any,
) -> None:
    """Serve the changes of each consumer URI over gRPC (pgcapture.DBLogGateway).

    TLS ([gateway.tls] cert and key) and tokens ([gateway.auth.tokens]) are required unless
    disabled explicitly; --insecure disables both, for local use.

    \b
    Examples:
      pgcapture gateway --config pgcapture.toml --metrics-listen :9189
      pgcapture gateway --config pgcapture.toml --listen 0.0.0.0:10001 --set log.level=debug
      pgcapture gateway --config pgcapture.toml --insecure --listen 127.0.0.1:10001
      pgcapture gateway --config pgcapture.toml --resolver myapp.cdc:resolver
      pgcapture gateway --config pgcapture.toml --nats nats://nats-1:4222,nats://nats-2:4222
    """
    config = load_config(config_path, os.environ, _overrides(flags, settings))
    resolver = load_resolver(resolver_spec, config) if resolver_spec else None
    run_service(config, lambda stop: serve_gateway(config, stop, resolver=resolver))
