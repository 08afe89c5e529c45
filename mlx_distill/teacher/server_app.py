"""The local teacher server's HTTP side: Starlette routes, OpenAI response shapes and SSE.

Endpoints and wire formats are documented in :mod:`mlx_distill.teacher.server`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mlx_distill.teacher import server_legacy
from mlx_distill.teacher.server_infer import Engine, Sampling, TokenScore
from mlx_distill.teacher.server_text import Delta, TextAssembler, joined
from mlx_distill.teacher.server_wire import (
    ApiError,
    ChatParams,
    Common,
    JsonResponse,
    first_line,
    parse_chat,
    parse_score,
    sse,
    usage_dict,
)

_END = object()  # end of a streamed generation


class TeacherApp:
    """Route handlers around one :class:`Engine`; all model work runs on one worker thread."""

    def __init__(self, engine: Engine, max_top_logprobs: int = 20):
        self.engine = engine
        self.max_top = max_top_logprobs
        self.created = int(time.time())
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="mlx-teacher")

    def starlette(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            yield
            self._model_thread.shutdown(wait=False, cancel_futures=True)

        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/score", self.score, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        handlers = {ApiError: self._api_error, HTTPException: self._http_error,
                    Exception: self._server_error}
        app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
        app.state.engine = self.engine  # for in-process users: model, tokenizer, lock
        return app

    # ---- errors ----

    async def _api_error(self, _request: Request, exc: ApiError) -> Response:
        return JsonResponse(exc.body(), status_code=exc.status)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ApiError(message, status=exc.status_code, kind=kind)
        return JsonResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        error = ApiError(f"internal error: {first_line(exc)}", status=500, kind="server_error")
        return await self._api_error(request, error)

    # ---- helpers ----

    async def read_body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"request body: invalid JSON ({first_line(exc)})") from None
        if not isinstance(body, dict):
            raise ApiError("request body: expected a JSON object")
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError("model: expected a string", "model")
        return body

    async def on_model_thread(self, fn: Callable, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, functools.partial(fn, *args))

    def _chat_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        if not self.engine.has_chat_template:
            raise ApiError(f"messages: model {self.engine.model_id} has no chat template; "
                           "use /v1/completions with a raw prompt", "messages")
        try:
            text = self.engine.render_chat(messages, tools)
        except Exception as exc:  # jinja2 errors, raise_exception() in the template, bad types
            raise ApiError(f"messages: the chat template cannot render them "
                           f"({first_line(exc)})", "messages") from None
        return self.engine.encode(text)

    def budget(self, common: Common, prompt_len: int, prompt_param: str) -> int:
        """max_tokens after checking prompt + max_tokens fits the context window."""
        ctx = self.engine.context_length
        if prompt_len > ctx or (common.max_tokens is None and prompt_len >= ctx):
            raise ApiError(f"{prompt_param}: the prompt is {prompt_len} tokens; this model's "
                           f"context is {ctx} tokens", prompt_param,
                           code="context_length_exceeded")
        if common.max_tokens is None:
            return ctx - prompt_len
        if prompt_len + common.max_tokens > ctx:
            raise ApiError(f"max_tokens: the prompt is {prompt_len} tokens and max_tokens is "
                           f"{common.max_tokens}, more than this model's context of {ctx} "
                           "tokens", "max_tokens", code="context_length_exceeded")
        return common.max_tokens

    def run_generation(self, ids: list[int], sampling: Sampling, assembler: TextAssembler,
                       emit: Callable[[Delta], None], cancel: threading.Event) -> int:
        """Generate into ``emit``; returns how many tokens the model produced (eos included)."""
        count = 0
        tokens = self.engine.generate(ids, sampling)
        try:
            for token in tokens:
                count += 1
                delta = assembler.add(token)
                if delta is not None:
                    emit(delta)
                if assembler.done or cancel.is_set():
                    break
        finally:
            tokens.close()
        if not assembler.done:
            emit(assembler.finish("length"))
        return count

    def stream(self, job: Callable, head: list[dict], chunks: Callable[[Any], list[dict]],
               tail: Callable[[int], list[dict]]) -> StreamingResponse:
        """SSE of ``head``, the chunks of each item ``job(emit, cancel)`` emits (on the model
        thread), ``tail(count)`` and ``[DONE]``. A client that goes away cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def work() -> int:
            try:
                return job(put, cancel)
            finally:
                put(_END)

        future = loop.run_in_executor(self._model_thread, work)

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in head:
                    yield sse(chunk)
                while (item := await queue.get()) is not _END:
                    for chunk in chunks(item):
                        yield sse(chunk)
                try:
                    count = await future
                except Exception as exc:  # the 200 header is sent: report the error in-band
                    yield sse(ApiError(f"internal error: {first_line(exc)}",
                                       status=500, kind="server_error").body())
                else:
                    for chunk in tail(count):
                        yield sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ---- token presentation ----

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        data = self.engine.token_bytes[token_id]
        return {"token": self.engine.text_of(token_id), "logprob": logprob, "bytes": list(data),
                "id": token_id}

    def _chat_entry(self, score: TokenScore) -> dict[str, Any]:
        entry = self._entry(score.id, score.logprob)
        entry["top_logprobs"] = [self._entry(i, lp) for i, lp in score.top]
        return entry

    def _prompt_logprobs(self, scores: list[TokenScore]) -> list[dict | None]:
        """vLLM's layout: null for the first token, then {id: {logprob, rank, decoded_token}}
        holding the prompt token and the top-k."""
        out: list[dict | None] = [None]
        for score in scores:
            position = {str(score.id): {"logprob": score.logprob, "rank": score.rank,
                                        "decoded_token": self.engine.text_of(score.id)}}
            for rank, (i, lp) in enumerate(score.top, start=1):
                position.setdefault(str(i), {"logprob": lp, "rank": rank,
                                             "decoded_token": self.engine.text_of(i)})
            out.append(position)
        return out

    def envelope(self, prefix: str, kind: str) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.engine.model_id, "system_fingerprint": self.engine.fingerprint}

    # ---- routes ----

    async def health(self, _request: Request) -> Response:
        return JsonResponse({"status": "ok", "model": self.engine.model_id})

    async def models(self, _request: Request) -> Response:
        card = {"id": self.engine.model_id, "object": "model", "created": self.created,
                "owned_by": "mlx-distill", "max_model_len": self.engine.context_length}
        return JsonResponse({"object": "list", "data": [card]})

    async def chat(self, request: Request) -> Response:
        params = parse_chat(await self.read_body(request), self.max_top)
        ids = await run_in_threadpool(self._chat_ids, params.messages, params.tools)
        common = params.common
        sampling = Sampling(self.budget(common, len(ids), "messages"), common.temperature,
                            common.top_p, common.seed, params.top_logprobs)

        def assembler() -> TextAssembler:
            return TextAssembler(self.engine.token_bytes, self.engine.eos_ids, common.stops,
                                 params.parse_tool_calls)

        if common.stream:
            return self._chat_stream(params, ids, sampling, assembler())

        def job() -> tuple[list[Delta], int, list[TokenScore] | None]:
            prompt_scores = None
            if params.prompt_logprobs is not None and len(ids) > 1:
                prompt_scores = self.engine.score(ids, 1, params.prompt_logprobs, rank=True)
            deltas: list[Delta] = []
            cancel = threading.Event()  # never set: the response is sent only when complete
            count = self.run_generation(ids, sampling, assembler(), deltas.append, cancel)
            return deltas, count, prompt_scores

        deltas, count, prompt_scores = await self.on_model_thread(job)
        out = joined(deltas)
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.tool_calls:
            message["content"] = out.text or None
            message["tool_calls"] = [c.to_dict() for c in out.tool_calls]
        logprobs = ({"content": [self._chat_entry(t) for t in out.tokens]}
                    if params.logprobs else None)
        response = self.envelope("chatcmpl", "chat.completion")
        response["choices"] = [{"index": 0, "message": message, "logprobs": logprobs,
                                "finish_reason": out.finish_reason}]
        response["usage"] = usage_dict(len(ids), count)
        if params.prompt_logprobs is not None:
            response["prompt_logprobs"] = self._prompt_logprobs(prompt_scores or [])
        return JsonResponse(response)

    def _chat_stream(self, params: ChatParams, ids: list[int], sampling: Sampling,
                     assembler: TextAssembler) -> StreamingResponse:
        base = self.envelope("chatcmpl", "chat.completion.chunk")
        usage_field = {"usage": None} if params.common.include_usage else {}

        def chunk(delta: dict, logprobs: Any = None, finish: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**base, "choices": [choice], **usage_field}

        def chunks(d: Delta) -> list[dict]:
            out = []
            if d.text or (d.tokens and params.logprobs):
                logprobs = ({"content": [self._chat_entry(t) for t in d.tokens]}
                            if params.logprobs else None)
                out.append(chunk({"content": d.text}, logprobs))
            if d.tool_calls:
                calls = [{"index": i, **c.to_dict()} for i, c in enumerate(d.tool_calls)]
                out.append(chunk({"tool_calls": calls}))
            if d.finish_reason:
                out.append(chunk({}, finish=d.finish_reason))
            return out

        def tail(count: int) -> list[dict]:
            if not params.common.include_usage:
                return []
            return [{**base, "choices": [], "usage": usage_dict(len(ids), count)}]

        def job(emit: Callable, cancel: threading.Event) -> int:
            return self.run_generation(ids, sampling, assembler, emit, cancel)

        head = [chunk({"role": "assistant", "content": ""})]
        return self.stream(job, head, chunks, tail)

    async def completions(self, request: Request) -> Response:
        return await server_legacy.completions(self, request)

    async def score(self, request: Request) -> Response:
        params = parse_score(await self.read_body(request), self.max_top, self.engine.vocab_size)
        prompt_ids = await run_in_threadpool(self._chat_ids, params.messages, params.tools)
        completion_ids = params.completion_ids
        if completion_ids is None:
            completion_ids = await run_in_threadpool(self.engine.encode, params.completion)
        total = len(prompt_ids) + len(completion_ids)
        if total > self.engine.context_length:
            raise ApiError(f"completion: prompt ({len(prompt_ids)} tokens) and completion "
                           f"({len(completion_ids)} tokens) exceed this model's context of "
                           f"{self.engine.context_length} tokens",
                           "completion" if params.completion_ids is None else "completion_ids",
                           code="context_length_exceeded")
        scores = await self.on_model_thread(
            self.engine.score, prompt_ids + completion_ids, len(prompt_ids), params.top_logprobs
        )
        return JsonResponse({
            "object": "score",
            "model": self.engine.model_id,
            "system_fingerprint": self.engine.fingerprint,
            "tokens": [self._chat_entry(s) for s in scores],
            "logprob": sum(s.logprob for s in scores),
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(completion_ids),
                      "total_tokens": total},
        })
