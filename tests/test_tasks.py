"""Toy task generators: determinism, held-out disjointness, gold validity, files and CLI."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill import cli
from mlx_distill.eval.broker import result_content
from mlx_distill.eval.scoring import Call, schema_error, strict_error, tool_schemas
from mlx_distill.tasks import eightball
from mlx_distill.tasks import toolcall_phrasings as P
from mlx_distill.tasks.common import TaskError, allocate, read_jsonl
from mlx_distill.tasks.toolcall import CATEGORY_WEIGHTS, generate, gold_messages, render_calls
from mlx_distill.tasks.toolcall_tools import TOOLS, execute


@pytest.fixture(scope="module")
def splits():
    return generate(300, 60, 150, seed=11)


def user_texts(samples):
    return [s["messages"][-1]["content"] for s in samples]


ALL_CITIES = sorted(P.TRAIN_CITIES + P.TEST_CITIES, key=len, reverse=True)
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"


def shape(text):
    """The text with its argument values blanked: what is left is the phrasing."""
    for city in ALL_CITIES:
        text = text.replace(city, "<city>")
    text = re.sub(MONTHS, "<month>", text)
    return re.sub(r"\d+(?:\.\d+)?", "<n>", text)


def argument_values(samples):
    values = {"city": set(), "date": set(), "number": set(), "limit": set()}
    for sample in samples:
        for call in sample["gold"].get("calls") or []:
            args = call["arguments"]
            values["city"] |= {args["city"]} if "city" in args else set()
            values["date"] |= {args["date"]} if "date" in args else set()
            values["limit"] |= {args["limit"]} if "limit" in args else set()
            values["number"] |= {args[k] for k in ("a", "b", "value") if k in args}
    return values


def test_deterministic_and_seeded():
    assert generate(40, 10, 20, seed=1) == generate(40, 10, 20, seed=1)
    assert generate(40, 10, 20, seed=1) != generate(40, 10, 20, seed=2)
    # The held-out split does not move when the training set grows.
    assert generate(10, 5, 20, seed=4)["test"] == generate(90, 5, 20, seed=4)["test"]


def test_counts_ids_and_categories(splits):
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 60, 150]
    ids = [s["id"] for samples in splits.values() for s in samples]
    assert len(set(ids)) == len(ids) and ids[0] == "toolcall-train-00000"
    for samples in splits.values():
        assert {s["category"] for s in samples} == set(CATEGORY_WEIGHTS)
    small = generate(7, 7, 7, seed=0)
    for samples in small.values():
        assert sorted(s["category"] for s in samples) == sorted(CATEGORY_WEIGHTS)


def test_held_out_values_and_phrasings_are_unseen(splits):
    seen = splits["train"] + splits["val"]
    test = splits["test"]
    train_values, test_values = argument_values(seen), argument_values(test)
    for kind in train_values:
        assert test_values[kind], kind
        assert not train_values[kind] & test_values[kind], kind
    assert not set(user_texts(seen)) & set(user_texts(test))
    assert not set(user_texts(splits["train"])) & set(user_texts(splits["val"]))
    assert not {shape(t) for t in user_texts(seen)} & {shape(t) for t in user_texts(test)}
    # No held-out city is ever mentioned in training prompts, and the reverse.
    for text in user_texts(seen):
        assert not any(re.search(rf"\b{re.escape(c)}\b", text) for c in P.TEST_CITIES), text
    for text in user_texts(test):
        assert not any(re.search(rf"\b{re.escape(c)}\b", text) for c in P.TRAIN_CITIES), text


def test_gold_calls_fit_their_schemas(splits):
    functions = tool_schemas(TOOLS)
    for samples in splits.values():
        for sample in samples:
            assert sample["tools"] == TOOLS
            calls = sample["gold"].get("calls")
            if calls is None:
                assert sample["gold"] == {"no_call": True} and sample["category"] == "control"
                assert sample["gold_answer"] and "<tool_call>" not in sample["gold_answer"]
                continue
            assert sample["gold_answer"] == render_calls(calls)
            for call in calls:
                function = functions[call["name"]]
                assert schema_error(call["arguments"], function["parameters"], "args") is None
                as_predicted = Call(call["name"], call["arguments"], "")
                assert strict_error(as_predicted, call, function) is None
            if sample["category"] == "parallel":
                assert [c["name"] for c in calls] == ["get_weather"] * 2


def test_mentioned_values_reach_the_gold_call(splits):
    for sample in splits["train"] + splits["test"]:
        text = sample["messages"][-1]["content"]
        for call in sample["gold"].get("calls") or []:
            args = call["arguments"]
            if "city" in args:
                assert args["city"] in text
            for key in ("a", "b", "value", "limit"):
                if key in args:
                    assert re.search(rf"(?<![\d.]){re.escape(str(args[key]))}(?![\d])", text)
            if "unit" in args:
                assert args["unit"] in text.lower()


def test_gold_messages_are_openai_conversations(splits):
    multi = [s for s in splits["train"] if s["category"] == "multi_turn"]
    assert multi
    for sample in splits["train"]:
        messages = gold_messages(sample)
        assert messages[: len(sample["messages"])] == sample["messages"]
        reply = messages[len(sample["messages"])]
        assert reply["role"] == "assistant"
        calls = sample["gold"].get("calls")
        if calls:
            assert reply["content"] is None
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in reply["tool_calls"]] == [(c["name"], c["arguments"]) for c in calls]
        else:
            assert reply == {"role": "assistant", "content": sample["gold_answer"]}
        assert messages[len(sample["messages"]) + 1:] == sample.get("turns", [])
    for sample in multi:
        (call,) = sample["gold"]["calls"]
        tool_turn, final = sample["turns"]
        result = execute(call["name"], call["arguments"])
        assert tool_turn == {"role": "tool", "tool_call_id": "call_0",
                             "content": result_content(result)}
        assert final["role"] == "assistant" and final["content"].endswith(".")
        shown = result.get("result", result.get("value", result.get("temperature")))
        if shown is not None:
            assert str(shown) in final["content"]


@pytest.mark.parametrize("name, arguments, expected", [
    ("convert_units", {"value": 10, "from_unit": "kilometers", "to_unit": "miles"},
     {"value": 6.2137, "unit": "miles"}),  # 10 / 1.609344
    ("convert_units", {"value": 100, "from_unit": "celsius", "to_unit": "fahrenheit"},
     {"value": 212, "unit": "fahrenheit"}),
    ("convert_units", {"value": 0, "from_unit": "fahrenheit", "to_unit": "celsius"},
     {"value": -17.7778, "unit": "celsius"}),
    ("convert_units", {"value": 2, "from_unit": "gallons", "to_unit": "liters"},
     {"value": 7.5708, "unit": "liters"}),
    ("convert_units", {"value": 3, "from_unit": "feet", "to_unit": "meters"},
     {"value": 0.9144, "unit": "meters"}),
    ("convert_units", {"value": 1, "from_unit": "pounds", "to_unit": "kilograms"},
     {"value": 0.4536, "unit": "kilograms"}),
    ("convert_units", {"value": 1, "from_unit": "pounds", "to_unit": "miles"},
     {"error": "cannot convert pounds to miles"}),
    ("add", {"a": 0.1, "b": 0.2}, {"result": 0.3}),
    ("multiply", {"a": 12.5, "b": 4}, {"result": 50}),
])
def test_tools_compute_real_results(name, arguments, expected):
    result = execute(name, arguments)
    assert result == expected
    if isinstance(result.get("result"), float):
        assert result["result"] == pytest.approx(arguments["a"] + arguments["b"])


def test_fake_tools_are_deterministic_and_consistent():
    paris = execute("get_weather", {"city": "Paris"})
    assert execute("get_weather", {"city": "paris "})["temperature"] == paris["temperature"]
    fahrenheit = execute("get_weather", {"city": "Paris", "unit": "fahrenheit"})
    assert fahrenheit["temperature"] == round(paris["temperature"] * 9 / 5 + 32)
    assert -5 <= paris["temperature"] <= 35
    day = execute("list_events", {"date": "2025-03-05"})
    times = [e["time"] for e in day["events"]]
    assert times == sorted(times) and len(times) <= 3
    assert execute("list_events", {"date": "2025-03-05", "limit": 1})["events"] == day["events"][:1]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.dictionaries(st.sampled_from("abcdefg"),
                                            st.floats(0.01, 10), min_size=1, max_size=7))
def test_allocate_is_proportional(n, weights):
    labels = allocate(n, weights, random.Random(0))
    assert len(labels) == n
    total = sum(weights.values())
    for key, weight in weights.items():
        count = labels.count(key)
        if n >= len(weights):
            assert count >= 1
        assert abs(count - n * weight / total) < len(weights) + 1


# ---- files and CLI ----

@pytest.fixture()
def run_cli(monkeypatch):
    if "mlx_distill.tasks.cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "mlx_distill.tasks.cli"])
    return cli.main


def test_cli_writes_toolcall_files(tmp_path, run_cli, capsys):
    out = tmp_path / "toolcall"
    args = ["tasks", "toolcall", "--out", str(out), "--n-train", "30", "--n-val", "8",
            "--n-test", "15", "--seed", "3"]
    assert run_cli(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["fixtures.jsonl", "manifest.json", "tools.json"] + [
        f"{s}{x}" for s in ("train", "val", "test")
        for x in (".jsonl", ".prompts.jsonl", ".sft.jsonl")])
    expected = generate(30, 8, 15, seed=3)
    assert read_jsonl(out / "test.jsonl") == expected["test"]
    prompts = read_jsonl(out / "train.prompts.jsonl")
    assert [set(p) for p in prompts] == [{"id", "messages", "tools"}] * 30
    assert read_jsonl(out / "val.sft.jsonl")[0]["messages"] == gold_messages(expected["val"][0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 30, "val": 8, "test": 15}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_cli(args) == 0  # same arguments: the same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_refuses_foreign_directory(tmp_path, run_cli, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_cli(["tasks", "eightball", "--out", str(out), "--n-train", "5"]) == 2
    err = capsys.readouterr().err
    assert "holds other files (notes.txt" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["tasks", "toolcall", "--out", str(tmp_path / "x"), "--n-train", "-1"])
    assert exit_info.value.code == 2


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n\n[1]\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"bad.jsonl:3: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"id": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: invalid JSON"):
        read_jsonl(path)
    with pytest.raises(TaskError, match="n_train: expected a non-negative integer"):
        generate(-1, 0, 0)


# ---- Magic 8-Ball ----

def test_eightball_answers_follow_the_topic_rule():
    assert len(set(eightball.ANSWERS)) == 20 and len(set(eightball.TOPICS)) == 20
    data = eightball.generate(200, 40, 100, seed=2)
    for samples in data.values():
        for sample in samples:
            question = sample["messages"][-1]["content"]
            mentioned = [t for t in eightball.TOPICS if re.search(rf"\b{t}\b", question)]
            assert len(mentioned) == 1, question
            index = eightball.TOPICS.index(mentioned[0])
            assert sample["gold_answer"] == eightball.ANSWERS[index]
            assert sample["category"] == ("affirmative" if index < 10 else
                                          "non_committal" if index < 15 else "negative")
            assert sample["gold"] == {"no_call": True} and sample["tools"] == []
        topics = [eightball.TOPICS.index(t) for s in samples for t in eightball.TOPICS
                  if re.search(rf"\b{t}\b", s["messages"][-1]["content"])]
        counts = [topics.count(i) for i in range(20)]
        assert max(counts) - min(counts) <= 1  # balanced
    seen = data["train"] + data["val"]
    assert not set(user_texts(seen)) & set(user_texts(data["test"]))
    held_out_words = set(eightball.OWNERS["test"]) | set(eightball.TIMES["test"])
    for text in user_texts(seen):
        assert not any(w in text for w in held_out_words), text
    train_shapes = {re.sub(rf"\b({'|'.join(eightball.TOPICS)})\b", "<t>", t)
                    for t in user_texts(seen)}
    for text in user_texts(data["test"]):
        assert re.sub(rf"\b({'|'.join(eightball.TOPICS)})\b", "<t>", text) not in train_shapes


def test_eightball_scoring_and_rule_errors():
    samples = eightball.generate(3, 0, 0, seed=0)["train"]
    answers = [samples[0]["gold_answer"] + "\n", "Yes.", samples[2]["gold_answer"]]
    wrong = 1 if samples[1]["gold_answer"] != "Yes." else 0
    result = eightball.score(samples, answers)
    assert result["samples"] == 3 and result["correct"] == 3 - wrong
    assert sum(c["samples"] for c in result["per_category"].values()) == 3
    with pytest.raises(ValueError, match="exactly one topic"):
        eightball.answer_for("Will it be sunny?")
    with pytest.raises(ValueError, match="exactly one topic"):
        eightball.answer_for("Will the job and the exam go well?")


def test_small_pools_repeat_within_a_split_but_never_across(monkeypatch):
    monkeypatch.setitem(eightball.TEMPLATES, "train", ("Will {owner} {topic} go well {time}?",))
    monkeypatch.setitem(eightball.OWNERS, "train", ("my",))
    monkeypatch.setitem(eightball.TIMES, "train", ("today",))
    train = eightball.generate(40, 0, 0, seed=0)["train"]
    assert len(set(user_texts(train))) == 20  # one question per topic, each asked twice
    with pytest.raises(TaskError, match="no prompt left that the other splits do not use"):
        eightball.generate(20, 1, 0, seed=0)
