"""Reconnect delays: exponential backoff with jitter, capped.

The n-th consecutive failed attempt waits ``min(maximum, initial * multiplier**n)``, scaled
by a random factor in ``[1 - jitter, 1]`` so that processes cut off together (consumers by a
gateway restart, capture and replicate by a server restart) do not come back in step. The
caller counts the attempts and starts again at 0 after a session that made progress.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pgcapture.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between reconnect attempts, in seconds.

    >>> Backoff(initial=0.5, maximum=4.0, jitter=0.0).delay(3)
    4.0
    """

    initial: float = 0.2
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ConfigError(
                f"backoff initial={self.initial} and maximum={self.maximum} must satisfy "
                "0 < initial <= maximum"
            )
        if self.multiplier < 1:
            raise ConfigError(f"backoff multiplier={self.multiplier} must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"backoff jitter={self.jitter} must be between 0 and 1")

    def delay(self, attempt: int) -> float:
        """The wait before reconnect attempt ``attempt`` (0 for the first after a failure)."""
        exponent = min(attempt, 64)  # beyond this the cap applies anyway; avoids overflow
        base = min(self.maximum, self.initial * self.multiplier**exponent)
        return base * (1 - self.jitter * self.rng.random())
