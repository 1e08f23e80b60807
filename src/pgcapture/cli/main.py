"""The ``pgcapture`` command: one subcommand per module in this package.

Each subcommand parses its options, builds the library objects and calls their ``run``; errors
of pgcapture's own tree end the process with one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

import click

from pgcapture import __version__
from pgcapture.cli.bootstrap import bootstrap
from pgcapture.cli.capture import capture
from pgcapture.cli.controller import controller
from pgcapture.cli.dump import dump
from pgcapture.cli.dumper import dumper
from pgcapture.cli.gateway import gateway
from pgcapture.cli.offlinedb import offlinedb
from pgcapture.cli.quickstart import quickstart
from pgcapture.cli.replicate import replicate
from pgcapture.cli.status import status
from pgcapture.cli.tail import tail
from pgcapture.cli.version import version
from pgcapture.errors import PgCaptureError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgcapture")
def cli() -> None:
    """Change data capture for PostgreSQL: ordered, durable, DDL-aware."""


cli.add_command(tail)
cli.add_command(quickstart)
cli.add_command(capture)
cli.add_command(bootstrap)
cli.add_command(replicate)
cli.add_command(gateway)
cli.add_command(controller)
cli.add_command(dump)
cli.add_command(dumper)
cli.add_command(offlinedb)
cli.add_command(status)
cli.add_command(version)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PgCaptureError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
