"""OpenAI-compatible teacher client (httpx): retries, proactive rate limits, a USD budget.

Per attempt: reserve the request's worst-case cost on the budget (``BudgetExceeded`` before
anything is sent), wait for the rate limits, send, then settle. An attempt that may have been
billed without us learning its usage (read timeout, connection dropped mid-answer, a cut stream,
an unparseable 200) is charged its worst case: the cap then holds for real money, at the price of
over-counting. Attempts refused with an HTTP error status are not billed and are released.

Retried (exponential backoff, full jitter, ``Retry-After`` as a minimum): 408/409/429/5xx, timeouts,
connection errors and resets, truncated streams, malformed JSON. Other 4xx fail at once with the
server's message. The API key only travels in the Authorization header and is redacted from any
error text.

Quirk ``mlx_lm_server`` (mlx_lm.server, FIELD-NOTES): ``logprobs`` is sent as a bool and
``top_logprobs`` separately (on /completions too); a streamed request that asks for logprobs is
sent unstreamed, since its streamed chunks carry none; ``top_logprobs > 0`` is refused, because
each position then reports the first entry of an unsorted top-k list instead of the sampled token;
``echo`` is refused (unsupported). Its ``top_logprobs=0`` answers have correct sampled logprobs but
no token text (only ids), so their ``TokenLogprob.token`` is ''.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import ssl
import threading
import time
from typing import Any

import certifi
import httpx

from mlx_distill.teacher.budget import Budget
from mlx_distill.teacher.config import TeacherSpec, token_bounds
from mlx_distill.teacher.config import api_key as env_api_key
from mlx_distill.teacher.errors import InvalidRequest, RequestFailed, WireError, redact
from mlx_distill.teacher.limits import RateLimits, parse_retry_after
from mlx_distill.teacher.transport import AiohttpTransport, new_event_loop
from mlx_distill.teacher.types import ChatRequest, Completion
from mlx_distill.teacher.wire import (
    CompletionRequest,
    StreamAccumulator,
    error_message,
    parse_response,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=60.0)
RETRY_STATUSES = frozenset({408, 409, 429})


class _AttemptFailed(Exception):
    def __init__(self, reason: str, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None, maybe_billed: bool = False):
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable
        self.status, self.retry_after, self.maybe_billed = status, retry_after, maybe_billed


def _transport_failure(exc: httpx.TransportError) -> _AttemptFailed:
    """Map an httpx error to (reason, maybe billed). Errors before the request was fully sent
    cannot have been billed; errors while waiting for or reading the answer may have been."""
    kinds = [
        (httpx.ConnectTimeout, "connect_timeout", False),
        (httpx.PoolTimeout, "pool_timeout", False),
        (httpx.WriteTimeout, "write_timeout", False),
        (httpx.ReadTimeout, "timeout", True),
        (httpx.ConnectError, "connect_error", False),
        (httpx.WriteError, "connection_reset", False),
        (httpx.RemoteProtocolError, "connection_reset", True),
        (httpx.ReadError, "connection_reset", True),
    ]
    reason, billed = next(((r, b) for cls, r, b in kinds if isinstance(exc, cls)),
                          ("transport_error", True))
    return _AttemptFailed(reason, f"{type(exc).__name__}: {exc}".rstrip(": "), retryable=True,
                          maybe_billed=billed)


def _http_client(spec: TeacherSpec, headers: dict[str, str], timeout: httpx.Timeout,
                 transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    """One httpx client over aiohttp (``transport.py``), sized to the tier's concurrency. A
    caller's transport (e.g. one with its own pool) is used as given."""
    if transport is None:
        # http:// needs no TLS context (we never follow redirects, so requests stay on
        # base_url's origin); building one costs ~0.25 s.
        tls = spec.base_url.startswith("https://")
        transport = AiohttpTransport(
            max_connections=spec.limits.concurrency,
            verify=ssl.create_default_context(cafile=certifi.where()) if tls else False)
    return httpx.AsyncClient(base_url=spec.base_url + "/", headers=headers, timeout=timeout,
                             transport=transport)


