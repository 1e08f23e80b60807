"""``pgcapture dump`` against an in-process fake DBLogController: the requests it sends, what it
prints, ``--watch`` following progress, and how refusals and an absent controller end."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from pgcapture.cli import dump_view
from pgcapture.cli.dump_client import Endpoint, dial_address
from pgcapture.cli.main import cli
from pgcapture.proto import pb, pb_grpc

ENDED = ("done", "stopped")


@dataclass
class FakeController(pb_grpc.DBLogControllerServicer):
    """Keeps dumps in memory. With ``advance`` each ListDumps moves running dumps on by one chunk
    (1,000 rows); after ``stop_after`` polls they are stopped, after ``fail_after`` ListDumps
    fails, after ``forget_after`` the dumps are gone."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    dumps: dict[str, pb.DumpStatus] = field(default_factory=dict)
    advance: bool = False
    stop_after: int | None = None
    fail_after: int | None = None
    forget_after: int | None = None

    def reset(self) -> None:
        self.calls.clear()
        self.dumps.clear()
        self.advance = False
        self.stop_after = self.fail_after = self.forget_after = None

    def add(self, id: str, uri: str = "orders", **fields: Any) -> pb.DumpStatus:
        status = pb.DumpStatus(id=id, uri=uri, **{"state": "running", "chunks_total": 4, **fields})
        status.created.FromDatetime(datetime.now(UTC) - timedelta(seconds=125))
        if status.state in ENDED:
            status.finished.GetCurrentTime()
        self.dumps[id] = status
        return status

    async def ScheduleDump(self, request: pb.ScheduleDumpRequest, context: Any) -> pb.DumpStatus:
        self.calls.append(("ScheduleDump", request))
        if "public.missing" in request.tables:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "table public.missing is not on the replica of uri orders; list them with \\dt",
            )
        tables = list(request.tables) or ["public.orders", "public.users"]
        return self.add(f"d{len(self.dumps) + 1}", request.uri, tables=tables, rows_estimate=4000)

    async def ListDumps(self, request: pb.ListDumpsRequest, context: Any) -> pb.ListDumpsResponse:
        self.calls.append(("ListDumps", request))
        polls = sum(name == "ListDumps" for name, _ in self.calls)
        if self.fail_after is not None and polls > self.fail_after:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller is shutting down")
        if self.forget_after is not None and polls > self.forget_after:
            self.dumps.clear()
        for status in self.dumps.values():
            self._move(status, polls)
        return pb.ListDumpsResponse(
            dumps=[
                s
                for s in self.dumps.values()
                if request.uri in ("", s.uri)
                and request.id in ("", s.id)
                and (request.include_finished or s.state not in ENDED)
            ]
        )

    def _move(self, status: pb.DumpStatus, polls: int) -> None:
        if status.state != "running":
            return
        if self.stop_after is not None and polls > self.stop_after:
            status.state = "stopped"
            status.finished.GetCurrentTime()
        elif self.advance and polls > 1:
            status.chunks_done += 1
            status.rows += 1000
            if status.chunks_done == status.chunks_total:
                status.state = "done"
                status.finished.GetCurrentTime()

    async def PauseDump(self, request: pb.DumpRef, context: Any) -> pb.DumpStatus:
        return await self._act("PauseDump", request, context, "paused")

    async def ResumeDump(self, request: pb.DumpRef, context: Any) -> pb.DumpStatus:
        return await self._act("ResumeDump", request, context, "running")

    async def StopDump(self, request: pb.DumpRef, context: Any) -> pb.DumpStatus:
        return await self._act("StopDump", request, context, "stopped")

    async def _act(self, name: str, ref: pb.DumpRef, context: Any, state: str) -> pb.DumpStatus:
        self.calls.append((name, ref))
        status = self.dumps.get(ref.id)
        if status is None or status.uri != ref.uri:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no dump {ref.id} on uri {ref.uri}")
        assert status is not None
        if status.state in ENDED:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"dump {ref.id} is {status.state}; schedule a new dump instead",
            )
        status.state = state
        return status


