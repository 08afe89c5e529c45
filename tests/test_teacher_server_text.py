"""Local teacher server's text side, without a model: the tool-call parser and how sampled tokens
become text deltas (stop strings, split characters, tool-call hold-back), against references
computed from the whole text at once."""

from __future__ import annotations

import codecs
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.teacher.server_infer import TokenScore
from mlx_distill.teacher.server_text import TextAssembler, joined, parse_tool_calls

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
tool_calls = st.lists(
    st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,15}", fullmatch=True),
              st.dictionaries(st.text(max_size=8), json_values, max_size=4)),
    min_size=1, max_size=3,
)
json_styles = st.sampled_from([{}, {"indent": 2}, {"ensure_ascii": False},
                               {"separators": (",", ":")}])
spaces = st.sampled_from(["", "\n", " ", "\n\n", "\t "])


def render_calls(calls, style, gap) -> str:
    return "".join(f"<tool_call>{gap}{json.dumps({'name': n, 'arguments': a}, **style)}{gap}"
                   f"</tool_call>{gap}" for n, a in calls)


@settings(max_examples=100, deadline=None)
@given(tool_calls, json_styles, spaces)
def test_tool_call_parser_keeps_the_exact_arguments(calls, style, gap):
    text = render_calls(calls, style, gap)
    parsed = parse_tool_calls(text)
    assert [c.name for c in parsed] == [n for n, _ in calls]
    for call, (_, arguments) in zip(parsed, calls, strict=True):
        assert json.loads(call.arguments) == arguments
        assert call.arguments in text  # the generated JSON text itself, not a re-encoding
    assert len({c.id for c in parsed}) == len(parsed)
    assert parse_tool_calls(text + "x") is None
    last_brace = text.rindex("}", 0, text.index("</tool_call>"))  # the first call's object
    assert parse_tool_calls(text[:last_brace] + text[last_brace + 1:]) is None


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_tool_call_parser_never_raises(text):
    result = parse_tool_calls("<tool_call>" + text)
    assert result is None or all(c.name for c in result)


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def assemble(chunks: list[bytes], stops: list[str], tools: bool, eos: bool):
    """Feed chunks as tokens 0..n-1 (token n is eos); the deltas, and their join."""
    table, eos_id = [*chunks, b""], len(chunks)
    assembler = TextAssembler(table, {eos_id}, stops, tools)
    deltas = []
    for i in range(len(chunks)):
        delta = assembler.add(TokenScore(i, -1.0))
        if delta is not None:
            deltas.append(delta)
        if assembler.done:
            break
    if not assembler.done:
        deltas.append(assembler.add(TokenScore(eos_id, -1.0)) if eos else assembler.finish())
    return deltas, joined(deltas)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.lists(st.integers(0, 200), max_size=12), st.data())
def test_assembler_cuts_at_the_stop_string_and_keeps_its_tokens(text, cuts, data):
    chunks = split_bytes(text.encode("utf-8"), cuts)
    stop = data.draw(st.text(min_size=1, max_size=3) | st.sampled_from([text[1:3] or "x"]))
    deltas, out = assemble(chunks, [stop], tools=False, eos=False)
    cut = text.find(stop)
    starts, decoder, offset = [], codecs.getincrementaldecoder("utf-8")("replace"), 0
    for chunk in chunks:
        starts.append(offset)
        offset += len(decoder.decode(chunk))
    if cut < 0:
        assert (out.text, out.finish_reason) == (text, "length")
        assert [t.id for t in out.tokens] == list(range(len(chunks)))
    else:
        assert (out.text, out.finish_reason) == (text[:cut], "stop")
        assert [t.id for t in out.tokens] == [i for i, s in enumerate(starts) if s < cut]
    assert all(d.text or d.tokens or d.finish_reason for d in deltas)
    assert all(stop not in d.text for d in deltas)


@settings(max_examples=80, deadline=None)
@given(st.text(st.characters(blacklist_characters="<"), max_size=12), tool_calls, spaces,
       st.lists(st.integers(0, 400), max_size=20))
def test_assembler_turns_trailing_tool_calls_into_calls(content, calls, gap, cuts):
    text = content + gap + render_calls(calls, {}, gap)
    chunks = split_bytes(text.encode("utf-8"), cuts)
    deltas, out = assemble(chunks, [], tools=True, eos=True)
    assert out.finish_reason == "tool_calls"
    assert out.text == content.rstrip()
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls
    assert [t.id for t in out.tokens] == list(range(len(chunks)))
    assert all("<" not in d.text for d in deltas)
    # Cut short (no end of turn): no calls, all the text is content.
    _, truncated = assemble(chunks, [], tools=True, eos=False)
    assert (truncated.text, truncated.tool_calls, truncated.finish_reason) == (
        text, None, "length")
