"""One writer per source: a lease in a JetStream key-value bucket.

The bucket (default ``pgcapture_locks``, an ordinary NATS KV bucket, readable with
``nats kv get pgcapture_locks <source>``) holds, under the source's name, who captures it
(``owner``: host, pid, start time, and what identifies the process on its machine). The entry is
written with a per-message TTL (``Nats-TTL``, nats-server 2.11 or newer) and compare-and-set on
the key's revision (``Nats-Expected-Last-Subject-Sequence``):

* ``acquire`` takes the key at once when it holds nothing, or a holder that this process can
  prove dead (same machine, boot and PID namespace, and its pid gone or reused: ``owner``), by
  compare-and-set on the revision it read, so of several processes taking over only one wins.
  A live holder, or one it cannot see (another host or container), is waited for until it
  releases the lease or its entry expires, with a log line naming it now and then; ``wait``
  bounds that wait, after which ``SourceError`` names the holder. This holds even while the
  other process is between connections, which the slot being active in PostgreSQL would not
  show.
* ``refresh`` rewrites it with the revision it last wrote, well within the TTL; if that fails
  the lease is lost and ``ConnectionLost`` says so, so the caller stops publishing at once.
* ``release`` leaves a delete marker (with the TTL), so the next ``capture`` starts at once
  instead of waiting for the TTL after a clean stop.

After a crash the entry expires by itself ``ttl`` seconds after its last refresh, unless a
restart on the same machine takes it over first. The lease keeps a second writer from starting;
the stream's expected-sequence check refuses one that publishes anyway (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Final, NoReturn

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pgcapture.errors import ConfigError, ConnectionLost, SourceError
from pgcapture.log.owner import describe_owner, new_owner_id, owner_is_gone

__all__ = ["Lease", "describe_owner", "new_owner_id"]

log = logging.getLogger("pgcapture.lease")

_EXPECTED: Final = api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value
_OPERATION: Final = "KV-Operation"
_WRONG_LAST_SEQUENCE: Final = 10071
_REPORT_EVERY: Final = 10.0
"""Seconds between the log lines naming the holder a process waits for."""


@dataclass
class Lease:
    """The single-writer lease of one source."""

    js: JetStreamContext
    bucket: str
    key: str
    owner: str
    ttl: int = 15
    replicas: int = 1
    revision: int = 0

    @property
    def _stream(self) -> str:
        return f"KV_{self.bucket}"

    @property
    def _subject(self) -> str:
        return f"$KV.{self.bucket}.{self.key}"

    async def ensure_bucket(self) -> None:
        try:
            info = await self.js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            await self.js.create_key_value(bucket=self.bucket, history=1, replicas=self.replicas)
            return
        if not info.config.allow_msg_ttl:
            raise ConfigError(
                f"the lock bucket {self.bucket!r} exists without per-message TTLs "
                "(allow_msg_ttl); delete it (`nats kv del {self.bucket}`) so pgcapture can "
                "create it, or set [nats] lock_bucket to another name"
            )

    async def acquire(self, wait: float | None = None, stop: asyncio.Event | None = None) -> bool:
        """Take the lease; False if ``stop`` was set first.

        Free, already ours, or held by a process proven dead: taken at once. Held otherwise:
        waited for until released or expired; past ``wait`` seconds (None: no bound)
        ``SourceError`` names the holder."""
        await self.ensure_bucket()
        deadline = math.inf if wait is None else time.monotonic() + wait
        reported = -math.inf
        while stop is None or not stop.is_set():
            holder = await self._holder()
            if holder is None:
                if await self._try_write(await self._free_revision()):
                    return True
            elif holder[1] == self.owner.encode() or owner_is_gone(holder[1]):
                if await self._try_write(holder[0]):  # compare-and-set on the holder's revision
                    self._took_over(holder[1])
                    return True
            elif time.monotonic() >= deadline:
                self._held_by(holder[1], wait or 0.0)
            elif time.monotonic() - reported >= _REPORT_EVERY:
                reported = time.monotonic()
                self._waiting_for(holder[1])
            await _pause(min(0.25, self.ttl / 4), stop)
        return False

    def _took_over(self, value: bytes) -> None:
        if value != self.owner.encode():
            log.warning(
                "took over lease %r in NATS KV bucket %r from %s, which no longer runs",
                self.key, self.bucket, describe_owner(value),
                extra={"lease": self.key},
            )  # fmt: skip

    def _waiting_for(self, value: bytes) -> None:
        log.warning(
            "lease %r in NATS KV bucket %r is held by %s, a live process or one this host "
            "cannot see; waiting until it is released or expires",
            self.key, self.bucket, describe_owner(value), extra={"lease": self.key},
        )  # fmt: skip

    async def _holder(self) -> tuple[int, bytes] | None:
        """(revision, value) of the live entry, or None when the key is free."""
        try:
            msg = await self.js.get_last_msg(self._stream, self._subject)
        except nats.js.errors.NotFoundError:
            return None
        if (msg.headers or {}).get(_OPERATION) in ("DEL", "PURGE"):
            return None
        return (msg.seq or 0, msg.data or b"")

    async def _free_revision(self) -> int:
        """The revision to compare against when taking a free key (that of a delete marker)."""
        try:
            msg = await self.js.get_last_msg(self._stream, self._subject)
        except nats.js.errors.NotFoundError:
            return 0
        return msg.seq or 0

    async def _try_write(self, expected: int) -> bool:
        try:
            ack = await self.js.publish(
                self._subject,
                self.owner.encode(),
                headers={_EXPECTED: str(expected)},
                msg_ttl=self.ttl,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return False
            raise
        self.revision = ack.seq
        return True

    def _held_by(self, value: bytes, waited: float) -> NoReturn:
        raise SourceError(
            f"source {self.key!r} is already being captured by {describe_owner(value)} "
            f"(lease in NATS KV bucket {self.bucket!r}, waited for {waited:g}s as lock.wait "
            "says); stop that process first, or leave lock.wait unset so that capture waits "
            "until the lease is released or expires"
        )

    async def refresh(self) -> None:
        """Extend the lease; ``ConnectionLost`` if someone else took it meanwhile."""
        if not await self._try_write(self.revision):
            holder = await self._holder()
            who = describe_owner(holder[1]) if holder else "nobody (it expired)"
            raise ConnectionLost(
                f"lost the single-writer lease of source {self.key!r}, now held by {who}; "
                "stopped publishing"
            )

    async def keep(self) -> None:
        """Refresh every third of the TTL, forever."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.refresh()

    async def release(self) -> None:
        """Give the lease up after a clean stop (best effort)."""
        if not self.revision:
            return
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.js.publish(
                self._subject,
                b"",
                headers={_EXPECTED: str(self.revision), _OPERATION: "DEL"},
                msg_ttl=self.ttl,
            )
        self.revision = 0


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
