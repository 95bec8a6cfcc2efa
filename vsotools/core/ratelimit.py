"""Rate limiting and retry delays: a token bucket for API quotas, and one retry policy
(exponential backoff with jitter, lengthened to what a server's Retry-After asks)."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable

from vsotools.core.files import whole_number


class TokenBucket:
    """Allows ``rate`` acquisitions per second on average and at most ``capacity`` back to back.

    The bucket starts full. ``acquire`` blocks until a token is available; it is thread-safe.
    """

    def __init__(
        self,
        rate: float,
        capacity: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("a token bucket needs a positive rate and a capacity of at least 1")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(capacity)
        self._last = clock()
        self._lock = threading.Lock()

    @classmethod
    def per_hour(cls, calls_per_hour: int, burst: int) -> TokenBucket:
        return cls(calls_per_hour / 3600.0, burst)

    def acquire(self) -> float:
        """Take one token, waiting as long as needed; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return waited
                delay = (1.0 - self._tokens) / self.rate
            self._sleep(delay)
            waited += delay


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Exponential backoff with "equal jitter": uniform in [c/2, c] for c = min(cap, base * 2**attempt),
    so every retry waits at least half the nominal delay while retries of many workers hit by
    the same outage still spread out.
    """
    ceiling = min(cap, base * (2.0**attempt))
    return (rng or random).uniform(ceiling / 2.0, ceiling)


def retry_delay(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt``: the backoff delay, or the server's
    ``Retry-After`` when that asks for longer (never more than ``cap``).

    The one retry policy of vsotools: the Flickr client and the image downloader both wait this.
    """
    delay = backoff_delay(attempt, base, cap, rng)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """An HTTP ``Retry-After`` header as seconds from now: delay seconds or an HTTP date;
    None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if (seconds := whole_number(value)) is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now())
