"""What the service subcommands share: the configuration file, ``--set``, the source name, the
NATS, metrics and log flags, and running until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from pgcapture.config import Config, load_config, parse_value
from pgcapture.errors import ConfigError
from pgcapture.ops.logs import setup_logging

FC = TypeVar("FC", bound=Callable[..., Any])

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="PGCAPTURE_CONFIG", help="Configuration file (TOML). Env: PGCAPTURE_CONFIG.",
)  # fmt: skip


def set_option(example: str) -> Callable[[FC], FC]:
    return click.option(
        "--set", "settings", multiple=True, metavar="KEY=VALUE",
        help=f"Any configuration key, e.g. --set {example} (repeatable).",
    )  # fmt: skip


def with_settings(overrides: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    """``overrides`` plus each ``--set KEY=VALUE`` (the value read as TOML when it parses)."""
    out = dict(overrides)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {setting!r} is not KEY=VALUE, e.g. --set log.level=debug")
        out[key.strip()] = parse_value(value)
    return out


def pick_source(config_path: Path | None, source: str | None) -> str:
    """``--source``, or the only source of the configuration file."""
    if source:
        return source
    if config_path is not None:
        names = list(load_config(config_path, os.environ).sources)
        if len(names) == 1:
            return names[0]
        raise ConfigError(
            f"the configuration has {len(names)} sources ({', '.join(names) or 'none'}); "
            "choose one with --source NAME"
        )
    raise ConfigError("--source NAME is required (with --dsn, or a configuration file)")


nats_option = click.option("--nats", help="NATS server URL(s), comma-separated.")


def ops_options(metrics_example: str) -> Callable[[FC], FC]:
    """``--metrics-listen``, ``--log-level`` and ``--log-format``."""
    options = (
        click.option(
            "--metrics-listen",
            help=f'HOST:PORT for /metrics and /healthz, e.g. "{metrics_example}".',
        ),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"])),
        click.option("--log-format", type=click.Choice(["json", "text"])),
    )

    def apply(command: FC) -> FC:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def service_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The configuration keys of ``--nats`` and ``ops_options``."""
    return {
        "nats.url": flags["nats"],
        "metrics.listen": flags["metrics_listen"],
        "log.level": flags["log_level"],
        "log.format": flags["log_format"],
    }


def run_service(
    config: Config, serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    """Logs as configured, then ``serve(stop)``, where SIGINT/SIGTERM set ``stop``."""
    setup_logging(config.log.level, config.log.format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())
