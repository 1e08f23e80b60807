"""``pgcapture dump``: schedule on-demand dumps of tables and show, follow, pause, resume or stop
them, as a client of ``pgcapture controller`` (docs/dumps.md).

Arguments are checked here before anything is sent (``--key`` must be JSON objects of one
table's key columns); what only the controller can judge (tables, URIs, states) it refuses with
a message naming the fix, which ``dump_client.run`` prints as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

import click

from pgcapture.cli import dump_view as view
from pgcapture.cli.dump_client import Controller, ControllerError, Endpoint, follow_dumps, run
from pgcapture.cli.options import config_option, set_option
from pgcapture.config import parse_duration
from pgcapture.proto import pb

_KEY_EXAMPLE: Final = """--key '{"id": 42}'"""
_JSON_KINDS: Final[dict[type, str]] = {
    list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
    type(None): "null",
}  # fmt: skip
_ENDPOINT_OPTIONS: Final = (
    click.option(
        "--controller", metavar="HOST:PORT",
        help="The controller's address (default: gateway.controller of the configuration, "
        "else controller.listen).",
    ),
    click.option(
        "--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
        show_default=True, help="Seconds each call to the controller may take.",
    ),
    config_option,
    set_option("controller.listen=127.0.0.1:10002"),
)  # fmt: skip
_watch_option = click.option(
    "--watch", is_flag=True, help="Follow the progress until the dumps end (Ctrl-C stops watching)."
)


def _controller_options(command: Callable[..., None]) -> Callable[..., None]:
    """The shared options, handed to ``command`` as one ``endpoint``; put it right above the
    function, below the command's own options."""

    @functools.wraps(command)
    def with_endpoint(
        controller: str | None, timeout: float, config_path: Any, settings: Any, **kwargs: Any
    ) -> None:
        command(endpoint=Endpoint(controller, config_path, settings, timeout), **kwargs)

    for option in reversed(_ENDPOINT_OPTIONS):
        with_endpoint = option(with_endpoint)
    return with_endpoint


