"""Tool broker: fixture replay keyed by normalised arguments, hit rates, fixture files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.eval.broker import (
    BrokerError,
    ToolBroker,
    fixtures_text,
    result_content,
    write_fixtures,
)
from mlx_distill.eval.scoring import values_equal
from mlx_distill.tasks.toolcall import fixtures, generate
from mlx_distill.tasks.toolcall_tools import TOOLS, execute

PARIS = {"name": "get_weather", "arguments": {"city": "Paris"},
         "result": {"temperature": 18, "condition": "cloudy"}}
ADD = {"name": "add", "arguments": {"a": 12, "b": 30}, "result": {"result": 42}}


def test_normalised_arguments_hit_the_same_fixture():
    broker = ToolBroker([PARIS, ADD])
    for spelling in ("Paris", "paris ", " PARIS", "Pa-ris"):
        assert broker.call("get_weather", {"city": spelling}) == PARIS["result"]
    assert broker.call("add", {"a": 12.0, "b": 30}) == {"result": 42}
    assert broker.call("add", '{"a": 12, "b": 30}') == {"result": 42}  # JSON text arguments
    assert broker.call("get_weather", {"city": "Lyon"}) is None
    assert broker.call("add", {"b": 12, "a": 30}) is None  # values swapped: a different call
    assert broker.call("add", "{not json") is None
    assert broker.call(None, None) is None
    assert (broker.hits, broker.misses, broker.calls) == (6, 4, 10)
    assert broker.hit_rate == pytest.approx(0.6)
    stats = broker.stats()
    assert stats["fixtures"] == 2 and stats["missed"][0] == {"name": "get_weather",
                                                             "arguments": {"city": "Lyon"}}
    broker.reset_counts()
    assert broker.hit_rate is None and broker.stats()["missed"] == []


def test_schema_defaults_are_filled_in_when_tools_are_known():
    with_tools = ToolBroker([PARIS], tools=TOOLS)
    assert with_tools.call("get_weather", {"city": "Paris", "unit": "celsius"}) == PARIS["result"]
    assert with_tools.call("get_weather", {"city": "Paris", "unit": "fahrenheit"}) is None
    explicit = ToolBroker([{**PARIS, "arguments": {"city": "Paris", "unit": "celsius"}}],
                          tools=TOOLS)
    assert explicit.call("get_weather", {"city": "paris"}) == PARIS["result"]
    # Without the tool definitions the broker cannot know the default.
    assert ToolBroker([PARIS]).call("get_weather", {"city": "Paris", "unit": "celsius"}) is None


# Spellings BFCL's standardize_string treats as equal: case, spaces and ,./-_*^.
noise = st.text(alphabet=" ,./-_*^", max_size=2)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzéü", min_size=1, max_size=12), st.data())
def test_any_bfcl_equal_spelling_hits(city, data):
    broker = ToolBroker([{"name": "get_weather", "arguments": {"city": city}, "result": 1}])
    spelled = "".join(
        data.draw(noise) + (ch.upper() if data.draw(st.booleans()) else ch) for ch in city
    ) + data.draw(noise)
    assert values_equal(spelled, city)
    assert broker.call("get_weather", {"city": spelled}) == 1


def test_fixture_files(tmp_path):
    path = tmp_path / "fixtures.jsonl"
    write_fixtures(path, [ADD, PARIS, {**PARIS, "arguments": {"city": "paris"}}])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2  # deduplicated by normalised key
    assert fixtures_text([PARIS, ADD]) == fixtures_text([ADD, PARIS])  # order-independent bytes
    broker = ToolBroker.from_files([path])
    assert len(broker) == 2 and broker.call("add", {"a": 12, "b": 30}) == {"result": 42}


@pytest.mark.parametrize("line, message", [
    ("{oops", "f.jsonl:2: invalid JSON"),
    ("[1, 2]", "f.jsonl:2: expected an object"),
    ('{"name": "", "arguments": {}, "result": 1}', "f.jsonl:2: name"),
    ('{"name": "add", "arguments": [1], "result": 1}', "f.jsonl:2: arguments"),
    ('{"name": "add", "arguments": {"a": 1}}', "f.jsonl:2: result: missing"),
    ('{"name": "get_weather", "arguments": {"city": "PARIS"}, "result": 2}',
     r"f.jsonl:2: get_weather with these arguments already has a different result "
     r"\(from .*f.jsonl:1\)"),
])
def test_bad_fixture_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(PARIS) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(BrokerError, match=message):
        ToolBroker.from_files([path])


def test_missing_fixture_file(tmp_path):
    with pytest.raises(BrokerError, match="fixture file not found"):
        ToolBroker.from_files([tmp_path / "nope.jsonl"])


def test_generated_fixtures_answer_every_gold_call(tmp_path):
    splits = generate(60, 20, 40, seed=5)
    path = tmp_path / "fixtures.jsonl"
    write_fixtures(path, [f for s in splits.values() for f in fixtures(s)])
    broker = ToolBroker.from_files([path], tools=TOOLS)
    for samples in splits.values():
        for sample in samples:
            for call in sample["gold"].get("calls") or []:
                assert broker.call(call["name"], call["arguments"]) == execute(
                    call["name"], call["arguments"])
                # A model that spells a string differently still gets the recorded result.
                loud = {k: v.upper() if isinstance(v, str) and k == "city" else v
                        for k, v in call["arguments"].items()}
                assert broker.call(call["name"], loud) is not None
            for turn in sample.get("turns") or []:
                if turn["role"] == "tool":
                    (call,) = sample["gold"]["calls"]
                    assert turn["content"] == result_content(
                        broker.call(call["name"], call["arguments"]))
    assert broker.misses == 0 and broker.hit_rate == 1.0


def test_result_content():
    assert result_content("plain") == "plain"
    assert result_content({"city": "Zürich"}) == '{"city": "Zürich"}'
