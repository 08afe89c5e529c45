"""Wire parsers: non-streamed bodies, SSE streams split anywhere, legacy completions, errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.teacher.errors import WireError
from mlx_distill.teacher.types import Completion, TokenLogprob, ToolCall, Usage
from mlx_distill.teacher.wire import (
    StreamAccumulator,
    error_message,
    parse_chat,
    parse_completions,
    parse_response,
)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
logprob = st.floats(-30, 0, allow_nan=False)


@st.composite
def token_logprobs(draw) -> TokenLogprob:
    """A token with arbitrary top-k; ``top`` is stored sorted (what a parser must return)."""
    alternatives = draw(st.lists(st.tuples(text, logprob), max_size=6, unique_by=lambda p: p[0]))
    token = draw(text)
    with_bytes = draw(st.booleans())
    return TokenLogprob(token=token, logprob=draw(logprob),
                        top=sorted(alternatives, key=lambda p: (-p[1], p[0])),
                        bytes=list(token.encode()) if with_bytes else None)


@st.composite
def completions(draw) -> Completion:
    calls = draw(st.lists(st.builds(ToolCall, id=st.text("abc123_", min_size=1, max_size=8),
                                    name=st.text("abcdef_", min_size=1, max_size=8),
                                    arguments=text), max_size=2))
    prompt, completion, cached = (draw(st.integers(0, 10**6)) for _ in range(3))
    return Completion(
        text=draw(text),
        reasoning=draw(st.none() | text.filter(bool)),
        tool_calls=calls,
        finish_reason=draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
        usage=Usage(prompt, completion, prompt + completion, min(cached, prompt)),
        tokens=draw(st.none() | st.lists(token_logprobs(), min_size=1, max_size=6)),
        model=draw(st.sampled_from(["kimi-k2.6", "m"])),
        system_fingerprint=draw(st.none() | st.just("fp_1")),
        response_id=draw(st.none() | st.just("chatcmpl-1")),
    )


def wire_entry(t: TokenLogprob, order: list[int]) -> dict:
    top = [t.top[i] for i in order if i < len(t.top)]
    entry = {"token": t.token, "logprob": t.logprob,
             "top_logprobs": [{"token": tok, "logprob": lp} for tok, lp in top]}
    if t.bytes is not None:
        entry["bytes"] = t.bytes
    return entry


def chat_body(c: Completion, order: list[int]) -> dict:
    message = {"role": "assistant", "content": c.text or None}
    if c.reasoning is not None:
        message["reasoning_content"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = [tc.to_dict() for tc in c.tool_calls]
    logprobs = None if c.tokens is None else {"content": [wire_entry(t, order) for t in c.tokens]}
    body = {"object": "chat.completion", "model": c.model, "usage": {
        "prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
        "total_tokens": c.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": c.usage.cached_tokens}},
        "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                     "finish_reason": c.finish_reason}]}
    if c.system_fingerprint:
        body["system_fingerprint"] = c.system_fingerprint
    if c.response_id:
        body["id"] = c.response_id
    return body


def pieces(value: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(value), *(c % (len(value) + 1) for c in cuts)})
    return [value[i:j] for i, j in zip(points, points[1:], strict=False)]


def sse_stream(c: Completion, cuts: list[int], order: list[int], newline: str) -> bytes:
    """The completion as SSE chunks: text/reasoning/arguments in pieces, logprobs spread over
    chunks, tool-call fragments interleaved by index, usage in a final chunk, then [DONE]."""
    head = {"model": c.model, "object": "chat.completion.chunk"}
    if c.system_fingerprint:
        head["system_fingerprint"] = c.system_fingerprint
    if c.response_id:
        head["id"] = c.response_id

    def chunk(delta, logprobs=None, finish=None, **extra):
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}], **extra}

    events = [chunk({"role": "assistant"})]
    events += [chunk({"reasoning_content": p}) for p in pieces(c.reasoning or "", cuts)]
    for i, tc in enumerate(c.tool_calls):
        events.append(chunk({"tool_calls": [{"index": i, "id": tc.id, "type": "function",
                                             "function": {"name": tc.name}}]}))
    for i, tc in enumerate(c.tool_calls):  # arguments after all headers: fragments interleave
        events += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]})
                   for p in pieces(tc.arguments, cuts)]
    text_pieces = pieces(c.text, cuts)
    tokens = c.tokens or []
    for i in range(max(len(text_pieces), len(tokens))):
        delta = {"content": text_pieces[i]} if i < len(text_pieces) else {}
        logprobs = {"content": [wire_entry(tokens[i], order)]} if i < len(tokens) else None
        events.append(chunk(delta, logprobs))
    events.append(chunk({}, finish=c.finish_reason))
    usage = chat_body(c, order)["usage"]
    events.append({**head, "choices": [], "usage": usage})
    lines = [f"data: {json.dumps(e, ensure_ascii=False)}{newline}{newline}" for e in events]
    lines.insert(1, f": keep-alive{newline}{newline}")
    return ("".join(lines) + f"data: [DONE]{newline}{newline}").encode()


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[i:j] for i, j in zip(points, points[1:], strict=False)]


permutations = st.permutations(list(range(6)))


@settings(max_examples=150, deadline=None)
@given(completions(), permutations)
def test_non_streamed_chat_round_trips_and_sorts_top_k(c, order):
    assert parse_chat(chat_body(c, order)) == c
    assert parse_response(json.dumps(chat_body(c, order)).encode(), "chat") == c


@settings(max_examples=150, deadline=None)
@given(completions(), permutations, st.lists(st.integers(0, 10**6), max_size=6),
       st.lists(st.integers(0, 10**6), max_size=12), st.sampled_from(["\n", "\r\n", "\r"]))
def test_any_split_of_an_sse_stream_equals_the_non_streamed_answer(c, order, cuts, splits, nl):
    data = sse_stream(c, cuts, order, nl)
    accumulator = StreamAccumulator("chat", expect_usage=True)
    for part in split_bytes(data, splits):
        accumulator.feed(part)
    assert accumulator.finish() == parse_chat(chat_body(c, order)) == c


@settings(max_examples=60, deadline=None)
@given(completions(), st.lists(st.integers(0, 10**6), max_size=4), st.integers(0, 10**6))
def test_every_prefix_is_either_the_whole_answer_or_a_retryable_error(c, cuts, cut):
    data = sse_stream(c, cuts, list(range(6)), "\n")
    accumulator = StreamAccumulator("chat", expect_usage=True)
    accumulator.feed(data[: cut % (len(data) + 1)])
    try:
        assert accumulator.finish() == c
    except WireError as exc:
        assert exc.retryable and exc.reason == "truncated_stream"


def test_top_k_sorted_with_ties_broken_by_token_and_nan_last():
    entry = {"token": "a", "logprob": -1.0, "top_logprobs": [
        {"token": "z", "logprob": -2.0}, {"token": "b", "logprob": -0.5},
        {"token": "n", "logprob": None}, {"token": "a", "logprob": -2.0}]}
    body = {"choices": [{"message": {"content": "a"}, "logprobs": {"content": [entry]}}]}
    top = parse_chat(body).tokens[0].top
    assert [t for t, _ in top] == ["b", "a", "z", "n"] and math.isnan(top[-1][1])


def _reference_token(entry) -> TokenLogprob:
    """The parse of one logprobs entry, written plainly: any float() of the value (NaN when
    there is none), top sorted by (logprob descending, NaN last; then token)."""
    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    top = [(str(t.get("token", "")), number(t.get("logprob")))
           for t in entry.get("top_logprobs") or [] if isinstance(t, dict)]
    top.sort(key=lambda p: (math.inf if math.isnan(p[1]) else -p[1], p[0]))
    raw = entry.get("bytes")
    ok = isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw)
    return TokenLogprob(str(entry.get("token") or ""), number(entry.get("logprob")), top,
                        list(raw) if ok else None)


json_number = st.one_of(
    st.sampled_from([-1.0, -1, -2.5, 0.0, -0.0]),  # ties: broken by token
    st.floats(-50, 5), st.integers(-50, 0),
    st.sampled_from([None, "-1.5", "x", math.inf, -math.inf, math.nan, True]))


TOP_ENTRIES = st.lists(st.fixed_dictionaries({}, optional={
    "token": st.one_of(text, st.none(), st.integers()), "logprob": json_number}), max_size=8)
BYTES = st.one_of(st.none(), st.lists(st.integers(-2, 300), max_size=5),
                  st.lists(st.booleans(), max_size=3), st.just([1.0]), st.just("abc"))


@settings(max_examples=300, deadline=None)
@given(TOP_ENTRIES, st.sampled_from([-1.0, -2.0, "-1", None]), BYTES)
def test_token_entries_parse_like_the_plain_reference(tops, logprob, raw):
    entry = {"token": "t", "logprob": logprob, "top_logprobs": tops, "bytes": raw}
    body = {"choices": [{"message": {"content": "t"}, "logprobs": {"content": [entry]}}]}
    got, expected = parse_chat(body).tokens[0], _reference_token(entry)
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))  # noqa: E731
    assert [t for t, _ in got.top] == [t for t, _ in expected.top]
    assert all(same(a, b) for (_, a), (_, b) in zip(got.top, expected.top, strict=True))
    assert (got.token, got.bytes) == (expected.token, expected.bytes)
    assert same(got.logprob, expected.logprob)


def test_legacy_and_chat_style_completions_logprobs():
    legacy = {"id": "cmpl-1", "model": "m", "choices": [{"text": "a b", "finish_reason": "length",
              "logprobs": {"tokens": ["a", " b"], "token_logprobs": [None, -0.5],
                           "top_logprobs": [None, {" c": -2.0, " b": -0.5, " d": -1.0}]}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    c = parse_completions(legacy)
    assert c.text == "a b" and c.finish_reason == "length" and c.usage.total_tokens == 2
    assert c.tokens[0].token == "a" and math.isnan(c.tokens[0].logprob) and c.tokens[0].top == []
    assert c.tokens[1].top == [(" b", -0.5), (" d", -1.0), (" c", -2.0)]
    # mlx_lm.server answers /completions with the chat layout, and entries carry ids, not text.
    chat_style = {"choices": [{"text": "x", "finish_reason": "stop", "logprobs": {"content": [
        {"id": 7, "logprob": -0.25}]}}]}
    token = parse_completions(chat_style).tokens[0]
    assert (token.token, token.logprob, token.top) == ("", -0.25, [])


def test_streamed_legacy_completions_merge_text_and_logprobs():
    events = [
        {"choices": [{"text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0],
                                                "top_logprobs": [{"b": -2.0, "a": -1.0}]}}]},
        {"choices": [{"text": " c", "logprobs": {"tokens": [" c"], "token_logprobs": [-3.0],
                                                 "top_logprobs": [{" c": -3.0}]}}]},
        {"choices": [{"text": "", "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
    ]
    accumulator = StreamAccumulator("completions", expect_usage=True)
    for event in events:
        accumulator.feed_line(f"data: {json.dumps(event)}")
        accumulator.feed_line("")
    accumulator.feed_line("data: [DONE]")
    c = accumulator.finish()
    assert c.text == "a c" and c.finish_reason == "stop" and c.usage.total_tokens == 4
    assert [(t.token, t.top) for t in c.tokens] == [("a", [("a", -1.0), ("b", -2.0)]),
                                                   (" c", [(" c", -3.0)])]


def test_moonshot_usage_layouts():
    # Moonshot reports cached prompt tokens at the top level of usage, and in streams puts usage
    # inside the last chunk's choice.
    body = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                      "cached_tokens": 64}}
    assert parse_chat(body).usage == Usage(100, 5, 105, 64)
    accumulator = StreamAccumulator("chat", expect_usage=True)
    for event in [{"choices": [{"delta": {"content": "hi"}}]},
                  {"choices": [{"delta": {}, "finish_reason": "stop", "usage": body["usage"]}]}]:
        accumulator.feed(f"data: {json.dumps(event)}\n\n".encode())
    accumulator.feed(b"data: [DONE]\n\n")
    assert accumulator.finish().usage == Usage(100, 5, 105, 64)


def test_sse_multiline_data_comments_and_other_fields():
    accumulator = StreamAccumulator("chat")
    stream = ('event: message\nid: 1\ndata: {"choices": [{"delta":\ndata: {"content": "hé"}}]}\n\n'
              ': ping\n\ndata:{"choices": [{"delta": {"reasoning": "r"}, "finish_reason": "stop"}]}'
              '\n\ndata: [DONE]\n\ndata: {"ignored after done": true}\n\n')
    accumulator.feed(stream.encode())
    c = accumulator.finish()
    assert (c.text, c.reasoning, c.finish_reason) == ("hé", "r", "stop")


@pytest.mark.parametrize("body, reason, retryable", [
    (b'{"choices": [', "bad_json", True),
    (b"<html>502 Bad Gateway</html>", "bad_json", True),
    (b'{"object": "list", "data": []}', "bad_response", False),
    (b'{"error": {"message": "overloaded", "type": "server_error"}}', "api_error", True),
    (b"[1, 2]", "bad_response", False),
])
def test_bad_bodies_are_classified(body, reason, retryable):
    with pytest.raises(WireError) as info:
        parse_response(body, "chat")
    assert (info.value.reason, info.value.retryable) == (reason, retryable)


@pytest.mark.parametrize("stream, reason, retryable", [
    (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', "truncated_stream", True),
    (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"cho', "truncated_stream", True),
    (b'data: {"choices": [\n\ndata: [DONE]\n\n', "bad_json", True),
    (b'data: {"error": {"message": "boom"}}\n\n', "api_error", True),
    (b'data: "just a string"\n\n', "bad_response", False),
    (b'data: {"choices": [{"delta": {"content": "\xff"}}]}\n\n', "bad_json", True),
])
def test_bad_streams_are_classified(stream, reason, retryable):
    accumulator = StreamAccumulator("chat")
    with pytest.raises(WireError) as info:
        accumulator.feed(stream)
        accumulator.finish()
    assert (info.value.reason, info.value.retryable) == (reason, retryable)


def test_stream_with_finish_but_no_done_is_complete_unless_usage_was_expected():
    finished = b'data: {"choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}]}\n\n'
    plain = StreamAccumulator("chat")
    plain.feed(finished)
    assert plain.finish().text == "a"
    strict = StreamAccumulator("chat", expect_usage=True)
    strict.feed(finished)
    with pytest.raises(WireError, match="usage"):
        strict.finish()


def test_tool_call_arguments_given_as_an_object_and_missing_ids():
    body = {"choices": [{"message": {"content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"q": "ü"}}}]},
        "finish_reason": "tool_calls"}]}
    call = parse_chat(body).tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == ("call_0", "f", {"q": "ü"})


def test_error_message_extraction():
    assert error_message(b'{"error": {"message": "Invalid Authentication"}}') == (
        "Invalid Authentication")
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"  upstream\n timed out ") == "upstream timed out"
    assert error_message(b"") == "(empty body)"
