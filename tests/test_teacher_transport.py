"""The client's aiohttp transport, against real loopback sockets: what each failure is called and
whether it is billed, proxies from the environment, compressed answers."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fake_teacher import FakeTeacher

from mlx_distill.teacher.budget import Budget
from mlx_distill.teacher.client import AsyncTeacherClient
from mlx_distill.teacher.config import Pricing, load_teacher
from mlx_distill.teacher.errors import RequestFailed
from mlx_distill.teacher.types import ChatRequest

PRICED = Pricing(input_cache_hit=1.0, input_cache_miss=4.0, output=16.0)
REQUEST = ChatRequest([{"role": "user", "content": "hello"}], max_tokens=8, top_logprobs=2)


def ask(base_url: str, **kwargs):
    spec = dataclasses.replace(load_teacher(base_url, model="fake"), pricing=PRICED)

    async def go():
        async with AsyncTeacherClient(spec, backoff_base_s=0.01, backoff_max_s=0.02,
                                      timeout=httpx.Timeout(5.0), **kwargs) as client:
            try:
                return await client.chat(REQUEST)
            except RequestFailed as exc:
                return exc

    return asyncio.run(go())


class _Server:
    """A ThreadingHTTPServer on loopback with one handler class; records request lines."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.lines: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.lines = self.lines
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> _Server:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, **headers: str) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.lines.append(self.requestline)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)


def test_a_refused_connection_is_a_connect_error_and_is_never_billed():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    budget = Budget(1.0)
    error = ask(f"http://127.0.0.1:{port}/v1", budget=budget, max_attempts=2)
    assert isinstance(error, RequestFailed) and (error.reason, error.attempts) == ("connect_error",
                                                                                   2)
    assert budget.spent == 0.0 and budget.reserved == 0.0


def test_a_garbled_http_answer_is_retried_and_billed_at_worst_case():
    """Not HTTP at all after the request went out: the server may have billed it."""
    listener = socket.create_server(("127.0.0.1", 0))
    answered = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                answered.append(1)

    threading.Thread(target=serve, daemon=True).start()
    budget = Budget(1.0)
    try:
        error = ask(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", budget=budget,
                    max_attempts=2)
    finally:
        listener.close()
    assert isinstance(error, RequestFailed) and error.attempts == 2 and len(answered) == 2
    assert error.reason == "connection_reset" and "ClientResponseError" in error.message
    assert budget.spent == pytest.approx(2 * PRICED.worst_case(REQUEST))


class _Proxy(_Quiet):
    def do_POST(self):  # noqa: N802
        self.reply(503, b'{"error": {"message": "proxy says no"}}',
                   Content_Type="application/json")


def test_proxies_come_from_the_environment_as_with_httpx(monkeypatch):
    with _Server(_Proxy) as proxy, FakeTeacher() as teacher:
        # The teacher's address is 127.0.0.1; "localhost" names it too but is not bypassed.
        target = teacher.base_url.replace("127.0.0.1", "localhost")
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/v1"))
        monkeypatch.setenv("http_proxy", proxy.url.removesuffix("/v1"))
        error = ask(target, max_attempts=1)
        assert isinstance(error, RequestFailed) and error.status == 503
        assert "proxy says no" in str(error)
        assert proxy.lines == [f"POST {target}/chat/completions HTTP/1.1"]  # absolute form

        monkeypatch.setenv("NO_PROXY", "localhost")
        monkeypatch.setenv("no_proxy", "localhost")
        completion = ask(target)
        assert completion.text and len(proxy.lines) == 1 and teacher.answered_count == 1


class _Gzip(_Quiet):
    def do_POST(self):  # noqa: N802
        body = {"id": "x", "model": "fake", "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "zipped"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        self.reply(200, gzip.compress(json.dumps(body).encode()),
                   Content_Type="application/json", Content_Encoding="gzip")


@pytest.mark.parametrize("stream", [False, True])
def test_compressed_answers_are_decoded(stream):
    with _Server(_Gzip) as server:
        spec = load_teacher(server.url, model="fake")

        async def go():
            async with AsyncTeacherClient(spec) as client:
                return await client.chat(REQUEST, stream=stream)

        completion = asyncio.run(go())
    assert completion.text == "zipped" and completion.usage.total_tokens == 4
