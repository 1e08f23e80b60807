"""The controller as ``pgcapture dump`` sees it: where it is, its calls, their errors, watching.

The controller is ``--controller HOST:PORT``, else ``gateway.controller`` of the configuration,
else the address ``controller.listen`` names (a wildcard host is this machine), reached over a
plain gRPC channel. Every call is bounded by the timeout. ``run`` ends the command: a refusal
prints the controller's message as ``error: ...`` and exits with 2; so does a controller that
cannot be reached, naming where it was looked for and how to start it. ``follow_dumps`` shows
progress until the dumps end (0); SIGINT/SIGTERM stop the watching only, never a dump (130).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click
import grpc

from pgcapture.cli import dump_view as view
from pgcapture.cli.options import with_settings
from pgcapture.config import load_config
from pgcapture.errors import PgCaptureError
from pgcapture.proto import pb, pb_grpc

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class ControllerError(PgCaptureError):
    """The controller refused a call or could not be reached; the message names the fix."""


def dial_address(listen: str) -> str:
    """Where a client reaches a server listening on ``listen``: a wildcard host is this machine."""
    host, sep, port = listen.rpartition(":")
    if not sep or host not in ("", "0.0.0.0", "[::]"):
        return listen
    return f"{'[::1]' if host == '[::]' else '127.0.0.1'}:{port}"


@dataclass(frozen=True)
class Endpoint:
    """The options every subcommand shares: where the controller is, and the call timeout."""

    controller: str | None
    config_path: Path | None
    settings: tuple[str, ...]
    timeout: float

    def address(self) -> str:
        if self.controller:
            return self.controller
        config = load_config(self.config_path, os.environ, with_settings({}, self.settings))
        return config.gateway.controller or dial_address(config.controller.listen)


class Controller:
    """The controller's dump calls, each bounded by ``timeout``, on a channel open while the
    controller is used as an async context manager; gRPC errors are translated once, here,
    into ``ControllerError``."""

    def __init__(self, address: str, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._channel: Any = None
        self._stub: Any = None

    async def __aenter__(self) -> Controller:
        self._channel = grpc.aio.insecure_channel(self._address)
        self._stub = pb_grpc.DBLogControllerStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()

    async def schedule(self, request: pb.ScheduleDumpRequest) -> pb.DumpStatus:
        status: pb.DumpStatus = await self._call(self._stub.ScheduleDump, request)
        return status

    async def list(self, request: pb.ListDumpsRequest) -> list[pb.DumpStatus]:
        response: pb.ListDumpsResponse = await self._call(self._stub.ListDumps, request)
        return list(response.dumps)

    async def act(self, method: str, ref: pb.DumpRef) -> pb.DumpStatus:
        """``method`` is ``PauseDump``, ``ResumeDump`` or ``StopDump``."""
        status: pb.DumpStatus = await self._call(getattr(self._stub, method), ref)
        return status

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise ControllerError(self._explain(exc)) from exc

    def _explain(self, exc: Any) -> str:
        code, details = exc.code(), " ".join((exc.details() or "").split())
        connected = self._channel.get_state() is grpc.ChannelConnectivity.READY
        if not connected and code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            return (
                f"cannot reach the controller at {self._address} ({details}); start it with "
                "`pgcapture controller`, or give its address with --controller HOST:PORT "
                "(or gateway.controller in the configuration)"
            )
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return (
                f"the controller at {self._address} did not answer within {self._timeout:g}s; "
                "raise --timeout or look at the controller's log"
            )
        return details or f"the controller at {self._address} failed the call ({code.name})"


def run(endpoint: Endpoint, work: Callable[[Controller], Awaitable[int]]) -> None:
    """``work`` against the controller; exits with its status, or prints ``error: ...`` and
    exits with 2."""
    try:
        controller = Controller(endpoint.address(), endpoint.timeout)
        code = asyncio.run(_session(controller, work))
    except PgCaptureError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if code:
        sys.exit(code)


async def _session(controller: Controller, work: Callable[[Controller], Awaitable[int]]) -> int:
    async with controller:
        return await work(controller)


async def follow_dumps(
    controller: Controller, request: pb.ListDumpsRequest, dumps: Sequence[pb.DumpStatus]
) -> int:
    """Live progress of ``dumps`` until they end (0) or SIGINT/SIGTERM stops watching (130),
    at once, even amid a call."""
    polled = pb.ListDumpsRequest(uri=request.uri, id=request.id, include_finished=True)
    watched = {view.key(d) for d in dumps}

    async def poll() -> list[pb.DumpStatus]:
        statuses = [s for s in await controller.list(polled) if view.key(s) in watched]
        gone = watched - {view.key(s) for s in statuses}
        if gone:
            uri, dump_id = min(gone)
            raise ControllerError(
                f"the controller no longer lists dump {dump_id} on uri {uri}; "
                "`pgcapture dump status --all` shows the dumps it knows"
            )
        return statuses

    following = asyncio.ensure_future(view.follow(poll, view.progress_view(click.echo)))
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, following.cancel)
    try:
        await asyncio.wait({following})
    finally:
        following.cancel()
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    if not following.cancelled():
        following.result()  # a ControllerError of the polls
        return 0
    click.echo(f"stopped watching; {_going_on(dumps)}", err=True)
    return 130


def _going_on(dumps: Sequence[pb.DumpStatus]) -> str:
    if len(dumps) == 1:
        uri, dump_id = view.key(dumps[0])
        stop = f"pgcapture dump stop --uri {uri} {dump_id}"
        return f"dump {dump_id} goes on untouched (`{stop}` stops it)"
    ids = ", ".join(d.id for d in dumps)
    return f"dumps {ids} go on untouched (`pgcapture dump stop --uri URI ID` stops one)"
