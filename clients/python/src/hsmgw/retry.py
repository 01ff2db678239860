"""When and how often a call is tried again (docs/protocol.md section 13), as the Swift client's
``RetryPolicy``: exponential backoff with full jitter, capped, never past the call's deadline."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ._wire import Code
from .errors import ConfigurationError, GatewayError, LocalReason, Origin

#: The most attempts one call may make, the first included.
MAX_ATTEMPTS_LIMIT = 10
#: The longest backoff accepted, in seconds.
MAX_BACKOFF_LIMIT = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` per call, the first included (1 = no retries); the backoff before retry
    ``n`` is uniformly random between 0 and ``min(initial_backoff * multiplier^(n-1),
    max_backoff)`` seconds. The defaults are the protocol's recommendation: five attempts,
    100 ms doubling up to 5 s."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ConfigurationError("max_attempts must be 1 to %d" % MAX_ATTEMPTS_LIMIT)
        if not self.initial_backoff > 0:
            raise ConfigurationError("initial_backoff must be greater than zero")
        if not self.initial_backoff <= self.max_backoff <= MAX_BACKOFF_LIMIT:
            raise ConfigurationError("max_backoff must be between initial_backoff and %g s" % MAX_BACKOFF_LIMIT)
        if not 1 <= self.multiplier <= 10:
            raise ConfigurationError("multiplier must be 1 to 10")

    def backoff_ceiling(self, retry: int) -> float:
        """The largest backoff before retry ``retry`` (1 for the first retry)."""
        if retry < 1:
            raise ValueError("retries are numbered from 1")
        return float(min(self.initial_backoff * self.multiplier ** (retry - 1), self.max_backoff))

    def backoff(self, retry: int, unit_random: Callable[[], float] = random.random) -> float:
        """A backoff drawn with full jitter; tests pass a fixed ``unit_random``."""
        return self.backoff_ceiling(retry) * min(max(unit_random(), 0.0), 1.0)


NO_RETRIES = RetryPolicy(max_attempts=1)


def is_retryable(error: GatewayError, *, idempotent: bool, has_idempotency_key: bool) -> bool:
    """Whether a call that failed with ``error`` may be tried again (section 13, and the Swift
    client's ``RetryPolicy.isRetryable``):

    - UNAVAILABLE: when the request provably never reached the server, or the method is
      idempotent, or the call carries an idempotency key; never after the client was closed;
    - ABORTED, and RESOURCE_EXHAUSTED with OVERLOADED, TOO_MANY_REQUESTS_IN_FLIGHT or
      TOO_MANY_CONNECTIONS(_FROM_ADDRESS) from the server: the work did not happen;
    - nothing else (deadlines and cancellations included: the caller's time is up).
    """
    if error.code == Code.UNAVAILABLE:
        if error.reason == LocalReason.CLIENT_CLOSED and error.origin == Origin.CLIENT:
            return False
        return error.not_processed or idempotent or has_idempotency_key
    if error.code in (Code.ABORTED, Code.RESOURCE_EXHAUSTED):
        return error.origin == Origin.SERVER and error.not_processed
    return False
