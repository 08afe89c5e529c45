"""The generation interface every backend implements, and the part shared by the backends that
hold logits (MLX, Core ML): templating, the tool-call mask, detokenizing, stop strings, timing."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from mlx_distill.runtime.types import (
    BackendError,
    Event,
    Finished,
    GenerationResult,
    Sampling,
    TokenEvent,
    split_tool_calls,
)

CONSTRAIN_CHOICES = (True, False, "auto")
# Compiled grammars kept per backend: an eval reuses one tool list for many requests.
GRAMMAR_CACHE_SIZE = 32


class Backend(ABC):
    """One generation interface over MLX, Core ML and OpenAI-compatible endpoints.

    ``generate`` streams :class:`TokenEvent` s and ends with one :class:`Finished` holding the
    :class:`GenerationResult`. Options: ``max_tokens``, ``temperature`` (0: greedy), ``top_p``,
    ``top_k`` (0: off), ``seed``, ``stop`` strings; ``tool_choice`` ("auto", "required", "none" or
    ``{"type": "function", "function": {"name": ...}}``) and ``parallel_tool_calls`` as in
    OpenAI's API; ``constrain_tools``: True to require the JSON-schema token mask on tool calls
    (an error where the backend cannot apply one), False to never apply it, "auto" to apply it
    where possible. Bad options raise :class:`BackendError` when ``generate`` is called.
    """

    label: str = ""
    # Whether the backend holds the logits, so it can mask them.
    can_constrain: bool = False

    @abstractmethod
    def generate(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        constrain_tools: bool | str = "auto",
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = True,
    ) -> Iterator[Event]:
        """Stream the answer to ``messages`` (OpenAI chat format) given ``tools``."""

    def run(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
            **options: Any) -> GenerationResult:
        """The final result of :meth:`generate` (same arguments)."""
        return final_result(self.generate(messages, tools, **options))

    def close(self) -> None:
        """Release what the backend holds (connections); it cannot be used afterwards."""
        return None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"


def final_result(events: Iterator[Event]) -> GenerationResult:
    """Consume a generation stream; its :class:`Finished` result."""
    for event in events:
        if isinstance(event, Finished):
            return event.result
    raise AssertionError("a generation stream always ends with Finished")


def sampling_options(max_tokens: int, temperature: float, top_p: float, top_k: int,
                     seed: int | None, stop: str | Sequence[str] | None) -> Sampling:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Sampling(max_tokens, temperature, top_p, top_k, seed, stops)


def wants_constraint(constrain_tools: Any, tools: list | None, can_constrain: bool,
                     label: str) -> bool:
    """Whether to mask: see :class:`Backend`. Raises when True cannot be honoured."""
    if not any(constrain_tools is c if isinstance(c, bool) else constrain_tools == c
               for c in CONSTRAIN_CHOICES):
        raise BackendError(f"constrain_tools: expected True, False or 'auto', "
                           f"got {constrain_tools!r}")
    if constrain_tools is False:
        return False
    if constrain_tools is True and not tools:
        raise BackendError("constrain_tools=True: the request has no tools to constrain to")
    if constrain_tools is True and not can_constrain:
        raise BackendError(f"constrain_tools=True: {label} does not expose logits, so tool "
                           "calls cannot be constrained client-side; use 'auto' or False")
    return bool(tools) and can_constrain


class LocalBackend(Backend):
    """A backend that computes logits here: subclasses provide :meth:`_tokens`."""

    can_constrain = True

    def __init__(self, tokenizer: Any, vocab_size: int, label: str):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.label = label
        eos = getattr(tokenizer, "eos_token_ids", None)
        if eos is None:  # a plain transformers tokenizer rather than mlx-lm's wrapper
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = set(eos)
        self._grammars: OrderedDict[str, Any] = OrderedDict()

    # ---- what subclasses provide ----
    @abstractmethod
    def _tokens(self, ids: list[int], sampling: Sampling, mask: Any,
                limit: int) -> Iterator[tuple[int, float]]:
        """Yield ``limit`` (token id, logprob) pairs at most, lazily: the consumer may stop
        early. With a ``mask`` (:class:`~mlx_distill.runtime.constrain.TokenMask`), sample only
        among ``mask.allowed()`` and call ``mask.advance(token)`` before yielding it. Logprobs
        are of the model's raw distribution (before mask, temperature, top-p/top-k)."""

    def _room(self, prompt_tokens: int) -> int | None:
        """Most tokens the backend can generate after a prompt this long (None: no limit)."""
        return None

    def _prompt_notes(self, prompt_tokens: int) -> list[str]:
        return []

    # ---- the request ----
    def prompt_ids(self, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The chat template applied to ``messages`` and ``tools``, generation prompt added."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise BackendError(f"{self.label}: the tokenizer has no chat template; use "
                               "generate_ids with token ids")
        if not isinstance(messages, list) or not messages:
            raise BackendError("messages: expected a non-empty list of chat messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools or None,
                                                     add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja raises many kinds; one line for the user
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"messages: the chat template cannot render them ({reason})") \
                from None
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def generate(self, messages, tools=None, **options) -> Iterator[Event]:
        started = time.perf_counter()
        return self._start(self.prompt_ids(messages, tools), tools, started, **options)

    def generate_ids(self, prompt_ids: Sequence[int], tools: list[dict[str, Any]] | None = None,
                     **options: Any) -> Iterator[Event]:
        """As :meth:`generate` (same options), from an already templated prompt; ``tools`` only
        shape the mask here."""
        return self._start(prompt_ids, tools, time.perf_counter(), **options)

    def _start(
        self,
        prompt_ids: Sequence[int],
        tools: list[dict[str, Any]] | None,
        started: float,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        constrain_tools: bool | str = "auto",
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = True,
    ) -> Iterator[Event]:
        # Checked here, not at the first next(): bad requests fail where generate() is called.
        sampling = sampling_options(max_tokens, temperature, top_p, top_k, seed, stop)
        ids = self._check_prompt(prompt_ids)
        mask = None
        if wants_constraint(constrain_tools, tools, self.can_constrain, self.label):
            mask = self._grammar(tools, tool_choice, parallel_tool_calls).mask()
        room = self._room(len(ids))
        limit = sampling.max_tokens if room is None else min(sampling.max_tokens, room)
        tokens = self._tokens(ids, sampling, mask, limit)
        setup_s = time.perf_counter() - started  # templating and grammar, before iteration
        return self._events(tokens, ids, sampling, mask, limit, setup_s)

    def run_ids(self, prompt_ids: Sequence[int], tools: list[dict[str, Any]] | None = None,
                **options: Any) -> GenerationResult:
        """The final result of :meth:`generate_ids` (same arguments)."""
        return final_result(self.generate_ids(prompt_ids, tools, **options))

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise BackendError("prompt is empty: nothing to condition the generation on")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BackendError(f"prompt token id {bad} is outside the model vocabulary "
                               f"(0..{self.vocab_size - 1})")
        return ids

    def _grammar(self, tools, tool_choice, parallel_tool_calls: bool):
        from mlx_distill.runtime.constrain import ToolGrammar
        from mlx_distill.teacher.types import canonical_json

        try:
            key = canonical_json([tools, tool_choice, bool(parallel_tool_calls)])
        except (TypeError, ValueError):
            raise BackendError("tools/tool_choice: expected JSON values") from None
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = ToolGrammar(self.tokenizer, self.vocab_size, tools, tool_choice,
                                  parallel_tool_calls)
            self._grammars[key] = grammar
            while len(self._grammars) > GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        return grammar

    def _events(self, tokens: Iterator[tuple[int, float]], ids: list[int], sampling: Sampling,
                mask: Any, limit: int, setup_s: float) -> Iterator[Event]:
        from mlx_distill.generate import _find_stop, _held_back
        from mlx_distill.tokenizer import streaming_detokenizer

        # The clock runs from the first next(), plus the setup already spent: a consumer that
        # starts iterating late does not inflate the time to first token.
        started = time.perf_counter() - setup_s
        detokenizer = streaming_detokenizer(self.tokenizer)
        stops = list(sampling.stop)
        pieces: list[str] = []
        sampled: list[int] = []
        latencies: list[float] = []
        pending, finish, previous, first = "", "length", started, None
        for n, (token, logprob) in enumerate(tokens, start=1):
            now = time.perf_counter()
            sampled.append(token)
            is_eos = token in self.eos_ids
            if not is_eos:  # the end-of-turn token ends the text; it is never decoded
                detokenizer.add_token(token)
            last = is_eos or n == limit
            if last:
                detokenizer.finalize()
            pending += detokenizer.last_segment
            cut = _find_stop(pending, stops) if stops else -1
            if cut >= 0:
                text, last, finish = pending[:cut], True, "stop"
            elif last:
                text, finish = pending, "stop" if is_eos else "length"
            else:
                keep = _held_back(pending, stops) if stops else 0
                text, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            pieces.append(text)
            if n == 1:
                first = now - started
            else:
                latencies.append(now - previous)
            yield TokenEvent(text, token, logprob, now - started, now - previous)
            previous = now
            if last:
                break
        total = time.perf_counter() - started
        content, calls, finish = split_tool_calls("".join(pieces), finish)
        yield Finished(GenerationResult(
            backend=self.label, text="".join(pieces), content=content, tool_calls=calls,
            finish_reason=finish, prompt_tokens=len(ids), completion_tokens=len(sampled),
            ttft_s=first,
            token_latencies_s=latencies, total_s=total, constrained=mask is not None,
            token_ids=sampled, mask_ms_per_token=mask.ms_per_token if mask else None,
            notes=self._prompt_notes(len(ids)),
        ))
