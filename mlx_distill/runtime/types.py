"""What every backend streams and returns, and the request options they share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_distill.cli import UserError
from mlx_distill.teacher.types import ToolCall

TOOL_CALL_OPEN = "<tool_call>"


class BackendError(UserError, ValueError):
    """A backend cannot be opened or a request is malformed; the message names what and why."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or, from an endpoint that does not stream tokens, one text chunk).

    ``text`` is new printable text (empty while a multi-byte character or a possible stop string
    is held back); ``token``/``logprob`` are None where the backend does not know them.
    ``elapsed_s``: seconds since the request started; ``latency_s``: since the previous event
    (for the first event, the time to first token)."""

    text: str
    token: int | None
    logprob: float | None
    elapsed_s: float
    latency_s: float


@dataclass(frozen=True)
class GenerationResult:
    """The whole answer, its timings and where it came from.

    ``text`` is the generated text as decoded (local backends: tool-call blocks included; an
    OpenAI endpoint: the message content). ``content``/``tool_calls`` split it as an OpenAI server
    does (content: the text before the first ``<tool_call>``, less trailing whitespace; calls with
    their arguments' JSON text as generated); when the blocks do not parse, ``content`` is the
    whole text and ``tool_calls`` is empty. ``finish_reason``: stop | length | tool_calls.
    ``completion_tokens`` counts every sampled token, an end-of-turn token included.
    ``backend`` labels the runtime; interpreter runs say so, so a report cannot pass them off as
    Core ML. ``ttft_s`` includes templating and grammar setup (None: not observable);
    ``token_latencies_s`` are the gaps between successive tokens after the first."""

    backend: str
    text: str
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    token_latencies_s: list[float]
    total_s: float
    constrained: bool
    token_ids: list[int] | None = None
    mask_ms_per_token: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time after the first (as ``mlx-distill generate``)."""
        if not self.token_latencies_s:
            return None
        spent = sum(self.token_latencies_s)
        return len(self.token_latencies_s) / spent if spent > 0 else None

    def calls(self) -> list[Any]:
        """The predicted calls for scoring (``mlx_distill.eval.scoring.Call``): the parsed
        ``tool_calls`` plus any block still left in ``content`` (those usually do not parse)."""
        from mlx_distill.eval.scoring import predicted_calls

        return predicted_calls(self.content, self.tool_calls)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


@dataclass(frozen=True)
class Finished:
    """The last event of a stream."""

    result: GenerationResult


Event = TokenEvent | Finished


@dataclass(frozen=True)
class Sampling:
    """Request options shared by every backend (checked on construction)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from mlx_distill.generate import _check_options

        try:
            stops = _check_options(self.max_tokens, self.temperature, self.top_p, self.top_k,
                                   list(self.stop), 1)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise BackendError(f"seed: expected an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "stop", tuple(stops))


def split_tool_calls(text: str, finish_reason: str) -> tuple[str, list[ToolCall], str]:
    """(content, tool calls, finish reason) of a generated text, by the rules of our OpenAI server
    (``mlx_distill.teacher.server_text``): calls are parsed from the first ``<tool_call>`` on only
    when generation stopped on its own; then the reason becomes ``tool_calls``."""
    from mlx_distill.teacher.server_text import parse_tool_calls

    start = text.find(TOOL_CALL_OPEN)
    if start >= 0 and finish_reason == "stop":
        calls = parse_tool_calls(text[start:])
        if calls:
            return text[:start].rstrip(), calls, "tool_calls"
    return text, [], finish_reason
