"""What the service subcommands share: the configuration file, ``--set`` and the source name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pgcapture.config import load_config, parse_value
from pgcapture.errors import ConfigError

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
