"""An httpx transport that sends requests through aiohttp.

The client speaks httpx (requests, responses, timeouts, errors); this transport moves the bytes
with aiohttp, whose connection pool and HTTP parser are written in C. On this 2-core box, against a
loopback teacher answering in 100 ms at concurrency 32, a bare client spent 2.27 ms of CPU per
request through httpx's own transport and 1.35-1.48 ms through this one (``benchmarks/
teacher_throughput.py`` has the end-to-end figures).

httpx-aiohttp does the same, but maps every ``ClientConnectionError`` (a server disconnecting
mid-answer, a socket reset while reading) to ``httpx.ConnectTimeout``, and leaves a malformed
response as an aiohttp error. The client's budget reads a connect failure as "never sent, never
billed", so the errors here keep that distinction: only failures to connect, or to get a
connection within the pool timeout, become ``ConnectError``/``ConnectTimeout``; everything after
the request may have reached the server becomes a read or protocol error.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import httpx

try:  # libuv's event loop: measured 0.2 ms less CPU per request than asyncio's own
    import uvloop
except ImportError:  # not built for Windows
    uvloop = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop the teacher client runs on: uvloop's where it is installed."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


# First match wins: subclasses come before their bases.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),  # connect, or waiting for the pool
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS handshake
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # body cut short
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not a valid HTTP response
    (aiohttp.ClientOSError, httpx.ReadError),
)


def _httpx_error(exc: aiohttp.ClientError) -> httpx.TransportError:
    kind = next((h for a, h in _ERRORS if isinstance(exc, a)), httpx.TransportError)
    return kind(f"{type(exc).__name__}: {exc}".rstrip(": "))


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        self._response.release()  # back to the pool when read to the end, closed otherwise


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``max_connections`` open at most, ``verify``: an SSL context for https (False: plain
    http only). Proxies come from the environment (HTTP(S)_PROXY, NO_PROXY) as with httpx, looked
    up once per origin: aiohttp's ``trust_env`` looks them (and ~/.netrc) up on every request,
    which cost 0.5 ms of CPU each.

    The aiohttp session is made on the first request, inside the event loop that runs it."""

    def __init__(self, *, max_connections: int, verify: ssl.SSLContext | bool = True,
                 keepalive_expiry_s: float = 5.0):
        self._max_connections, self._verify = max_connections, verify
        self._keepalive_expiry_s = keepalive_expiry_s
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _make_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                         ssl=self._verify,
                                         keepalive_timeout=self._keepalive_expiry_s)
        # httpx decodes content-encoding itself (and has already set every header).
        return aiohttp.ClientSession(connector=connector, auto_decompress=False)

    def _proxy(self, url: httpx.URL) -> str | None:
        origin = (url.scheme, url.host)
        if origin not in self._proxies:
            # The environment only, as httpx reads it (not macOS's system settings).
            proxies = urllib.request.getproxies_environment()
            proxy = proxies.get(url.scheme) or proxies.get("all")
            if proxy and urllib.request.proxy_bypass_environment(url.host, proxies):
                proxy = None
            self._proxies[origin] = proxy
        return self._proxies[origin]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._make_session()
        timeout = request.extensions.get("timeout", {})
        connect, pool = timeout.get("connect"), timeout.get("pool")
        body = await request.aread()
        try:
            response = await self._session.request(
                request.method, str(request.url), headers=request.headers.multi_items(),
                data=body or None, allow_redirects=False, proxy=self._proxy(request.url),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_read=timeout.get("read"), sock_connect=connect,
                    # aiohttp's connect timeout covers waiting for a pooled connection too.
                    connect=None if connect is None or pool is None else connect + pool))
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc) from exc
        return httpx.Response(
            status_code=response.status, headers=response.raw_headers,
            stream=_ResponseStream(response), request=request,
            extensions={"http_version": b"HTTP/1.1",
                        "reason_phrase": (response.reason or "").encode("latin-1", "replace")})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