class AsyncTeacherClient:
    def __init__(self, spec: TeacherSpec, *, api_key: str | None = None, tier: str | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, max_attempts: int = 6,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 60.0,
                 budget: Budget | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 limits: RateLimits | None = None, rng: random.Random | None = None):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.spec = spec.with_tier(tier)
        self._key = api_key if api_key is not None else env_api_key(self.spec)
        self.budget = budget
        self.max_attempts = max_attempts
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.limits = limits or RateLimits(self.spec.limits)
        self._rng = rng or random.Random()
        self._mlx_lm = "mlx_lm_server" in self.spec.quirks
        headers = {"User-Agent": "mlx-distill", "Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = _http_client(self.spec, headers, timeout, transport)
        # Joined once: httpx would parse and join base_url and the path on every request.
        self._urls = {path: self._http.base_url.join(path)
                      for path in ("chat/completions", "completions")}
        self._counts: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._failures: collections.Counter[str] = collections.Counter()
        self._usd = {"spent": 0.0, "uncertain": 0.0}

    def __repr__(self) -> str:
        return (f"AsyncTeacherClient(teacher={self.spec.name!r}, model={self.spec.model!r}, "
                f"base_url={self.spec.base_url!r}, tier={self.spec.tier!r})")

    @property
    def stats(self) -> dict[str, Any]:
        """requests (HTTP attempts), completed, retries, rate_limited (429s), errors (per failed
        attempt, by reason), failures (requests given up, by reason), USD spent and the part of
        it charged at worst case for attempts whose billing is unknown."""
        return {**{k: self._counts[k] for k in ("requests", "completed", "retries",
                                                 "rate_limited", "stream_downgraded",
                                                 "usage_missing")},
                "errors": dict(self._errors), "failures": dict(self._failures),
                "usd_spent": self._usd["spent"], "usd_uncertain": self._usd["uncertain"]}

    def cost(self, completion: Completion) -> float:
        return self.spec.pricing.cost(completion.usage)

    def _check_top_logprobs(self, k: int | None) -> None:
        if k is None:
            return
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InvalidRequest(f"top_logprobs must be None or an integer >= 0, got {k!r}")
        if k > self.spec.max_top_logprobs:
            raise InvalidRequest(
                f"top_logprobs={k} exceeds teacher {self.spec.name}'s maximum of "
                f"{self.spec.max_top_logprobs} (max_top_logprobs in teachers.yaml)")
        if self._mlx_lm and k > 0:
            raise InvalidRequest(
                "mlx_lm.server reports the first entry of an unsorted top-k list instead of the "
                "sampled token when top_logprobs > 0; ask it for top_logprobs=0, or serve the "
                "model with `mlx-distill teacher serve` for top-k")

    async def chat(self, request: ChatRequest, *, stream: bool = False,
                   first_output: list[float] | None = None) -> Completion:
        """``first_output``: when streaming, gets the ``time.perf_counter()`` at which the
        answering attempt's first text, reasoning or tool-call chunk arrived (time to first
        token); left empty when nothing was streamed."""
        self._check_top_logprobs(request.top_logprobs)
        if stream and self._mlx_lm and request.top_logprobs is not None:
            stream = False
            self._counts["stream_downgraded"] += 1
        return await self._call("chat/completions", request.body(self.spec.model, stream=stream),
                                request, "chat", stream, first_output)

    async def complete(self, prompt: str, *, max_tokens: int | None = None,
                       temperature: float = 1.0, top_p: float = 1.0,
                       top_logprobs: int | None = None, echo: bool = False,
                       seed: int | None = None, stop: list[str] | None = None,
                       stream: bool = False, extra: dict[str, Any] | None = None) -> Completion:
        """``POST /completions`` with a plain prompt; ``echo`` also returns (and with
        ``top_logprobs`` scores) the prompt's own tokens."""
        request = CompletionRequest(prompt, max_tokens or self.spec.max_tokens, temperature,
                                    top_p, seed, stop, top_logprobs, echo, dict(extra or {}))
        return await self.complete_request(request, stream=stream)

    async def complete_request(self, request: CompletionRequest, *,
                               stream: bool = False) -> Completion:
        self._check_top_logprobs(request.top_logprobs)
        if self._mlx_lm and request.echo:
            raise InvalidRequest("mlx_lm.server does not support echo (prompt logprobs)")
        if stream and self._mlx_lm and request.top_logprobs is not None:
            stream = False
            self._counts["stream_downgraded"] += 1
        body = request.body(self.spec.model, stream=stream, bool_logprobs=self._mlx_lm)
        return await self._call("completions", body, request, "completions", stream)

    async def _call(self, path: str, body: dict[str, Any], request: Any, kind: str,
                    stream: bool, first_output: list[float] | None = None) -> Completion:
        prompt_bound, completion_bound = token_bounds(request)
        worst = self.spec.pricing.worst_case(request)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        for attempt in range(1, self.max_attempts + 1):
            reservation = self.budget.reserve(worst) if self.budget is not None else None
            charged: float | None = worst  # if cancelled mid-flight, assume the worst
            try:
                permit = await self.limits.acquire(prompt_bound + completion_bound)
            except BaseException:
                if reservation is not None:
                    self.budget.release(reservation)
                raise
            actual_tokens = None
            if first_output is not None:
                first_output.clear()  # a retried request's time counts from its last attempt
            try:
                self._counts["requests"] += 1
                completion = await self._send(path, payload, kind, stream, first_output)
            except _AttemptFailed as failure:
                charged = worst if failure.maybe_billed else None
                failed = failure
            else:
                charged = self.cost(completion)
                actual_tokens = completion.usage.total_tokens or None
                if not completion.usage.total_tokens and not self.spec.pricing.is_free:
                    self._counts["usage_missing"] += 1
                    charged = worst
                failed = None
            finally:
                self.limits.release(permit, actual_tokens)
                self._settle(reservation, charged, uncertain=actual_tokens is None)
            if failed is None:
                self._counts["completed"] += 1
                return completion
            self._errors[failed.reason] += 1
            if failed.status == 429:
                self._counts["rate_limited"] += 1
                if failed.retry_after is not None:
                    self.limits.pause(failed.retry_after)
            if not failed.retryable or attempt == self.max_attempts:
                self._failures[failed.reason] += 1
                raise RequestFailed(failed.reason, failed.message, attempts=attempt,
                                    status=failed.status) from None
            delay = self._rng.uniform(0, min(self.backoff_max_s,
                                             self.backoff_base_s * 2 ** (attempt - 1)))
            delay = max(delay, failed.retry_after or 0.0)
            self._counts["retries"] += 1
            log.info("teacher %s: %s (attempt %d/%d); retrying in %.2fs", self.spec.name,
                     failed.reason, attempt, self.max_attempts, delay)
            await self.limits.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _settle(self, reservation, charged: float | None, *, uncertain: bool) -> None:
        if charged is not None:
            self._usd["spent"] += charged
            if uncertain:
                self._usd["uncertain"] += charged
        if reservation is None:
            return
        if charged is None:
            self.budget.release(reservation)
        else:
            self.budget.commit(reservation, charged)

    async def _send(self, path: str, payload: bytes, kind: str, stream: bool,
                    first_output: list[float] | None = None) -> Completion:
        http, url = self._http, self._urls[path]
        try:
            if not stream:
                response = await http.post(url, content=payload)
                self._check_status(response, response.content)
                return self._parse(lambda: parse_response(response.content, kind))
            async with http.stream("POST", url, content=payload) as response:
                error_body = await response.aread() if response.status_code >= 300 else b""
                self._check_status(response, error_body)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    body = await response.aread()  # a server that ignored stream=true
                    return self._parse(lambda: parse_response(body, kind))
                accumulator = StreamAccumulator(kind, expect_usage=True)
                async for chunk in response.aiter_bytes():
                    self._parse(lambda c=chunk: accumulator.feed(c))
                    if first_output is not None and not first_output and accumulator.has_output:
                        first_output.append(time.perf_counter())
                return self._parse(accumulator.finish)
        except httpx.TransportError as exc:
            failure = _transport_failure(exc)
            failure.message = redact(failure.message, self._key)
            raise failure from None

    def _parse(self, parse):
        try:
            return parse()
        except WireError as exc:
            raise _AttemptFailed(exc.reason, redact(str(exc), self._key), retryable=exc.retryable,
                                 maybe_billed=True) from None

    def _check_status(self, response: httpx.Response, body: bytes) -> None:
        self.limits.observe(response.headers)
        status = response.status_code
        if status < 300:
            return
        raise _AttemptFailed(
            f"http_{status}", redact(error_message(body), self._key),
            retryable=status in RETRY_STATUSES or status >= 500, status=status,
            retry_after=parse_retry_after(response.headers.get("retry-after")))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class TeacherClient:
    """Blocking facade: runs an ``AsyncTeacherClient`` on a private event loop thread, so calls
    from several threads share one connection pool, one set of rate limits and one budget."""

    def __init__(self, spec: TeacherSpec, **kwargs: Any):
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client",
                                        daemon=True)
        self._thread.start()
        try:
            self._client = self._run(self._make(spec, kwargs))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(spec: TeacherSpec, kwargs: dict[str, Any]) -> AsyncTeacherClient:
        return AsyncTeacherClient(spec, **kwargs)  # built on its loop: primitives bind to it

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __repr__(self) -> str:
        return repr(self._client).replace("AsyncTeacherClient", "TeacherClient", 1)

    @property
    def spec(self) -> TeacherSpec:
        return self._client.spec

    @property
    def stats(self) -> dict[str, Any]:
        return self._client.stats

    def cost(self, completion: Completion) -> float:
        return self._client.cost(completion)

    def chat(self, request: ChatRequest, *, stream: bool = False,
             first_output: list[float] | None = None) -> Completion:
        return self._run(self._client.chat(request, stream=stream, first_output=first_output))

    def complete(self, prompt: str, **kwargs: Any) -> Completion:
        return self._run(self._client.complete(prompt, **kwargs))

    def complete_request(self, request: CompletionRequest, *, stream: bool = False) -> Completion:
        return self._run(self._client.complete_request(request, stream=stream))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.aclose())
        finally:
            self._stop_loop()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
