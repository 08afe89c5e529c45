"""``POST /v1/completions`` of the local teacher server: raw prompts, legacy logprobs, echo."""

from __future__ import annotations

import codecs
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mlx_distill.teacher.server_infer import Engine, Sampling, TokenScore
from mlx_distill.teacher.server_text import Delta, TextAssembler, joined
from mlx_distill.teacher.server_wire import JsonResponse, parse_completion, usage_dict

if TYPE_CHECKING:
    from mlx_distill.teacher.server_app import TeacherApp


class LegacyLogprobs:
    """Legacy logprobs blocks: {tokens, token_logprobs, top_logprobs: [{text: logprob}],
    text_offset, token_ids}; offsets count characters of the response text across blocks."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def block(self, ids: list[int], scores: list[TokenScore | None]) -> dict[str, list]:
        """``scores[i]`` is None for a token without a logprob (a prompt's first)."""
        engine = self._engine
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": [], "token_ids": []}
        for token_id, score in zip(ids, scores, strict=True):
            out["tokens"].append(engine.text_of(token_id))
            out["token_logprobs"].append(None if score is None else score.logprob)
            out["top_logprobs"].append(
                None if score is None else {engine.text_of(i): lp for i, lp in score.top}
            )
            out["text_offset"].append(self._offset)
            out["token_ids"].append(token_id)
            self._offset += len(self._utf8.decode(engine.token_bytes[token_id]))
        return out

    def tokens(self, scores: list[TokenScore]) -> dict[str, list]:
        return self.block([s.id for s in scores], list(scores))


class _Echo:
    """The echoed prompt: the first chunk of a streamed completion."""

    def __init__(self, text: str, logprobs: dict | None):
        self.text, self.logprobs = text, logprobs


async def completions(app: TeacherApp, request: Request) -> Response:
    engine = app.engine
    params = parse_completion(await app.read_body(request), app.max_top, engine.vocab_size)
    common, k = params.common, params.logprobs
    if isinstance(params.prompt, str):
        ids = await run_in_threadpool(engine.encode_prompt, params.prompt)
        prompt_text = params.prompt
    else:
        ids = params.prompt
        prompt_text = b"".join(engine.token_bytes[i] for i in ids).decode("utf-8", "replace")
    sampling = Sampling(app.budget(common, len(ids), "prompt"), common.temperature,
                        common.top_p, common.seed, k or 0)
    assembler = TextAssembler(engine.token_bytes, engine.eos_ids, common.stops, False)
    legacy = LegacyLogprobs(engine) if k is not None else None
    base = app.envelope("cmpl", "text_completion")
    usage_field = {"usage": None} if common.stream and common.include_usage else {}

    def echo() -> _Echo:
        """The echoed prompt and its logprobs (first token: null); runs on the model thread."""
        if not params.echo:
            return _Echo("", None)
        if legacy is None:
            return _Echo(prompt_text, None)
        scores = engine.score(ids, 1, k) if len(ids) > 1 else []
        return _Echo(prompt_text, legacy.block(ids, [None, *scores]))

    def chunk(text: str, logprobs: dict | None, finish: str | None) -> dict:
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice], **usage_field}

    if common.stream:
        def job(emit: Callable, cancel: threading.Event) -> int:
            if params.echo:
                emit(echo())
            return app.run_generation(ids, sampling, assembler, emit, cancel)

        def chunks(item: Delta | _Echo) -> list[dict]:
            if isinstance(item, _Echo):
                return [chunk(item.text, item.logprobs, None)]
            if not (item.text or item.finish_reason or (item.tokens and legacy)):
                return []
            logprobs = legacy.tokens(item.tokens) if legacy else None
            return [chunk(item.text, logprobs, item.finish_reason)]

        def tail(count: int) -> list[dict]:
            if not common.include_usage:
                return []
            return [{**base, "choices": [], "usage": usage_dict(len(ids), count)}]

        return app.stream(job, [], chunks, tail)

    def plain_job() -> tuple[_Echo, list[Delta], int]:
        echoed = echo()
        deltas: list[Delta] = []
        count = app.run_generation(ids, sampling, assembler, deltas.append, threading.Event())
        return echoed, deltas, count

    echoed, deltas, count = await app.on_model_thread(plain_job)
    out = joined(deltas)
    logprobs: dict[str, Any] | None = None
    if legacy is not None:
        logprobs = legacy.tokens(out.tokens)
        if echoed.logprobs is not None:
            logprobs = {key: echoed.logprobs[key] + logprobs[key] for key in logprobs}
    response = chunk(echoed.text + out.text, logprobs, out.finish_reason)
    response["usage"] = usage_dict(len(ids), count)
    return JsonResponse(response)