def _cool_down(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds: float = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return seconds


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _key_object(raw: str) -> str:
    """``raw`` once it is known to be a non-empty JSON object."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        problem = (
            f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
        )
        raise click.BadParameter(
            f"{raw!r} is not JSON ({problem}); write an object of the table's key columns, "
            f"e.g. {_KEY_EXAMPLE}",
            param_hint="--key",
        ) from None
    if not isinstance(value, dict) or not value:
        kind = "an empty object" if isinstance(value, dict) else _JSON_KINDS[type(value)]
        raise click.BadParameter(
            f"{raw!r} is {kind}, not an object of the table's key columns; write e.g. "
            f"{_KEY_EXAMPLE}",
            param_hint="--key",
        )
    return raw


def checked_keys(keys: Sequence[str], tables: Sequence[str]) -> list[str]:
    """The ``--key`` values, each a JSON object; keys select rows of exactly one ``--table``."""
    if keys and len(tables) != 1:
        raise click.UsageError(
            f"--key selects rows of one table, but {len(tables)} --table options were given; "
            "give exactly one --table with --key"
        )
    return [_key_object(raw) for raw in keys]


def schedule_request(
    uri: str,
    tables: Sequence[str],
    keys: Sequence[str],
    chunk_pages: int | None,
    cool_down: float | None,
) -> pb.ScheduleDumpRequest:
    request = pb.ScheduleDumpRequest(
        uri=uri, tables=tables, keys=checked_keys(keys, tables), chunk_pages=chunk_pages or 0
    )
    if cool_down is not None:
        request.cool_down.FromNanoseconds(math.floor(cool_down * 1e9))
    return request


@click.group()
def dump() -> None:
    """Schedule dumps of tables to a URI's consumers and follow, pause, resume or stop them.

    A client of `pgcapture controller`: it is found at --controller, else gateway.controller,
    else controller.listen of the configuration (--config or $PGCAPTURE_CONFIG).

    \b
    Examples:
      pgcapture dump schedule --uri orders --table public.orders --watch
      pgcapture dump status --all
      pgcapture dump pause --uri orders 5f1c2a
      pgcapture dump resume --uri orders 5f1c2a
      pgcapture dump stop --uri orders 5f1c2a --controller 10.0.0.5:10002
    """


@dump.command()
@click.option("--uri", required=True, help="The consumer URI the dumped rows are delivered to.")
@click.option(
    "--table", "tables", multiple=True, metavar="SCHEMA.TABLE",
    help="A table to dump (repeatable; default: every table of the replica).",
)  # fmt: skip
@click.option(
    "--key", "keys", multiple=True, metavar="JSON",
    help='Only the row with this key, a JSON object such as \'{"id": 42}\' (repeatable; needs '
    "exactly one --table).",
)  # fmt: skip
@click.option(
    "--chunk-pages", type=click.IntRange(1, 2**32 - 1),
    help="Heap pages per chunk (default: the controller's setting).",
)  # fmt: skip
@click.option(
    "--cool-down", metavar="DURATION", callback=_cool_down,
    help='Pause between two chunks handed to one client, e.g. "500ms", "2s".',
)  # fmt: skip
@_watch_option
@_controller_options
def schedule(
    endpoint: Endpoint,
    uri: str,
    tables: tuple[str, ...],
    keys: tuple[str, ...],
    chunk_pages: int | None,
    cool_down: float | None,
    watch: bool,
) -> None:
    """Schedule a dump of tables to a URI.

    Prints the dump's id, its tables, chunks and estimated rows; --watch then follows it.

    \b
    Examples:
      pgcapture dump schedule --uri orders --table public.orders --watch
      pgcapture dump schedule --uri orders --table public.orders --key '{"id": 42}'
      pgcapture dump schedule --uri orders --chunk-pages 1024 --cool-down 500ms
      pgcapture dump schedule --uri orders --table public.orders --table public.items \\
          --controller 10.0.0.5:10002 --timeout 30
    """
    request = schedule_request(uri, tables, keys, chunk_pages, cool_down)

    async def work(controller: Controller) -> int:
        status = await controller.schedule(request)
        click.echo(view.summary(status))
        if not watch:
            return 0
        return await follow_dumps(
            controller, pb.ListDumpsRequest(uri=status.uri, id=status.id), [status]
        )

    run(endpoint, work)


@dump.command()
@click.argument("dump_id", metavar="[ID]", required=False)
@click.option("--uri", help="Only the dumps of this URI.")
@click.option("--all", "everything", is_flag=True, help="Finished dumps too (done, stopped).")
@_watch_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dump and line.")
@_controller_options
def status(
    endpoint: Endpoint,
    dump_id: str | None,
    uri: str | None,
    everything: bool,
    watch: bool,
    as_json: bool,
) -> None:
    """Show dumps and their progress.

    Lists the unfinished dumps, every dump with --all, or the dump ID.

    \b
    Examples:
      pgcapture dump status
      pgcapture dump status --uri orders --all --json
      pgcapture dump status 5f1c2a --watch
      pgcapture dump status --config pgcapture.toml --uri orders
    """
    if watch and as_json:
        raise click.UsageError("--watch and --json do not combine; poll with --json instead")
    request = pb.ListDumpsRequest(
        uri=uri or "", id=dump_id or "", include_finished=everything or dump_id is not None
    )

    async def work(controller: Controller) -> int:
        statuses = await controller.list(request)
        if dump_id and not statuses:
            raise ControllerError(
                f"the controller has no dump {dump_id!r}{f' on uri {uri!r}' if uri else ''}; "
                "`pgcapture dump status --all` lists every dump"
            )
        if watch and statuses:
            return await follow_dumps(controller, request, statuses)
        _print_statuses(statuses, as_json, everything)
        return 0

    run(endpoint, work)


def _print_statuses(statuses: Sequence[pb.DumpStatus], as_json: bool, everything: bool) -> None:
    if as_json:
        for s in statuses:
            click.echo(json.dumps(view.status_json(s), separators=(",", ":")))
    elif not statuses:
        click.echo("no dumps" if everything else "no unfinished dumps (--all shows finished ones)")
    else:
        view.print_table(statuses, datetime.now(UTC))


def _action(name: str, method: str, summary: str) -> click.Command:
    """``pause``, ``resume`` or ``stop``: call ``method`` and print the dump's new state."""

    @click.command(
        name,
        help=f"{summary}\n\n\b\nExamples:\n  pgcapture dump {name} --uri orders 5f1c2a\n"
        f"  pgcapture dump {name} --uri orders 5f1c2a --controller 10.0.0.5:10002",
    )
    @click.argument("dump_id", metavar="ID")
    @click.option("--uri", required=True, help="The URI the dump was scheduled for.")
    @_controller_options
    def command(endpoint: Endpoint, dump_id: str, uri: str) -> None:
        async def work(controller: Controller) -> int:
            s = await controller.act(method, pb.DumpRef(uri=uri, id=dump_id))
            done = f"{s.chunks_done}/{s.chunks_total} chunks done"
            click.echo(f"dump {s.id} on uri {s.uri}: {s.state} ({done})")
            return 0

        run(endpoint, work)

    return command


dump.add_command(
    _action(
        "pause", "PauseDump", "Pause a dump: no further chunks are handed out until it is resumed."
    )
)
dump.add_command(_action("resume", "ResumeDump", "Resume a paused dump."))
dump.add_command(
    _action("stop", "StopDump", "Stop a dump: it hands out no further chunks and ends as stopped.")
)
