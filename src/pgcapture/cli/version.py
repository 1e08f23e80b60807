"""``pgcapture version``: the versions a bug report needs, one per line, or as one JSON object.

The package, the protobuf package of the wire schema its gRPC services speak (``pgcapture``, the
Go project's), Python, psycopg with the implementation it loaded and the libpq it runs on,
grpcio, nats-py and protobuf. ``pgcapture --version`` still prints the package version alone.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata

import click
from psycopg import pq

from pgcapture import __version__
from pgcapture.proto import pb


def libpq_version(number: int) -> str:
    """libpq's version number as PostgreSQL writes it: 180006 -> "18.6", 90624 -> "9.6.24"."""
    if number >= 100000:
        return f"{number // 10000}.{number % 10000}"
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def versions() -> dict[str, str]:
    """The versions, keyed as in ``--json``."""
    return {
        "pgcapture": __version__,
        "wire_schema": pb.DESCRIPTOR.package,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "psycopg": metadata.version("psycopg"),
        "psycopg_implementation": pq.__impl__,
        "libpq": libpq_version(pq.version()),
        "grpcio": metadata.version("grpcio"),
        "nats-py": metadata.version("nats-py"),
        "protobuf": metadata.version("protobuf"),
    }


def version_lines(v: dict[str, str]) -> list[str]:
    """One line per component, the name then its version."""
    rows = [
        ("pgcapture", v["pgcapture"]),
        ("wire schema", f"package {v['wire_schema']}"),
        ("python", f"{v['python']} ({v['python_implementation']})"),
        ("psycopg", f"{v['psycopg']} ({v['psycopg_implementation']})"),
        ("libpq", v["libpq"]),
        ("grpcio", v["grpcio"]),
        ("nats-py", v["nats-py"]),
        ("protobuf", v["protobuf"]),
    ]
    width = max(len(name) for name, _ in rows) + 2
    return [f"{name:<{width}}{value}" for name, value in rows]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
def version(as_json: bool) -> None:
    """Print the versions of pgcapture, its wire schema and the libraries it runs on.

    \b
    Examples:
      pgcapture version
      pgcapture version --json
      pgcapture --version
    """
    found = versions()
    if as_json:
        click.echo(json.dumps(found, separators=(",", ":")))
    else:
        click.echo("\n".join(version_lines(found)))
