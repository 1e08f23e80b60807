"""Dump chunks for one client stream: pulled from the controller, read by the dumper, delivered
through the URI's hub (docs/dumps.md).

Every client stream of a URI with a ``dumper`` runs a ``DumpFeed`` while a controller is
configured: it registers with ``DBLogController/PullDumpInfo`` under the stream's URI (as the
Go gateway does), and for each chunk handed to it

1. skips a table the stream's ``TableRegex`` does not select (acknowledged: nothing to send);
2. starts watching the table in the hub, then asks the dumper (``Agent/StreamDumpBatched``)
   for the chunk with ``min_lsn`` = the hub's position: the replica refuses while it is behind
   (the chunk is requeued with the dumper's reason and comes back after the controller's
   backoff);
3. waits until the hub has taken every stream message up to the replica position the rows
   were read at, then injects the rows as they stream in (the watch drops the ones the stream
   has already overtaken), the last one flagged;
4. acknowledges the chunk to the controller when every row is acknowledged by the client,
   with the row count, or requeues it with the reason: a client requeue, the stream ending,
   the dumper failing. A table missing on the replica is an empty chunk (as in Go).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import grpc

from pgcapture.backoff import Backoff
from pgcapture.dump.chunks import describe, dump_id
from pgcapture.gateway.hub import Hub, Item, Session
from pgcapture.gateway.injection import (
    DumpChunk,
    RowFilter,
    dump_payload,
    payload_head,
    row_keys,
)
from pgcapture.gateway.records import CHANGE
from pgcapture.lsn import format_lsn
from pgcapture.proto import pb
from pgcapture.wire import varint

log = logging.getLogger("pgcapture.gateway")

PULL: Final = "/pgcapture.DBLogController/PullDumpInfo"
STREAM_DUMP: Final = "/pgcapture.Agent/StreamDumpBatched"
_RECONNECT = Backoff(initial=0.5, maximum=10.0, multiplier=2.0, jitter=0.2)


class Channels:
    """One gRPC channel per address (controller, dumpers), shared by every feed."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address,
                options=[("grpc.max_receive_message_length", -1)],  # rows of any size
            )
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class DumpFeed:
    """The chunks of one client stream (see the module docstring)."""

    def __init__(
        self,
        hub: Hub,
        session: Session,
        channels: Channels,
        controller: str,
        dumper: str,
        wait: float,
    ) -> None:
        self.hub = hub
        self.session = session
        self._channels = channels
        self._controller = controller
        self._dumper = dumper
        self._wait = wait
        self._uri = hub.route.uri
        labels = {"uri": self._uri}
        self._chunks = hub.metrics.dump_chunks
        self._rows = hub.metrics.dump_rows.labels(**labels)

    async def run(self) -> None:
        """Pull chunks until the stream ends; reconnect to the controller on failures."""
        attempt = 0
        while True:
            try:
                await self._pull()
                attempt = 0
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("uri %s: controller: %s", self._uri, exc.details())
                else:
                    log.info(
                        "uri %s: controller %s: %s", self._uri, self._controller, exc.details()
                    )
            attempt += 1
            await asyncio.sleep(_RECONNECT.delay(attempt))

    async def _pull(self) -> None:
        channel = self._channels.get(self._controller)
        call = channel.stream_stream(
            PULL,
            request_serializer=pb.DumpInfoRequest.SerializeToString,
            response_deserializer=pb.DumpInfoResponse.FromString,
        )()
        try:
            await call.write(pb.DumpInfoRequest(uri=self._uri, key_chunks=True))
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    return
                assert isinstance(chunk, pb.DumpInfoResponse)
                reason, rows = await self._deliver(chunk)
                outcome = "requeued" if reason else "done"
                self._chunks.labels(uri=self._uri, outcome=outcome).inc()
                if reason:
                    log.info("uri %s: chunk %s requeued: %s", self._uri, describe(chunk), reason)
                await call.write(pb.DumpInfoRequest(requeue_reason=reason, rows=rows))
        finally:
            call.cancel()

    async def _deliver(self, chunk: pb.DumpInfoResponse) -> tuple[str, int]:
        """Deliver one chunk: ("", rows) when every row is acknowledged, else (reason, 0)."""
        table = (chunk.schema, chunk.table)
        if not self.session.wants(CHANGE, (table,)):
            return "", 0  # the stream's TableRegex does not select the table
        hub = self.hub
        watch = hub.watch(table)
        try:
            call = self._channels.get(self._dumper).unary_stream(
                STREAM_DUMP,
                request_serializer=pb.AgentDumpRequest.SerializeToString,
                response_deserializer=pb.DumpRows.FromString,
            )(pb.AgentDumpRequest(min_lsn=max(hub.taken_lsn, hub.delivered_lsn), info=chunk))
            try:
                first = await call.read()
                if first is grpc.aio.EOF:
                    return "the dumper ended the chunk without its position", 0
                assert isinstance(first, pb.DumpRows)
                if not await hub.reach(first.lsn, self._wait):
                    return self._not_reached(first.lsn), 0
                if first.lsn < hub.delivered_lsn:  # known only once the hub runs
                    return self._behind(first.lsn), 0
                state = DumpChunk(chunk, dump_id(chunk), self.session, first.lsn)
                try:
                    await self._inject(call, first, state, watch.filter(first.lsn))
                    return await self._settled(state)
                finally:
                    hub.drop_chunk(state, "the chunk was abandoned")
            finally:
                call.cancel()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "", 0  # the table does not exist on the replica: nothing to dump
            return f"dumper {self._dumper}: {exc.details() or exc.code().name}", 0
        finally:
            hub.unwatch(watch)

    def _behind(self, lsn: int) -> str:
        return (
            f"the replica was read at {format_lsn(lsn)}, behind "
            f"{format_lsn(self.hub.delivered_lsn)}, which clients of URI {self._uri} may have been "
            "sent already: the chunk is retried once the replica has caught up"
        )

    def _not_reached(self, lsn: int) -> str:
        return (
            f"the stream of URI {self._uri} has not reached the replica position "
            f"{format_lsn(lsn)} within {self._wait:g}s (it is at "
            f"{format_lsn(self.hub.taken_lsn)}): the consumer is behind, or capture is behind "
            "the replica; the chunk is retried"
        )

    async def _inject(
        self, call: object, rows: pb.DumpRows, state: DumpChunk, keep: RowFilter
    ) -> None:
        """Rows into the hub as they arrive, the last one flagged, at most about one client
        window of them unacknowledged at a time."""
        session = self.session
        held: Item | None = None  # the newest row: sent once a later one (or the end) is known
        while True:
            items = self._items(rows, state, keep)
            if items:
                if held is not None:
                    items.insert(0, held)
                held = items.pop()
                self._send(items, state, last=False)
            while state.pending >= session.window and not state.finished:
                state.room.clear()
                await state.room.wait()
            if state.finished:
                return
            nxt = await call.read()  # type: ignore[attr-defined]
            if nxt is grpc.aio.EOF:
                break
            rows = nxt
        state.complete = True
        if held is not None:
            self._send([held], state, last=True)
        elif not state.pending:
            state.finish("")

    def _items(self, rows: pb.DumpRows, state: DumpChunk, keep: RowFilter) -> list[Item]:
        """The rows still worth sending, as hub items (payloads built, not flagged last)."""
        if keep.all_stale:
            return []  # a truncate after the read position: the stream has the newer state
        table = ((state.info.schema, state.info.table),)
        head, dump = payload_head(state.dump_id, False), state.dump_id
        if not (self.hub.ordered or keep.needs_keys):  # nothing to hold back or drop by key
            return [
                Item(0, dump, CHANGE, head + varint(len(c)) + c, table, state, c)
                for c in rows.changes
            ]
        out: list[Item] = []
        for change in rows.changes:
            keys = row_keys(change)
            if not keep.keeps(keys, change):
                continue
            if not keys[0][2]:
                keys = ()  # a keyless row locks nothing (its table is its only identity)
            payload = head + varint(len(change)) + change
            out.append(Item(0, dump, CHANGE, payload, table, state, change, keys=keys))
        return out

    def _send(self, items: list[Item], state: DumpChunk, last: bool) -> None:
        if last:
            items[-1].payload = dump_payload(state.dump_id, items[-1].message, True)
        state.pending += len(items)
        self.hub.inject(items)

    async def _settled(self, state: DumpChunk) -> tuple[str, int]:
        reason = await state.outcome
        if reason:
            return reason, 0
        self._rows.inc(state.rows)
        return "", state.rows
