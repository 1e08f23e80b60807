"""Acknowledgements of one stream, coalesced into ranges (no I/O).

Every delivered id is settled once, as an ack (reason ``""``) or a requeue (its reason), in
whatever order handlers finish. ``take()`` returns what was settled since the last call as
ranges of consecutive ids with the same reason, ascending: ``CaptureAckRange`` messages for
``CaptureBatched``, expanded to one ``CaptureAck`` per id for ``Capture``. The gateway bounds
the unacknowledged messages of a stream, so ``outstanding`` (delivered but not settled) is what
the consumer watches to send acknowledgements promptly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AckRange:
    """Delivery ids ``first..last`` (inclusive); a non-empty ``reason`` requeues them."""

    first: int
    last: int
    reason: str = ""


class AckTracker:
    """Settled-but-unsent delivery ids of one stream."""

    __slots__ = ("_delivered", "_pending", "_settled")

    def __init__(self) -> None:
        self._pending: dict[int, str] = {}
        self._delivered = 0
        self._settled = 0

    def delivered(self, count: int) -> None:
        """``count`` more ids were received."""
        self._delivered += count

    def settle(self, delivery_id: int, reason: str = "") -> None:
        if delivery_id in self._pending:
            raise ValueError(f"delivery id {delivery_id} is settled twice")
        self._pending[delivery_id] = reason
        self._settled += 1

    @property
    def outstanding(self) -> int:
        """Received ids not settled yet."""
        return self._delivered - self._settled

    @property
    def unsent(self) -> int:
        """Settled ids waiting for ``take``."""
        return len(self._pending)

    def take(self) -> list[AckRange]:
        """The settled ids as ranges of consecutive ids with one reason; forgets them."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, {}
        ranges: list[AckRange] = []
        ids = sorted(pending)
        first = last = ids[0]
        reason = pending[first]
        for i in ids[1:]:
            if i == last + 1 and pending[i] == reason:
                last = i
                continue
            ranges.append(AckRange(first, last, reason))
            first = last = i
            reason = pending[i]
        ranges.append(AckRange(first, last, reason))
        return ranges
