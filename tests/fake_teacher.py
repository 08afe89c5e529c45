"""A deterministic OpenAI-compatible teacher on loopback, with seeded fault injection.

Every answer is a pure function of the request body (messages, tools, sampling parameters; not
``model``/``stream``), so streamed and non-streamed answers to the same body carry the same text,
logprobs, tool calls and usage. Top-k alternatives are emitted deliberately unsorted.

Faults (probability per accepted POST, one seeded draw each; with concurrent clients the draw order
follows arrival order): ``429`` (Retry-After), ``500``/``502``/``503``, ``stall`` (no answer for
``stall_s``, then the connection is closed), ``reset`` (TCP RST after half the response),
``truncated_sse`` (a stream that ends cleanly at the HTTP level but without finish_reason or
``[DONE]``; a non-streamed body cut short before its Content-Length), ``bad_json`` (200 with a
malformed JSON body or SSE event).

CLI: ``python tests/fake_teacher.py --port 0 --delay 0.1 --fault 429=0.1`` prints
``URL http://127.0.0.1:PORT/v1`` as its first stdout line and serves until killed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fake_teacher_answers import Answer, Renderer

FAULT_KINDS = ("429", "500", "502", "503", "stall", "reset", "truncated_sse", "bad_json")
MAX_TOP_LOGPROBS = 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
        # the peer's delayed ACK add ~40 ms to every keep-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass  # quiet: hundreds of requests per test

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        self._send_json(status, {"error": {"message": message, "type": kind}}, headers)

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.fake.model, "object": "model", "owned_by": "fake"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        fake._record(body)
        if fake.api_key is not None:
            if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                return self._error(401, "Invalid Authentication")
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return self._error(404, f"no route {self.path}")
        completions = path == "/v1/completions"
        problem = self._invalid(body, completions)
        if problem:
            return self._error(400, problem)
        fault = fake._draw_fault()
        if fake._stop.wait(fake.delay_s):
            return self._reset()
        stream = bool(body.get("stream"))
        if fault in ("429", "500", "502", "503"):
            headers = {"Retry-After": f"{fake.retry_after_s:g}"} if fault == "429" else None
            return self._error(int(fault), f"fake fault: {fault}", headers)
        if fault == "stall":
            fake._stop.wait(fake.stall_s)
            self.close_connection = True
            return None
        answer = Answer(body, fake.model, completions)
        renderer = Renderer(answer, fake.model, fake.fingerprint)
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = (renderer.completions_events if completions else renderer.chat_events)(
                include_usage)
            return self._stream(events, fault)
        payload = renderer.completions_body() if completions else renderer.chat_body()
        data = json.dumps(payload, ensure_ascii=False).encode()
        if fault in ("reset", "truncated_sse", "bad_json"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data) if fault != "bad_json"
                                                   else len(data) // 2))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            if fault == "reset":
                return self._reset()
            self.close_connection = fault == "truncated_sse"
            return None
        self._send_json(200, data, fake.extra_headers)
        fake._answered()
        return None

    @staticmethod
    def _invalid(body: Any, completions: bool) -> str | None:
        if not isinstance(body, dict):
            return "request body must be a JSON object"
        if completions and not isinstance(body.get("prompt"), (str, list)):
            return "prompt: required (a string)"
        if not completions and not isinstance(body.get("messages"), list):
            return "messages: required (a list)"
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return f"max_tokens must be a positive integer, got {max_tokens!r}"
        top = body.get("logprobs") if completions else body.get("top_logprobs")
        if top is not None and not isinstance(top, bool) and not 0 <= top <= MAX_TOP_LOGPROBS:
            return f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top!r}"
        return None

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _stream(self, events: list[dict[str, Any]], fault: str | None) -> None:
        fake = self.server.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in fake.extra_headers.items():
            self.send_header(key, value)
        self.end_headers()
        lines = [f"data: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in events]
        lines.append(b"data: [DONE]\n\n")
        if fault == "bad_json":
            lines.insert(1, b'data: {"choices": [{"delta": {"content": "cut\n\n')
        cut = max(1, (len(lines) - 3) // 2)
        for i, line in enumerate(lines):
            if fault in ("reset", "truncated_sse") and i == cut:
                if fault == "reset":
                    return self._reset()
                self.wfile.write(b"0\r\n\r\n")  # a clean HTTP end, but no finish_reason/[DONE]
                return None
            self._chunk(line)
        self.wfile.write(b"0\r\n\r\n")
        if fault is None:
            fake._answered()
        return None

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its read timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    fake: FakeTeacher


class FakeTeacher:
    """Deterministic OpenAI-compatible teacher on 127.0.0.1; a context manager.

    Besides the counters: ``request_times`` (time.monotonic() of each POST's arrival, for rate
    checks) and ``injected`` (a Counter of the faults drawn). ``stall_s``: how long a "stall"
    holds the request; ``retry_after_s``: the Retry-After sent with a 429; ``extra_headers``:
    added to every successful answer (e.g. x-ratelimit-*); ``port``: 0 picks a free one.
    A model id containing "thinking" makes chat answers carry reasoning_content.
    """

    def __init__(self, *, delay_s: float = 0.0, faults: dict[str, float] | None = None,
                 fault_seed: int = 0, model: str = "fake-teacher", api_key: str | None = None,
                 stall_s: float = 3.0, retry_after_s: float = 0.05,
                 extra_headers: dict[str, str] | None = None, port: int = 0):
        faults = dict(faults or {})
        unknown = sorted(set(faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; expected some of {FAULT_KINDS}")
        if any(not 0 <= p <= 1 for p in faults.values()) or sum(faults.values()) > 1 + 1e-9:
            raise ValueError(f"fault probabilities must be in [0, 1] and sum to <= 1: {faults}")
        self.delay_s = delay_s
        self.faults = faults
        self.fault_seed = fault_seed
        self.model = model
        self.api_key = api_key
        self.stall_s = stall_s
        self.retry_after_s = retry_after_s
        self.extra_headers = dict(extra_headers or {})
        self.fingerprint = "fp_" + hashlib.sha256(model.encode()).hexdigest()[:10]
        self._port = port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self.reset_counts()

    def reset_counts(self) -> None:
        """Zero the counters and restart the fault sequence from ``fault_seed``."""
        with self._lock:
            self._rng = random.Random(self.fault_seed)
            self.request_count = 0
            self.answered_count = 0
            self.requests: list[dict] = []
            self.request_times: list[float] = []  # time.monotonic() of each POST's arrival
            self.injected: collections.Counter[str] = collections.Counter()

    def _record(self, body: Any) -> None:
        with self._lock:
            self.request_count += 1
            self.request_times.append(time.monotonic())
            self.requests.append(body if isinstance(body, dict) else {"_invalid_body": True})

    def _draw_fault(self) -> str | None:
        with self._lock:
            u = self._rng.random()
            for kind in FAULT_KINDS:
                u -= self.faults.get(kind, 0.0)
                if u < 0:
                    self.injected[kind] += 1
                    return kind
            return None

    def _answered(self) -> None:
        with self._lock:
            self.answered_count += 1

    def start(self) -> FakeTeacher:
        self._stop.clear()
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.fake = self
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled and delayed handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeTeacher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_fault(text: str) -> tuple[str, float]:
    kind, sep, prob = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: expected KIND=PROBABILITY")
    try:
        return kind, float(prob)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: {prob!r} is not a number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fault", type=_parse_fault, action="append", default=[],
                        help=f"KIND=PROBABILITY, KIND in {', '.join(FAULT_KINDS)} (repeatable)")
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--stall", type=float, default=3.0, help="seconds a 'stall' fault lasts")
    parser.add_argument("--model", default="fake-teacher")
    parser.add_argument("--api-key-env", default=None,
                        help="require 'Authorization: Bearer $VAR' (the key never goes on argv)")
    args = parser.parse_args(argv)
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    fake = FakeTeacher(delay_s=args.delay, faults=dict(args.fault), fault_seed=args.fault_seed,
                       model=args.model, api_key=api_key, stall_s=args.stall, port=args.port)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with fake:
        print(f"URL {fake.base_url}", flush=True)
        try:
            stopped.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
