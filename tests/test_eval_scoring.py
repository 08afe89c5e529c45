"""Tool-call scoring: parsing, BFCL strict matching, order-free matching, dataset metrics."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from mlx_distill.eval.scoring import (
    Call,
    ScoringError,
    aggregate,
    arguments_key,
    calls_from_openai,
    max_matching,
    parse_tool_calls,
    predicted_calls,
    score_dataset,
    score_sample,
    standardize_string,
    strict_error,
    values_equal,
)
from mlx_distill.tasks.toolcall import generate, gold_messages, render_calls
from mlx_distill.teacher.types import ToolCall
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

# A BFCL "simple" style function: integer params, an optional string with a default.
TRIANGLE = {
    "name": "calculate_triangle_area",
    "description": "Area of a triangle.",
    "parameters": {
        "type": "object",
        "properties": {
            "base": {"type": "integer"},
            "height": {"type": "integer"},
            "unit": {"type": "string", "default": "units"},
        },
        "required": ["base", "height"],
    },
}
WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["city"],
    },
}
EVENTS = {
    "name": "list_events",
    "parameters": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
            "ratio": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "flags": {"type": "object", "properties": {"urgent": {"type": "boolean"}}},
        },
        "required": ["date"],
    },
}


def call(name, **arguments):
    return Call(name, arguments, json.dumps(arguments))


def test_standardize_string_follows_bfcl():
    # BFCL's own motivating example: these spellings of a date all compare equal.
    assert {standardize_string(s) for s in ("April 1, 2024", "April 1,2024", "April 1 2024")} == {
        "april12024"}
    assert standardize_string("New York") == standardize_string("new-york") == "newyork"
    assert standardize_string("NEW_YORK*^/.") == "newyork"
    assert standardize_string("it's") == 'it"s'
    # Characters BFCL keeps stay significant.
    assert standardize_string("a+b") != standardize_string("ab")
    assert standardize_string("Zürich") == "zürich"


@pytest.mark.parametrize("arguments, verdict", [
    ({"base": 10, "height": 5}, None),
    ({"height": 5, "base": 10}, None),
    ({"base": 10, "height": 5, "unit": "units"}, None),  # the default may be spelled out
    ({"base": 10, "height": 5, "unit": "Units "}, None),  # ... normalised like any string
    ({"base": 10.0, "height": 5}, "type_error:base"),  # BFCL: a float is not an integer
    ({"base": True, "height": 5}, "type_error:base"),
    ({"base": "10", "height": 5}, "type_error:base"),
    ({"base": 10}, "missing_required:height"),
    ({"base": 10, "height": 5, "color": "red"}, "unexpected_param:color"),
    ({"base": 10, "height": 5, "unit": "cm"}, "unexpected_param:unit"),
    ({"base": 10, "height": 6}, "value_error:height"),
])
def test_bfcl_simple_function_rules(arguments, verdict):
    gold = {"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}
    error = strict_error(call("calculate_triangle_area", **arguments), gold, TRIANGLE)
    if verdict is None:
        assert error is None
    else:
        assert error is not None and error.startswith(verdict)


def test_gold_optional_parameter_may_be_omitted_only_when_default():
    with_default = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    assert strict_error(call("get_weather", city="paris"), with_default, WEATHER) is None
    other = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "fahrenheit"}}
    assert strict_error(call("get_weather", city="Paris"), other, WEATHER).startswith(
        "missing_optional:unit")
    # enum membership is exact (JSON schema), unlike value comparison.
    assert strict_error(call("get_weather", city="Paris", unit="Fahrenheit"), other,
                        WEATHER).startswith("enum_error:unit")
    assert strict_error(call("get_weather", city="Paris"),
                        {"name": "get_weather", "arguments": {"city": "Lyon"}},
                        WEATHER).startswith("value_error:city")
    assert strict_error(call("get_time", city="Paris"), with_default, WEATHER).startswith(
        "wrong_func_name")
    assert strict_error(Call(None, None, "{"), with_default, WEATHER) == "invalid_json"


def test_number_pattern_array_and_object_types():
    gold = {"name": "list_events", "arguments": {"date": "2025-03-04", "ratio": 0.3,
                                                  "tags": ["Work", "home"],
                                                  "flags": {"urgent": True}}}
    good = dict(date="2025-03-04", ratio=0.1 + 0.2, tags=["work", "Home"], flags={"urgent": True})
    assert strict_error(call("list_events", **good), gold, EVENTS) is None
    for change, prefix in [
        ({"date": "20250304"}, "pattern_error:date"),  # equal after standardize, wrong pattern
        ({"ratio": 0.31}, "value_error:ratio"),
        ({"ratio": False}, "type_error:ratio"),  # bool is not a number
        ({"tags": ["home", "work"]}, "value_error:tags"),  # lists compare in order
        ({"tags": ["work", 3]}, "type_error:tags[1]"),
        ({"flags": {"urgent": 1}}, "type_error:flags.urgent"),
        ({"flags": {"urgent": False}}, "value_error:flags"),
    ]:
        error = strict_error(call("list_events", **{**good, **change}), gold, EVENTS)
        assert error is not None and error.startswith(prefix), (change, error)
    gold_int = {"name": "list_events", "arguments": {"date": "2025-03-04", "ratio": 2}}
    assert strict_error(call("list_events", date="2025-03-04", ratio=2.0), gold_int, EVENTS) is None


def test_uncompilable_pattern_is_not_held_against_the_call():
    odd = {"name": "f", "parameters": {"type": "object", "required": ["s"],
                                       "properties": {"s": {"type": "string",
                                                            "pattern": "(?<=a+)b"}}}}
    gold = {"name": "f", "arguments": {"s": "x"}}
    assert strict_error(call("f", s="X"), gold, odd) is None


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: abs(x) > 1e-6),
                         st.text(alphabet="abcXYZ é", max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("pqr"), inner, max_size=3)),
    max_leaves=8)


def respell(value, draw):
    """A spelling :func:`values_equal` must accept: case and BFCL punctuation in strings, integral
    numbers as floats."""
    if isinstance(value, str):
        return "".join(draw(st.sampled_from(["", " ", "-", "_"])) + ch.swapcase() for ch in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        return [respell(v, draw) for v in value]
    if isinstance(value, dict):
        return {k: respell(v, draw) for k, v in value.items()}
    return value


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["city", "n", "xs"]), json_values, max_size=3), st.data())
def test_respelled_values_are_equal_and_share_a_key(arguments, data):
    variant = respell(arguments, data.draw)
    assert values_equal(variant, arguments)
    assert arguments_key("f", variant) == arguments_key("f", arguments)


def test_values_equal_is_type_aware():
    assert values_equal(1, 1.0) and values_equal(1e-12, 0)
    assert not values_equal(True, 1) and not values_equal(1, True)
    assert not values_equal("1", 1) and not values_equal(None, 0)
    assert values_equal({"a": [1, "X y"]}, {"a": [1.0, "xy"]})
    assert not values_equal({"a": 1}, {"a": 1, "b": 2})


def test_parse_tool_calls_template_format():
    text = ('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": NaN}}</tool_call>'
            '<tool_call>not json</tool_call><tool_call>{"name": "add"}</tool_call>'
            '<tool_call>\n{"name": "multiply", "arguments": {"a": 2,')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2.5}), ("get_weather", {"city": "Oslo"}),
        (None, None),  # NaN is not JSON: the block does not parse at all
        (None, None), ("add", None),  # missing arguments
        (None, None),  # cut off by the end of the generation
    ]
    assert [c.valid for c in calls] == [True, True, False, False, False, False]
    assert parse_tool_calls("no calls here") == []


def test_structured_openai_calls():
    structured = [
        ToolCall("c1", "add", '{"a": 1, "b": 2}'),
        {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 3}}},
        {"id": "c3", "type": "function", "function": {"name": "add", "arguments": "{oops"}},
        {"id": "c4"},
    ]
    calls = calls_from_openai(structured)
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("add", {"a": 3}), ("add", None), (None, None)]
    both = predicted_calls('<tool_call>{"name": "x", "arguments": {}}</tool_call>', structured[:1])
    assert [c.name for c in both] == ["add", "x"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=0, max_size=6), min_size=0, max_size=6))
def test_max_matching_is_maximum(rows):
    width = min((len(r) for r in rows), default=0)
    matrix = [r[:width] for r in rows]
    pairs = max_matching(matrix)
    assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
    assert all(matrix[r][c] for r, c in pairs)
    if matrix and width:
        # Independent reference: an assignment maximising the number of compatible pairs.
        weights = np.array(matrix, dtype=float)
        rows_i, cols_i = linear_sum_assignment(weights, maximize=True)
        assert len(pairs) == int(weights[rows_i, cols_i].sum())
    else:
        assert pairs == []


def _sample(calls, tools=(WEATHER, TRIANGLE), category="c", sample_id="s"):
    gold = {"calls": calls} if calls else {"no_call": True}
    return {"id": sample_id, "category": category, "tools": list(tools), "gold": gold}


names = st.sampled_from(["Paris", "New York", "São Paulo", "Lyon", "Oslo", "Cape Town"])
weather_calls = st.lists(
    st.builds(lambda c, u: {"name": "get_weather",
                            "arguments": {"city": c, **({"unit": u} if u else {})}},
              names, st.sampled_from([None, "celsius", "fahrenheit"])),
    min_size=1, max_size=4, unique_by=lambda c: c["arguments"]["city"])


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30), weather_calls, st.text(max_size=30))
def test_calls_are_found_inside_any_surrounding_text(before, gold, after):
    before, after = (t.replace("<tool_call>", "") for t in (before, after))
    calls = parse_tool_calls(before + render_calls(gold) + after)
    assert [(c.name, c.arguments) for c in calls] == [(g["name"], g["arguments"]) for g in gold]


@settings(max_examples=100, deadline=None)
@given(weather_calls, st.data())
def test_any_permutation_of_parallel_calls_scores_the_same(gold, data):
    sample = _sample(gold)
    predicted = data.draw(st.permutations(gold))
    # A wrong extra call and one wrong value keep the comparison non-trivial.
    predicted = [*predicted, {"name": "get_weather", "arguments": {"city": "Atlantis"}}]
    reference = score_sample(sample, parse_tool_calls(render_calls(predicted)))
    shuffled = data.draw(st.permutations(predicted))
    again = score_sample(sample, parse_tool_calls(render_calls(shuffled)))
    assert (again.strict_tp, again.lax_tp, again.predicted) == (
        reference.strict_tp, reference.lax_tp, reference.predicted) == (len(gold), len(gold),
                                                                         len(gold) + 1)
    assert not again.exact


def test_dataset_metrics_hand_computed():
    paris = {"name": "get_weather", "arguments": {"city": "Paris"}}
    oslo = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    tri = {"name": "calculate_triangle_area", "arguments": {"base": 3, "height": 4}}
    samples = [
        _sample([paris, oslo], category="parallel", sample_id="a"),
        _sample([tri], category="simple", sample_id="b"),
        _sample([], category="control", sample_id="c"),
        _sample([], category="control", sample_id="d"),
    ]
    predictions = [
        render_calls([oslo, paris]),  # both right, other order
        render_calls([{"name": "calculate_triangle_area",
                       "arguments": {"base": 3.0, "height": 4}}]),  # lax only (float base)
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
        "<tool_call>{broken</tool_call>",  # two spurious calls, one invalid
        "Hello! No tools needed.",
    ]
    result = score_dataset(samples, predictions)
    # strict: tp 2, fp 3 (float base, two on the control), fn 1.
    assert result["strict"] == pytest.approx(
        {"precision": 2 / 5, "recall": 2 / 3, "f1": 2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3),
         "tp": 2, "fp": 3, "fn": 1})
    assert result["lax"] == pytest.approx({"precision": 3 / 5, "recall": 1.0, "f1": 0.75,
                                           "tp": 3, "fp": 2, "fn": 0})
    assert result["exact_accuracy"] == pytest.approx(2 / 4)  # a and d
    assert result["json_validity"] == {"rate": pytest.approx(4 / 5), "valid": 4, "calls": 5}
    assert result["controls"] == {"samples": 2, "with_call": 1, "spurious_calls": 2}
    per = result["per_category"]
    assert per["parallel"]["strict"]["f1"] == 1.0 and per["simple"]["strict"]["f1"] == 0.0
    assert per["control"]["exact_accuracy"] == 0.5 and per["simple"]["lax"]["f1"] == 1.0
    b = next(s for s in result["scores"] if s.id == "b")
    assert b.errors == ["calculate_triangle_area: type_error:base: expected integer, got 3.0"]


def test_empty_and_all_control_edge_cases():
    empty = aggregate([])
    assert empty["strict"]["f1"] == 1.0 and empty["exact_accuracy"] is None
    quiet = score_dataset([_sample([])], ["fine"])
    assert quiet["strict"]["f1"] == 1.0 and quiet["json_validity"]["rate"] is None
    silent = score_dataset([_sample([{"name": "get_weather", "arguments": {"city": "X"}}])], [""])
    assert silent["strict"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0,
                                "fn": 1}


def test_malformed_gold_names_sample():
    with pytest.raises(ScoringError, match="sample s7: gold.calls"):
        score_sample({"id": "s7", "gold": {"calls": []}}, [])
    with pytest.raises(ScoringError, match=r"sample s8: gold.calls\[0\]"):
        score_sample({"id": "s8", "gold": {"calls": [{"name": "x"}]}}, [])
    with pytest.raises(ScoringError, match="2 samples but 1 predictions"):
        score_dataset([_sample([]), _sample([])], [""])


# ---- round trip through the real chat template ----

@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("the weather in Paris is sunny\n" * 50 + '{"name": "add"}\n' * 50,
                      encoding="utf-8")
    return load_tokenizer(train_tokenizer([corpus], 400, root / "tokenizer"))


def test_gold_calls_survive_the_chat_template(chat_tokenizer):
    splits = generate(40, 0, 40, seed=3)
    samples = splits["train"] + splits["test"]
    answers = []
    for sample in samples:
        messages = gold_messages(sample)
        upto = len(sample["messages"]) + 1  # the prompt plus the gold assistant turn
        text = chat_tokenizer.apply_chat_template(messages[:upto], tools=sample["tools"],
                                                  tokenize=False)
        assistant = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, re.S)[-1]
        if sample["gold"].get("calls"):
            assert assistant == sample["gold_answer"]
        answers.append(assistant)
    result = score_dataset(samples, answers)
    assert result["strict"]["f1"] == 1.0 and result["exact_accuracy"] == 1.0
    assert result["json_validity"]["rate"] == 1.0 and result["controls"]["with_call"] == 0


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weather_calls)
def test_template_round_trip_any_calls(chat_tokenizer, gold):
    sample = _sample(gold)
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": c["name"],
                                                      "arguments": json.dumps(c["arguments"])}}
                    for c in gold]}]
    text = chat_tokenizer.apply_chat_template(messages, tools=[{"type": "function",
                                                                "function": WEATHER}],
                                              tokenize=False)
    result = score_dataset([sample], [text.split("<|im_start|>assistant\n")[-1]])
    assert result["strict"]["f1"] == 1.0
