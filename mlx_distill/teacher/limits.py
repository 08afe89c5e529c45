"""Proactive rate limits: a concurrency cap, requests/minute and tokens/minute, plus server hints.

RPM and TPM use a *sliding-window log*: every admitted request is recorded with its admission time
and weight (1 for RPM, estimated tokens for TPM), and a new one is admitted at the earliest time
``t`` at which the weights recorded in ``(t - window, t]`` plus its own stay within the limit.
Unlike a token bucket of capacity ``rpm`` (which lets ``2 × rpm`` through in a window that straddles
a refill), this guarantees the limit in *every* sliding window: any ``rpm + 1`` consecutive
admissions span at least ``window`` seconds. Admission times never decrease, so the log stays
sorted. TPM weights start as an upper-bound estimate and are settled to the actual usage afterwards.

Servers' ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*`` headers and ``Retry-After`` are
honoured on top. The clock and sleep are injectable so tests run minutes of schedule instantly.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from mlx_distill.teacher.config import Tier

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """Seconds from a rate-limit reset header: "1s", "6m0s", "20ms", "1h2m3.5s" or plain "0.5"."""
    if text is None:
        return None
    text = text.strip()
    try:
        value = float(text)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def parse_retry_after(text: str | None, now_wall: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now_wall = time.time() if now_wall is None else now_wall
    return max(0.0, when.timestamp() - now_wall)


@dataclass
class Slot:
    time: float
    weight: float
    counted: bool = True  # still in the limiter's log (part of its running total)


class SlidingWindowLimiter:
    """At most ``limit`` total weight admitted within any ``window_s``-second sliding window."""

    def __init__(self, limit: float, window_s: float = 60.0):
        if limit <= 0 or window_s <= 0:
            raise ValueError(f"limit and window must be positive, got {limit}, {window_s}")
        self.limit = float(limit)
        self.window_s = float(window_s)
        self._log: collections.deque[Slot] = collections.deque()
        self._total = 0.0  # weight of the entries in _log (token counts: exact in a float)

    def _forget(self) -> None:
        # Every later admission happens at or after the last one, so entries a full window
        # before it can never count again.
        horizon = self._log[-1].time - self.window_s
        while self._log[0].time <= horizon:
            slot = self._log.popleft()
            slot.counted = False
            self._total -= slot.weight

    def earliest(self, t0: float, weight: float) -> float:
        """The earliest time >= ``t0`` (and >= the last admission) at which ``weight`` fits."""
        weight = min(weight, self.limit)  # bigger than a whole window: wait for an empty one
        if not self._log:
            return t0
        t0 = max(t0, self._log[-1].time)
        total, t = self._total, t0
        for slot in self._log:  # oldest first; stops at the first point where the weight fits
            live = slot.time > t0 - self.window_s
            if live and total + weight <= self.limit:
                break
            total -= slot.weight
            if live:  # waiting until this entry leaves the window; strictly after, so float
                t = math.nextafter(slot.time + self.window_s, math.inf)  # rounding cannot cheat
        return t

    def record(self, t: float, weight: float) -> Slot:
        slot = Slot(t, min(weight, self.limit))
        self._log.append(slot)
        self._total += slot.weight
        self._forget()
        return slot

    def reserve(self, now: float, weight: float = 1.0) -> Slot:
        """Record an admission at the earliest feasible time >= ``now`` and return it."""
        return self.record(self.earliest(now, weight), weight)

    def settle(self, slot: Slot, weight: float) -> None:
        """Replace an admitted estimate by the actual weight (usually smaller)."""
        weight = max(0.0, float(weight))
        if slot.counted:
            self._total += weight - slot.weight
        slot.weight = weight

    def in_window(self, t: float) -> float:
        """Total weight admitted in ``(t - window, t]`` (entries a window older than the last
        admission are forgotten)."""
        return math.fsum(s.weight for s in self._log if t - self.window_s < s.time <= t)


class ServerHints:
    """What the server said about its own limits: remaining requests/tokens until a reset time,
    and pauses (Retry-After). Times are on the limiter's clock."""

    def __init__(self):
        self.paused_until = 0.0
        self.requests_left: float | None = None
        self.requests_reset_at = 0.0
        self.tokens_left: float | None = None
        self.tokens_reset_at = 0.0

    def observe(self, headers: Mapping[str, str], now: float) -> None:
        def number(name: str) -> float | None:
            try:
                return float(headers[name])
            except (KeyError, TypeError, ValueError):
                return None

        requests = number("x-ratelimit-remaining-requests")
        reset = parse_duration(headers.get("x-ratelimit-reset-requests"))
        if requests is not None and reset is not None:
            self.requests_left, self.requests_reset_at = requests, now + reset
        tokens = number("x-ratelimit-remaining-tokens")
        reset = parse_duration(headers.get("x-ratelimit-reset-tokens"))
        if tokens is not None and reset is not None:
            self.tokens_left, self.tokens_reset_at = tokens, now + reset

    def pause(self, seconds: float, now: float) -> None:
        self.paused_until = max(self.paused_until, now + seconds)

    def wait_time(self, now: float, tokens: float) -> float:
        wait = self.paused_until - now
        if self.requests_left is not None and now < self.requests_reset_at:
            if self.requests_left < 1:
                wait = max(wait, self.requests_reset_at - now)
        if self.tokens_left is not None and now < self.tokens_reset_at:
            if self.tokens_left < tokens:
                wait = max(wait, self.tokens_reset_at - now)
        return max(0.0, wait)

    def consume(self, now: float, tokens: float) -> None:
        """Count an admission against the server's last report until its reset time."""
        if self.requests_left is not None:
            if now < self.requests_reset_at:
                self.requests_left -= 1
            else:
                self.requests_left = None
        if self.tokens_left is not None:
            if now < self.tokens_reset_at:
                self.tokens_left -= tokens
            else:
                self.tokens_left = None