@dataclass
class Served:
    fake: FakeController
    address: str


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """The fake on a free port, served by its own event loop in a thread: the commands under
    test run ``asyncio.run`` themselves."""
    served = Served(FakeController(), "")
    started = threading.Event()
    loop_box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_DBLogControllerServicer_to_server(served.fake, server)
        served.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        loop_box.append((asyncio.get_running_loop(), asyncio.Event()))
        started.set()
        await loop_box[0][1].wait()
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield served
    loop, stop = loop_box[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


@pytest.fixture
def fake(served: Served) -> FakeController:
    served.fake.reset()
    return served.fake


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PGCAPTURE_* variable of the surrounding shell reaches the configuration."""
    for name in list(os.environ):
        if name.startswith("PGCAPTURE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def address(served: Served) -> str:
    return served.address


@pytest.fixture
def fast_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dump_view, "POLL_INTERVAL", 0.02)
    monkeypatch.setattr(dump_view, "PLAIN_EVERY", 0.0)


def dump(address: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["dump", *args, "--controller", address, "--timeout", "5"])


def sent(fake: FakeController, name: str) -> list[Any]:
    return [request for method, request in fake.calls if method == name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- schedule -----------------------------------------------------------------------------------


def test_schedule_sends_tables_keys_chunk_pages_and_cool_down(
    fake: FakeController, address: str
) -> None:
    result = dump(
        address, "schedule", "--uri", "orders", "--table", "public.orders",
        "--key", '{"id": 42}', "--key", '{"id": 43}', "--chunk-pages", "128",
        "--cool-down", "500ms",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = sent(fake, "ScheduleDump")
    assert request.uri == "orders"
    assert list(request.tables) == ["public.orders"]
    assert [json.loads(k) for k in request.keys] == [{"id": 42}, {"id": 43}]
    assert request.chunk_pages == 128
    assert request.cool_down.ToMilliseconds() == 500
    assert "scheduled dump d1 on uri orders (running)" in result.output
    assert "tables: public.orders\n" in result.output
    assert "chunks: 4\n" in result.output
    assert "rows:   ~4,000 (estimate)\n" in result.output


def test_schedule_without_tables_asks_for_every_table(fake: FakeController, address: str) -> None:
    result = dump(address, "schedule", "--uri", "orders")
    assert result.exit_code == 0, result.output
    (request,) = sent(fake, "ScheduleDump")
    assert list(request.tables) == []
    assert list(request.keys) == []
    assert request.chunk_pages == 0
    assert not request.HasField("cool_down")
    assert "tables: public.orders, public.users\n" in result.output


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ('{"id": 4', "is not JSON (Expecting ',' delimiter at column 9)"),
        ("[42]", "is an array, not an object"),
        ("42", "is a number, not an object"),
        ("{}", "is an empty object, not an object"),
        ('{"id": NaN}', "is not JSON (NaN is not a JSON value)"),
        ("null", "is null, not an object"),
    ],
)
def test_a_key_that_is_not_a_json_object_is_refused_before_any_call(
    fake: FakeController, address: str, key: str, problem: str
) -> None:
    result = dump(address, "schedule", "--uri", "orders", "--table", "public.t", "--key", key)
    assert result.exit_code == 2
    assert problem in result.output
    assert """--key '{"id": 42}'""" in result.output
    assert fake.calls == []


@pytest.mark.parametrize("tables", [[], ["public.a", "public.b"]])
def test_keys_need_exactly_one_table(fake: FakeController, address: str, tables: list[str]) -> None:
    table_args = [arg for table in tables for arg in ("--table", table)]
    result = dump(address, "schedule", "--uri", "orders", *table_args, "--key", '{"id": 1}')
    assert result.exit_code == 2
    assert f"{len(tables)} --table options were given; give exactly one --table" in result.output
    assert fake.calls == []


def test_a_refusal_of_the_controller_is_one_error_line_and_exit_2(
    fake: FakeController, address: str
) -> None:
    result = dump(address, "schedule", "--uri", "orders", "--table", "public.missing")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "error: table public.missing is not on the replica of uri orders; list them with \\dt\n"
    )


def test_an_unreachable_controller_is_named_with_how_to_start_it(fake: FakeController) -> None:
    port = free_port()
    result = dump(f"127.0.0.1:{port}", "status")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot reach the controller at 127.0.0.1:{port} (")
    assert "start it with `pgcapture controller`" in result.stderr
    assert result.stderr.count("\n") == 1


# -- status -------------------------------------------------------------------------------------


def test_status_prints_a_table_of_the_unfinished_dumps(fake: FakeController, address: str) -> None:
    fake.add(
        "d7", tables=["public.orders"], chunks_done=1, chunks_running=1, rows=1000,
        rows_estimate=4000, retries=3, last_error="dumper at 10.0.0.5:10003 is unreachable",
    )  # fmt: skip
    fake.add("d8", uri="users", state="done", chunks_done=4, rows=10)
    result = dump(address, "status")
    assert result.exit_code == 0, result.output
    (request,) = sent(fake, "ListDumps")
    assert (request.uri, request.id, request.include_finished) == ("", "", False)
    header, row = result.output.splitlines()
    assert header.split()[:4] == ["ID", "URI", "STATE", "TABLES"]
    for cell in ("d7", "orders", "running", "public.orders", "1/4 (1 running)", "1,000 / ~4,000"):
        assert cell in row
    assert "dumper at 10.0.0.5:10003 is unreachable" in row
    assert row.split()[-1] == "2m05s"


def test_status_with_all_or_an_id_includes_finished_dumps(
    fake: FakeController, address: str
) -> None:
    fake.add("d8", uri="users", state="done", chunks_done=4)
    assert "d8" in dump(address, "status", "--all", "--uri", "users").output
    by_id = dump(address, "status", "d8")
    assert by_id.exit_code == 0
    assert "done" in by_id.output
    requests = sent(fake, "ListDumps")
    assert [(r.uri, r.id, r.include_finished) for r in requests] == [
        ("users", "", True),
        ("", "d8", True),
    ]


def test_status_of_an_unknown_id_is_an_error(fake: FakeController, address: str) -> None:
    result = dump(address, "status", "nope", "--uri", "orders")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: the controller has no dump 'nope' on uri 'orders'; "
        "`pgcapture dump status --all` lists every dump\n"
    )


def test_status_without_dumps_says_so(fake: FakeController, address: str) -> None:
    result = dump(address, "status")
    assert result.exit_code == 0
    assert result.output == "no unfinished dumps (--all shows finished ones)\n"


def test_status_json_is_one_object_per_dump_with_stable_keys(
    fake: FakeController, address: str
) -> None:
    fake.add("d1", tables=["public.a"], rows=5, rows_estimate=10, chunks_done=2)
    fake.add("d2", uri="users", state="stopped", last_error="boom")
    result = dump(address, "status", "--all", "--json")
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.output.splitlines()]
    assert [o["id"] for o in objects] == ["d1", "d2"]
    assert list(objects[0]) == [
        "id", "uri", "state", "tables", "chunks_total", "chunks_done", "chunks_running", "rows",
        "rows_estimate", "retries", "last_error", "created", "updated", "finished",
    ]  # fmt: skip
    first, second = objects
    assert first["tables"] == ["public.a"]
    assert (first["rows"], first["rows_estimate"], first["chunks_done"]) == (5, 10, 2)
    assert first["updated"] is None
    assert first["finished"] is None
    assert datetime.fromisoformat(first["created"]).tzinfo is not None
    assert (second["state"], second["last_error"]) == ("stopped", "boom")
    assert second["finished"] is not None


def test_watch_and_json_do_not_combine(fake: FakeController, address: str) -> None:
    result = dump(address, "status", "--watch", "--json")
    assert result.exit_code == 2
    assert "--watch and --json do not combine" in result.output
    assert fake.calls == []


# -- pause, resume, stop ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "method", "state"),
    [("pause", "PauseDump", "paused"), ("resume", "ResumeDump", "running"),
     ("stop", "StopDump", "stopped")],
)  # fmt: skip
def test_pause_resume_and_stop_call_their_method_and_print_the_new_state(
    fake: FakeController, address: str, command: str, method: str, state: str
) -> None:
    fake.add("d3", chunks_done=1)
    result = dump(address, command, "--uri", "orders", "d3")
    assert result.exit_code == 0, result.output
    assert [(r.uri, r.id) for r in sent(fake, method)] == [("orders", "d3")]
    assert result.output == f"dump d3 on uri orders: {state} (1/4 chunks done)\n"


def test_pausing_a_finished_dump_prints_the_controllers_reason(
    fake: FakeController, address: str
) -> None:
    fake.add("d4", state="done")
    result = dump(address, "pause", "--uri", "orders", "d4")
    assert result.exit_code == 2
    assert result.stderr == "error: dump d4 is done; schedule a new dump instead\n"


# -- watching -----------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("fast_watch")
def test_schedule_watch_follows_the_dump_until_it_is_done(
    fake: FakeController, address: str
) -> None:
    fake.advance = True
    result = dump(address, "schedule", "--uri", "orders", "--table", "public.t", "--watch")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("dump d1 ")]
    assert lines[0].startswith("dump d1 orders public.t: running 0%, 0/4,000 rows, chunks 0/4,")
    assert "running 50%, 2,000/4,000 rows, chunks 2/4, " in result.output
    assert lines[-1] == (
        "dump d1 orders public.t: done 100%, 4,000/4,000 rows, chunks 4/4, - rows/s, eta -"
    )
    assert {(r.uri, r.id, r.include_finished) for r in sent(fake, "ListDumps")} == {
        ("orders", "d1", True)
    }


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("fast_watch")
def test_status_watch_ends_when_the_dumps_are_stopped(fake: FakeController, address: str) -> None:
    fake.add("d1")
    fake.add("d2", uri="users")
    fake.stop_after = 3
    result = dump(address, "status", "--watch")
    assert result.exit_code == 0, result.output
    assert "dump d1 orders every table: stopped" in result.output
    assert "dump d2 users every table: stopped" in result.output


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("fast_watch")
def test_watch_ends_with_exit_2_when_the_controller_fails(
    fake: FakeController, address: str
) -> None:
    fake.add("d1")
    fake.fail_after = 3
    result = dump(address, "status", "--watch")
    assert result.exit_code == 2
    assert "dump d1 orders every table: running" in result.stdout
    assert result.stderr == "error: controller is shutting down\n"


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("fast_watch")
def test_a_watched_dump_the_controller_forgets_is_an_error(
    fake: FakeController, address: str
) -> None:
    fake.add("d1")
    fake.forget_after = 2
    result = dump(address, "status", "--watch")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: the controller no longer lists dump d1 on uri orders; "
        "`pgcapture dump status --all` shows the dumps it knows\n"
    )


@pytest.mark.timeout(15)
def test_ctrl_c_stops_watching_and_leaves_the_dump_alone(
    fake: FakeController, address: str
) -> None:
    fake.add("d1", rows_estimate=100)
    command = [sys.executable, "-m", "pgcapture", "dump", "status", "d1", "--watch"]
    with subprocess.Popen(
        [*command, "--controller", address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "no progress line within 10s"
        assert proc.stdout.readline().startswith("dump d1 orders every table: running")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert stderr == (
        "stopped watching; dump d1 goes on untouched "
        "(`pgcapture dump stop --uri orders d1` stops it)\n"
    )
    assert {name for name, _ in fake.calls} == {"ListDumps"}
    assert fake.dumps["d1"].state == "running"


# -- display and address, without a controller ---------------------------------------------------


def test_rates_and_etas_are_measured_between_polls() -> None:
    tracker = dump_view.Tracker()
    status = pb.DumpStatus(id="d1", uri="o", state="running", chunks_total=8, rows_estimate=10_000)
    assert tracker.row(status, 100.0).eta == "-"
    status.rows, status.chunks_done = 2000, 2
    row = tracker.row(status, 102.0)
    assert (row.done, row.total, row.rows) == (2000, 10_000, "2,000/10,000 rows")
    assert (row.rate, row.eta) == ("1,000 rows/s", "8s")
    unestimated = pb.DumpStatus(id="d2", uri="o", state="running", chunks_total=8)
    tracker.row(unestimated, 100.0)
    unestimated.chunks_done, unestimated.rows = 2, 500
    row = tracker.row(unestimated, 110.0)
    assert (row.done, row.total, row.rows, row.percent) == (2, 8, "500 rows", "25%")
    assert (row.rate, row.eta) == ("50 rows/s", "30s")


def test_plain_progress_prints_a_dump_at_most_every_few_seconds_or_on_a_new_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dump_view, "PLAIN_EVERY", 3.0)
    lines: list[str] = []
    plain = dump_view.PlainView(lines.append)
    status = pb.DumpStatus(id="d1", uri="o", state="running", chunks_total=4)
    for now, state in ((0.0, "running"), (1.0, "running"), (2.0, "paused"), (4.0, "paused")):
        status.state = state
        plain.show([status], now)
    assert [line.split(": ")[1].split()[0] for line in lines] == ["running", "paused"]
    plain.show([status], 5.0)
    assert len(lines) == 3


def test_the_live_view_draws_one_bar_per_dump() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    first = pb.DumpStatus(id="d1", uri="orders", state="running", chunks_total=4, tables=["a.b"])
    second = pb.DumpStatus(id="d2", uri="users", state="done", chunks_total=2, chunks_done=2)
    with dump_view.LiveView(console) as live:
        live.show([first, second], 0.0)
        first.rows, first.chunks_done, first.rows_estimate = 3000, 1, 6000
        live.show([first, second], 1.0)
    text = out.getvalue()
    assert "d1 orders a.b" in text
    assert "3,000/6,000 rows" in text
    assert "3,000 rows/s" in text
    assert "d2 users every table" in text
    assert "2/2 chunks" in text


@pytest.mark.usefixtures("clean_env")
def test_the_controller_is_the_flag_else_gateway_controller_else_controller_listen(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pgcapture.toml"
    config.write_text('[controller]\nlisten = "0.0.0.0:7002"\n')
    assert Endpoint(None, config, (), 1.0).address() == "127.0.0.1:7002"
    settings = ('gateway.controller="ctl.internal:7100"',)
    assert Endpoint(None, config, settings, 1.0).address() == "ctl.internal:7100"
    assert Endpoint("other:1", config, settings, 1.0).address() == "other:1"
    assert Endpoint(None, None, (), 1.0).address() == "127.0.0.1:10002"
    assert [dial_address(a) for a in (":1", "[::]:2", "db:3", "10.1.1.1:4")] == [
        "127.0.0.1:1", "[::1]:2", "db:3", "10.1.1.1:4",
    ]  # fmt: skip


@pytest.mark.usefixtures("clean_env")
def test_a_bad_configuration_is_an_error_line(tmp_path: Path) -> None:
    config = tmp_path / "pgcapture.toml"
    config.write_text("[controller]\nlisten = 1\nnonsense = true\n")
    result = CliRunner().invoke(cli, ["dump", "status", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid configuration")
    assert "controller.nonsense: unknown key" in result.stderr
