"""One writer per source: a lease in a JetStream key-value bucket.

The bucket (default ``pgcapture_locks``, an ordinary NATS KV bucket, readable with
``nats kv get pgcapture_locks <source>``) holds, under the source's name, who captures it. The
entry is written with a per-message TTL (``Nats-TTL``, nats-server 2.11 or newer) and
compare-and-set on the key's revision (``Nats-Expected-Last-Subject-Sequence``):

* ``acquire`` creates the entry only if the key holds nothing; if another owner holds it, it
  fails at once with ``SourceError`` naming the holder (or keeps trying for ``wait`` seconds).
  This holds even while the other process is between connections, which the slot being active
  in PostgreSQL would not show.
* ``refresh`` rewrites it with the revision it last wrote, well within the TTL; if that fails
  the lease is lost and ``ConnectionLost`` says so, so the caller stops publishing at once.
* ``release`` leaves a delete marker (with the TTL), so the next ``capture`` starts at once
  instead of waiting for the TTL after a clean stop.

After a crash the entry expires by itself ``ttl`` seconds after its last refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Final, NoReturn

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pgcapture.errors import ConfigError, ConnectionLost, SourceError

_EXPECTED: Final = api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value
_OPERATION: Final = "KV-Operation"
_WRONG_LAST_SEQUENCE: Final = 10071


def new_owner_id() -> str:
    """A description of this process that is unique among all processes."""
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "id": uuid.uuid4().hex[:12],
        },
        separators=(",", ":"),
    )


def describe_owner(value: bytes) -> str:
    try:
        owner = json.loads(value)
        return f"pid {owner['pid']} on host {owner['host']} (since {owner['since']})"
    except (ValueError, KeyError, TypeError):
        return repr(value[:200])


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

    async def acquire(self, wait: float = 0.0) -> None:
        """Take the lease, or fail with ``SourceError`` naming its holder."""
        await self.ensure_bucket()
        deadline = time.monotonic() + wait
        while True:
            holder = await self._holder()
            if holder is None or holder[1] == self.owner.encode():
                expected = holder[0] if holder is not None else await self._free_revision()
                if await self._try_write(expected):
                    return
            elif time.monotonic() >= deadline:
                self._held_by(holder[1])
            await asyncio.sleep(min(0.25, self.ttl / 4))

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

    def _held_by(self, value: bytes) -> NoReturn:
        raise SourceError(
            f"source {self.key!r} is already being captured by {describe_owner(value)} "
            f"(lease in NATS KV bucket {self.bucket!r}); stop that process first, or, if it "
            f"crashed, wait up to {self.ttl}s for its lease to expire"
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