@dataclass
class Permit:
    start: float
    tokens: float
    rpm_slot: Slot
    tpm_slot: Slot


class RateLimits:
    """Concurrency cap + RPM + TPM + server hints for one event loop.

    ``margin_s`` widens the window: we count sends, the provider counts arrivals, and those lag
    by a varying few milliseconds (much more for a request that opens a new connection; ~90 ms
    measured on loopback under load). Scale it up for slow links.
    """

    def __init__(self, tier: Tier, *, window_s: float = 60.0, margin_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep):
        self.tier = tier
        self.clock = clock
        self.sleep = sleep
        self.rpm = SlidingWindowLimiter(tier.rpm, window_s + margin_s)
        self.tpm = SlidingWindowLimiter(tier.tpm, window_s + margin_s)
        self.hints = ServerHints()
        self._slots = asyncio.Semaphore(tier.concurrency)
        self._waiters: set[asyncio.Future] = set()
        self.in_flight = 0

    async def acquire(self, tokens: float) -> Permit:
        """Wait for a concurrency slot, then until RPM, TPM and the server's hints all admit one
        more request of ``tokens`` (estimated) tokens *now*. Admissions are recorded at the time
        they happen (never in the future), so a settled estimate frees capacity for waiters."""
        await self._slots.acquire()
        try:
            while True:
                now = self.clock()
                wait = self.hints.wait_time(now, tokens)
                if wait <= 0:
                    wait = max(self.rpm.earliest(now, 1), self.tpm.earliest(now, tokens)) - now
                    if wait <= 0:
                        break
                await self._wait(wait)
            permit = Permit(now, tokens, self.rpm.record(now, 1), self.tpm.record(now, tokens))
            self.hints.consume(now, tokens)
        except BaseException:
            self._slots.release()
            raise
        self.in_flight += 1
        return permit

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a release may have made room; the caller re-checks."""
        woken = asyncio.get_running_loop().create_future()
        self._waiters.add(woken)
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            self._waiters.discard(woken)

    def release(self, permit: Permit, actual_tokens: float | None = None) -> None:
        """Free the concurrency slot; ``actual_tokens`` (from usage) settles the TPM estimate."""
        if actual_tokens is not None:
            self.tpm.settle(permit.tpm_slot, actual_tokens)
        self.in_flight -= 1
        self._slots.release()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def observe(self, headers: Mapping[str, str]) -> None:
        self.hints.observe(headers, self.clock())

    def pause(self, seconds: float) -> None:
        """Hold every new request for ``seconds`` (the server said so, e.g. 429 + Retry-After)."""
        self.hints.pause(seconds, self.clock())
