"""``pgcapture status``: one look at every part of a deployment, as tables or one JSON object.

The parts are collected by ``pgcapture.ops.status.collect``; this module only finds the
controller (as ``pgcapture dump`` does), prints, and sets the exit status: 0 when every part is
reachable and healthy, 1 otherwise, 2 for a configuration error (raised as ``ConfigError``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

import click
from rich.console import Console
from rich.table import Table

from pgcapture.checkpoint import Checkpoint
from pgcapture.cli import dump_view as view
from pgcapture.cli.dump_client import Controller, dial_address
from pgcapture.cli.options import config_option, set_option, with_settings
from pgcapture.config import Config, load_config
from pgcapture.lsn import LSN
from pgcapture.ops.status import (
    OK,
    UNHEALTHY,
    UNREACHABLE,
    Report,
    SlotStatus,
    StreamStatus,
    collect,
)
from pgcapture.proto import pb

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")
_NONE: Final = "-"
_STATES: Final = (OK, UNHEALTHY, UNREACHABLE)  # from best to worst


@dataclass(frozen=True)
class ControllerDumps:
    """The unfinished dumps of the controller at ``address``, through ``dump``'s client."""

    address: str
    timeout: float

    async def unfinished(self) -> list[pb.DumpStatus]:
        async with Controller(self.address, self.timeout) as controller:
            return await controller.list(pb.ListDumpsRequest())


def controller_address(config: Config, given: str | None) -> str | None:
    """``--controller``, else ``gateway.controller``, else ``controller.listen`` when a
    [controller] section is set; None: no controller is configured."""
    if given:
        return given
    if config.gateway.controller:
        return config.gateway.controller
    if "controller" in config.model_fields_set:
        return dial_address(config.controller.listen)
    return None


@click.command()
@config_option
@set_option("nats.url=nats://nats:4222")
@click.option(
    "--source", "sources", multiple=True, metavar="NAME",
    help="Only this source, its URIs and their dumps (repeatable; default: every source).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object (keys below).")
@click.option(
    "--controller", metavar="HOST:PORT",
    help="The controller's address (default: gateway.controller, else controller.listen).",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
    help="Seconds each part (a database, NATS, the controller) may take to answer.",
)  # fmt: skip
def status(
    config_path: Path | None,
    settings: tuple[str, ...],
    sources: tuple[str, ...],
    as_json: bool,
    controller: str | None,
    timeout: float,
) -> None:
    """Show every part of the deployment: slots, streams, URIs, replicas and dumps.

    For each source (or each --source): its replication slot (read-only catalog queries on
    the source, never a user table), its JetStream stream, the durable consumer of each of its
    URIs, and its replica's position when [sources.NAME.replica] dsn is set; then the
    unfinished dumps of the controller (--controller, else gateway.controller, else
    controller.listen when a [controller] section is set). A part that cannot be reached is
    shown as unreachable with the reason, and the others are still shown.

    Lag: a slot's in bytes, pg_current_wal_lsn() - confirmed_flush_lsn. WAL carries no clock,
    so no time lag is made up for a slot; the stream shows the source commit time of the
    newest transaction it stores and its age, the most capture can be behind while the slot
    lags (on an idle source, simply the time since the last write). A replica's lag is in
    bytes of WAL and in source time behind the stream's last checkpoint.

    Exit status: 0 when every part is reachable and healthy; 1 when one is unreachable or
    unhealthy (a missing slot or stream, an inactive slot more than metrics.slot_lag_warn
    behind, a slot whose WAL is unreserved or lost, a replica without a position; a consumer
    not created yet is fine, the gateway creates it on first use); 2 for a configuration error.

    \b
    --json prints one object; every key is always present, null when not known:
      healthy, collected_at,
      sources[]: name,
        slot: name state reason exists active active_pid confirmed_flush_lsn
              current_wal_lsn lag_bytes wal_status safe_wal_size
        stream: name state reason exists messages bytes first_seq last_seq
                last_checkpoint {lsn, seq} last_commit_time last_commit_age_seconds
      uris[]: uri source stream consumer state reason exists num_pending
              num_ack_pending num_redelivered ack_floor_seq delivered_seq
      replicas[]: source state reason lsn stream_seq origin commit_time apply_time
                  lag_bytes lag_seconds
      dumps: controller state reason dumps[] (objects as `pgcapture dump status --json`)

    state is "ok", "unhealthy" or "unreachable" and reason says why (or notes something, such
    as a consumer not created yet); LSNs are "X/Y" strings, times ISO 8601, sizes bytes.

    \b
    Examples:
      pgcapture status --config pgcapture.toml
      pgcapture status --source app --json --timeout 2
    """
    config = load_config(config_path, os.environ, with_settings({}, settings))
    for name in sources:
        config.source(name, need_dsn=False)  # an unknown name is a configuration error
    names = list(dict.fromkeys(sources)) or list(config.sources)
    address = controller_address(config, controller)
    dumps = ControllerDumps(address, timeout) if address else None
    report = asyncio.run(collect(config, names, timeout, dumps))
    if as_json:
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report)
    if not report.healthy:
        sys.exit(1)


def report_json(report: Report) -> dict[str, Any]:
    """The report as ``--json`` prints it (the keys the command's help lists)."""
    body: dict[str, Any] = _plain(report)
    return {"healthy": report.healthy, **body}


