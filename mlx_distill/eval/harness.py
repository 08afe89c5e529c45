"""Run a generation backend over eval samples.

Each sample's prompt goes to the backend once; the calls in that first assistant turn are the
prediction. A multi-turn sample (one with gold ``turns``) goes on when a tool broker is given:
each call is looked up in the broker's fixtures, the assistant turn and the tool results are
appended, and the model is asked again, until it answers without calling a tool, a call has no
recorded result (the conversation cannot honestly go on), or ``max_turns`` generations ran.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mlx_distill.eval.broker import ToolBroker, result_content
from mlx_distill.eval.perf import RequestTiming
from mlx_distill.eval.records import (
    ANSWERED,
    CALLED,
    NO_CALL,
    TOOL_MISS,
    TURN_LIMIT,
    SampleRun,
    Turn,
)
from mlx_distill.eval.scoring import Call

CONSTRAIN_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class HarnessOptions:
    max_tokens: int = 256
    max_turns: int = 4
    constrain: str = "auto"  # see constrain_option
    temperature: float = 0.0


def constrain_option(tools: list[dict[str, Any]] | None, mode: str) -> bool | str:
    """The runtime's ``constrain_tools`` for ``mode``: ``on`` requires the mask wherever tools
    are offered (the runtime refuses a backend that cannot apply it), ``off`` never applies it,
    ``auto`` applies it where the backend holds the logits."""
    if mode == "off" or not tools:
        return False
    return True if mode == "on" else "auto"


def final_result(events: Iterable[Any]) -> Any:
    """The :class:`~mlx_distill.runtime.Finished` result that ends a generation stream."""
    result = None
    for event in events:
        result = getattr(event, "result", None)
    if result is None:
        raise RuntimeError("the generation stream ended without a Finished event")
    return result


def timing_of(result: Any) -> RequestTiming:
    return RequestTiming(
        latency_s=result.total_s, ttft_s=result.ttft_s,
        decode_tokens=len(result.token_latencies_s), decode_s=sum(result.token_latencies_s),
        completion_tokens=result.completion_tokens, prompt_tokens=result.prompt_tokens)


def generate_turn(backend: Any, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None, options: HarnessOptions) -> Turn:
    """One generation: the text, the calls in it (``GenerationResult.calls()``) and its timing."""
    result = final_result(backend.generate(
        messages, tools, max_tokens=options.max_tokens, temperature=options.temperature,
        constrain_tools=constrain_option(tools, options.constrain)))
    return Turn(text=result.text, content=result.content, calls=result.calls(),
                finish_reason=result.finish_reason, timing=timing_of(result),
                constrained=bool(result.constrained))


def assistant_message(turn: Turn) -> dict[str, Any]:
    """The assistant turn as an OpenAI message: its prose plus ``tool_calls`` with JSON-text
    arguments, which the chat template renders back into call blocks."""
    return {
        "role": "assistant", "content": turn.content or None,
        "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments,
                                                                  ensure_ascii=False)}}
            for i, c in enumerate(turn.calls)
        ],
    }


def _feed_back(broker: ToolBroker, calls: list[Call], run: SampleRun) -> list[dict] | None:
    """Tool messages answering ``calls`` from the fixtures; None when any call misses."""
    messages = []
    for i, call in enumerate(calls):
        result = broker.call(call.name, call.arguments) if call.valid else broker.call(None, None)
        hit = result is not None
        content = result_content(result) if hit else None
        run.tool_results.append({"name": call.name, "arguments": call.arguments, "hit": hit,
                                 "content": content})
        if not hit:
            return None
        messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": content})
    return messages


def run_sample(backend: Any, sample: dict[str, Any], broker: ToolBroker | None,
               options: HarnessOptions) -> SampleRun:
    run = SampleRun(id=sample["id"], category=str(sample.get("category", "")))
    messages = copy.deepcopy(sample["messages"])
    tools = sample.get("tools") or None
    follow = broker is not None and bool(sample.get("turns"))
    for _ in range(options.max_turns):
        turn = generate_turn(backend, messages, tools, options)
        run.turns.append(turn)
        if not turn.calls:
            run.outcome = ANSWERED if len(run.turns) > 1 else NO_CALL
            return run
        if not follow:
            run.outcome = CALLED
            return run
        results = _feed_back(broker, turn.calls, run)
        if results is None:
            run.outcome = TOOL_MISS
            return run
        # Only valid calls reach here (an invalid one misses), so every call has a name.
        messages += [assistant_message(turn), *results]
    run.outcome = TURN_LIMIT
    return run


def run_samples(backend: Any, samples: Sequence[dict[str, Any]], broker: ToolBroker | None,
                options: HarnessOptions,
                progress: Callable[[SampleRun], None] | None = None) -> list[SampleRun]:
    """:func:`run_sample` over ``samples`` in order; ``progress`` is called after each."""
    if options.constrain not in CONSTRAIN_MODES:
        raise ValueError(f"constrain {options.constrain!r}: expected one of {CONSTRAIN_MODES}")
    if options.max_turns < 1 or options.max_tokens < 1:
        raise ValueError("max_turns and max_tokens must be positive")
    runs = []
    for sample in samples:
        runs.append(run_sample(backend, sample, broker, options))
        if progress is not None:
            progress(runs[-1])
    return runs
