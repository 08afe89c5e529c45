"""The OpenAI-compatible backend: a teacher endpoint through ``TeacherClient`` (retries, rate
limits, API key from the environment), asked with ``stream: true``.

The logits stay on the server, so tool calls cannot be masked here: the request carries ``tools``
(and a non-default ``tool_choice`` / ``parallel_tool_calls``) for the server's own handling, and
every result says ``constrained: false``. ``TeacherClient`` hands back whole completions, so the
answer arrives as one event and per-token latencies are not observable. The time to first token
is: the client notes when the first streamed chunk with text, reasoning or a tool call arrives
(``ttft_s`` None only when the server did not stream). ``total_s`` is the request's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from mlx_distill.runtime.base import Backend, sampling_options, wants_constraint
from mlx_distill.runtime.types import BackendError, Event, Finished, GenerationResult, TokenEvent

TIMING_NOTE = ("whole completion from the teacher client: time to first token from the first "
               "streamed chunk with output, no per-token timing")


class OpenAIBackend(Backend):
    """``spec``: a ``TeacherSpec`` (``mlx_distill.teacher.config.load_teacher``)."""

    can_constrain = False

    def __init__(self, spec: Any, **client_options: Any):
        from mlx_distill.teacher.client import TeacherClient

        self.spec = spec
        self.client = TeacherClient(spec, **client_options)
        self.label = f"openai ({spec.model} at {spec.base_host})"

    def generate(self, messages, tools=None, *, max_tokens=256, temperature=0.0, top_p=1.0,
                 top_k=0, seed=None, stop=None, constrain_tools="auto", tool_choice="auto",
                 parallel_tool_calls=True) -> Iterator[Event]:
        from mlx_distill.teacher.types import ChatRequest

        sampling = sampling_options(max_tokens, temperature, top_p, top_k, seed, stop)
        wants_constraint(constrain_tools, tools, False, self.label)
        if sampling.top_k:
            raise BackendError("top_k: not an OpenAI API option; use top_p")
        if not isinstance(messages, list) or not messages:
            raise BackendError("messages: expected a non-empty list of chat messages")
        extra: dict[str, Any] = {}
        if tools and tool_choice != "auto":
            extra["tool_choice"] = tool_choice
        if tools and not parallel_tool_calls:
            extra["parallel_tool_calls"] = False
        request = ChatRequest(messages=messages, tools=tools or None,
                              max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, seed=sampling.seed,
                              stop=list(sampling.stop) or None, extra=extra)
        return self._events(request)

    def _events(self, request: Any) -> Iterator[Event]:
        from mlx_distill.teacher.errors import RequestFailed

        first_output: list[float] = []
        started = time.perf_counter()
        try:
            completion = self.client.chat(request, stream=True, first_output=first_output)
        except RequestFailed as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        elapsed = time.perf_counter() - started
        ttft = first_output[0] - started if first_output else None
        if completion.text:
            yield TokenEvent(completion.text, None, None, elapsed, elapsed)
        yield Finished(GenerationResult(
            backend=self.label, text=completion.text, content=completion.text,
            tool_calls=list(completion.tool_calls),
            finish_reason=completion.finish_reason or "stop",
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
            ttft_s=ttft, token_latencies_s=[], total_s=elapsed, constrained=False,
            notes=[TIMING_NOTE],
        ))

    def close(self) -> None:
        self.client.close()
