"""What the eval harness records per sample: every generation turn (text, parsed calls, timing)
and every tool result the broker fed back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_distill.eval.perf import RequestTiming
from mlx_distill.eval.scoring import Call

# How a sample's conversation ended.
NO_CALL = "no_call"  # the first turn called no tool: its text is the answer
ANSWERED = "answered"  # after tool results came back, a turn that called no tool
CALLED = "called"  # a single-turn sample: its calls are the prediction, nothing to feed back
TOOL_MISS = "tool_miss"  # a call had no recorded result, so the conversation could not go on
TURN_LIMIT = "turn_limit"  # still calling tools after the last allowed turn


@dataclass
class Turn:
    """One generation call: the whole text, its prose before any call, the calls in it."""

    text: str
    content: str
    calls: list[Call]
    finish_reason: str | None
    timing: RequestTiming
    constrained: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "calls": [{"name": c.name, "arguments": c.arguments, "raw": c.raw, "valid": c.valid}
                      for c in self.calls],
            "finish_reason": self.finish_reason,
            "constrained": self.constrained,
            "ttft_ms": None if self.timing.ttft_s is None else self.timing.ttft_s * 1000.0,
            "latency_ms": self.timing.latency_s * 1000.0,
            "prompt_tokens": self.timing.prompt_tokens,
            "completion_tokens": self.timing.completion_tokens,
        }


@dataclass
class SampleRun:
    id: str
    category: str
    turns: list[Turn] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = NO_CALL

    @property
    def first_calls(self) -> list[Call]:
        """The calls of the first assistant turn: what tool-call scoring judges."""
        return self.turns[0].calls if self.turns else []

    @property
    def first_text(self) -> str:
        return self.turns[0].text if self.turns else ""

    @property
    def final_text(self) -> str | None:
        """The answer after the tool results came back, when the conversation got there."""
        if self.outcome != ANSWERED:
            return None
        return self.turns[-1].text

    def output_texts(self) -> list[str]:
        """Everything the model produced: turn texts, and the raw text of each call an endpoint
        returned apart from the text."""
        return [t.text for t in self.turns] + [c.raw for t in self.turns for c in t.calls
                                               if c.raw not in t.text]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "outcome": self.outcome,
                "turns": [t.to_dict() for t in self.turns], "tool_results": self.tool_results}