def _plain(value: Any) -> Any:
    if isinstance(value, LSN):
        return str(value)
    if isinstance(value, Checkpoint):
        return {"lsn": value.lsn_text, "seq": value.seq}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, pb.DumpStatus):
        return view.status_json(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def print_report(report: Report) -> None:
    """One table per section on stdout, each followed by the reasons of its parts; plain text,
    wide enough not to wrap, when not a TTY."""
    console = Console(soft_wrap=True, markup=False)  # reasons name [sections] of the config
    tty = sys.stdout.isatty()
    if not tty:
        console.width = max(console.width, 240)
    with console.capture() as captured:
        for section in (_sources(report), _uris(report), _replicas(report), _dumps(report)):
            for renderable in section:
                console.print(renderable)
            console.print()
        console.print(_summary(report))
    text = captured.get()
    if not tty:  # rich pads every cell and title to the table's width
        text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    sys.stdout.write(text)


def _summary(report: Report) -> str:
    bad = [f"{what} ({state})" for what, state, _ in report.parts() if state != OK]
    return "not healthy: " + ", ".join(bad) if bad else "everything reachable and healthy"


class _Part(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def reason(self) -> str | None: ...


Row = tuple[Sequence[str], Sequence[tuple[str, _Part]]]  # cells, (label, part) for STATE


def _section(title: str, columns: Sequence[str], rows: Iterable[Row]) -> list[Table | str]:
    """A table of ``rows`` under ``title`` with a STATE column (the worst state of the row's
    parts), then one line per part with a reason; one line when there are no rows."""
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.header_style = "bold"
    for name in (*columns, "STATE"):
        table.add_column(name, overflow="fold")
    notes: list[str] = []
    for cells, parts in rows:
        table.add_row(*cells, max((p.state for _, p in parts), key=_STATES.index))
        notes.extend(
            f"  {label}: {p.reason if p.state == OK else f'{p.state}: {p.reason}'}"
            for label, p in parts
            if p.reason
        )
    return [table, *notes] if table.row_count else [f"{title}: none configured"]


def _sources(report: Report) -> list[Table | str]:
    columns = (
        "SOURCE", "SLOT", "ACTIVE", "CONFIRMED", "LAG", "WAL", "STREAM", "MESSAGES", "SIZE",
        "SEQ", "LAST CHECKPOINT", "LAST COMMIT",
    )  # fmt: skip
    rows: Iterable[Row] = (
        (
            (s.name, *_slot_cells(s.slot), *_stream_cells(s.stream)),
            ((f"{s.name} slot", s.slot), (f"{s.name} stream", s.stream)),
        )
        for s in report.sources
    )
    return _section("sources", columns, rows)


def _slot_cells(slot: SlotStatus) -> tuple[str, ...]:
    return (
        slot.name, _active(slot.active, slot.active_pid), _text(slot.confirmed_flush_lsn),
        _size(slot.lag_bytes), _wal(slot.wal_status, slot.safe_wal_size),
    )  # fmt: skip


def _stream_cells(stream: StreamStatus) -> tuple[str, ...]:
    return (
        stream.name, _count(stream.messages), _size(stream.bytes),
        _seqs(stream.first_seq, stream.last_seq), _text(stream.last_checkpoint),
        _ago(stream.last_commit_age_seconds),
    )  # fmt: skip


def _uris(report: Report) -> list[Table | str]:
    columns = (
        "URI", "SOURCE", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED", "ACK FLOOR",
        "DELIVERED",
    )  # fmt: skip
    rows: Iterable[Row] = (
        (
            (
                u.uri, u.source, u.consumer if u.exists is not False else f"{u.consumer} (none)",
                _count(u.num_pending), _count(u.num_ack_pending), _count(u.num_redelivered),
                _count(u.ack_floor_seq), _count(u.delivered_seq),
            ),
            ((u.uri, u),),
        )
        for u in report.uris
    )  # fmt: skip
    return _section("uris", columns, rows)


def _replicas(report: Report) -> list[Table | str]:
    columns = ("SOURCE", "APPLIED", "LAG", "LAG TIME", "LAST COMMIT", "APPLIED AT")
    now = report.collected_at
    rows: Iterable[Row] = (
        (
            (
                r.source, _text(r.lsn), _size(r.lag_bytes), _span(r.lag_seconds),
                _text(r.commit_time and r.commit_time.isoformat(timespec="seconds")),
                _ago((now - r.apply_time).total_seconds() if r.apply_time else None),
            ),
            ((f"replica of {r.source}", r),),
        )
        for r in report.replicas
    )  # fmt: skip
    return _section("replicas", columns, rows)


def _dumps(report: Report) -> list[Table | str]:
    dumps = report.dumps
    if dumps.controller is None:
        return [
            "dumps: no controller configured (--controller, gateway.controller or [controller])"
        ]
    if dumps.state != OK:
        return [f"dumps: the controller at {dumps.controller} is {dumps.state}: {dumps.reason}"]
    if not dumps.dumps:
        return [f"dumps: none in progress (controller {dumps.controller})"]
    table = view.status_table(dumps.dumps, report.collected_at)
    table.title, table.title_justify = f"dumps (controller {dumps.controller})", "left"
    return [table]


def _text(value: object) -> str:
    return _NONE if value is None else str(value)


def _count(value: int | None) -> str:
    return _NONE if value is None else f"{value:,}"


def _size(value: int | None) -> str:
    if value is None:
        return _NONE
    size, unit = float(value), 0
    while abs(size) >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{value} B" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def _span(seconds: float | None) -> str:
    return _NONE if seconds is None else view.span(seconds)


def _ago(seconds: float | None) -> str:
    return _NONE if seconds is None else f"{view.span(seconds)} ago"


def _active(active: bool | None, pid: int | None) -> str:
    if active is None:
        return _NONE
    return f"yes (pid {pid})" if active else "no"


def _wal(status: str | None, safe: int | None) -> str:
    if status is None:
        return _NONE
    return status if safe is None else f"{status} ({_size(safe)} left)"


def _seqs(first: int | None, last: int | None) -> str:
    return _NONE if first is None or last is None else f"{first}..{last}"
