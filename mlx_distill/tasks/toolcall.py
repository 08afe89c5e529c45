"""Toy tool-calling task: seeded generator of train / val / held-out test samples.

Categories: single calls to each tool (``weather``, ``calculator``, ``calendar``,
``unit_conversion``), two-city ``parallel`` weather calls, ``multi_turn`` samples (call -> tool
result -> final answer, to exercise the tool broker) and no-tool ``control`` samples (small talk,
general knowledge, and hard negatives that mention a city, quantity or date without asking for a
tool). Each sample offers all tools. The test split uses cities, dates, numbers and phrasings that
train and val never use (:mod:`.toolcall_phrasings`). Output layout: see :func:`write_toolcall`.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

from mlx_distill.eval.broker import fixtures_text, result_content
from mlx_distill.tasks import toolcall_phrasings as P
from mlx_distill.tasks.common import (
    SPLITS,
    allocate,
    check_counts,
    draw_samples,
    manifest,
    split_files,
    split_rng,
    write_task_dir,
)
from mlx_distill.tasks.toolcall_tools import TOOLS, execute
from mlx_distill.teacher.types import ToolCall

TASK = "toolcall"
CATEGORY_WEIGHTS = {
    "weather": 0.16, "calculator": 0.16, "calendar": 0.14, "unit_conversion": 0.14,
    "parallel": 0.08, "multi_turn": 0.12, "control": 0.20,
}
SINGLE_CALL_CATEGORIES = ("weather", "calculator", "calendar", "unit_conversion")
OUTPUT_FILES = tuple(
    f"{split}{suffix}" for split in SPLITS for suffix in (".jsonl", ".prompts.jsonl", ".sft.jsonl")
) + ("fixtures.jsonl", "tools.json", "manifest.json")
Request = tuple[str, list[dict[str, Any]]]


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def _weather(rng: random.Random, split: str) -> Request:
    phrasing = P.phrasing_split(split)
    city = rng.choice(P.pools(split)["cities"])
    text = rng.choice(P.WEATHER[phrasing]).format(city=city)
    unit = rng.choice((None, "celsius", "fahrenheit"))
    if unit is None:
        return text, [_call("get_weather", city=city)]
    text += rng.choice(P.UNIT_SUFFIX[phrasing]).format(unit=unit.capitalize())
    return text, [_call("get_weather", city=city, unit=unit)]


def _parallel(rng: random.Random, split: str) -> Request:
    city, city2 = rng.sample(P.pools(split)["cities"], 2)
    text = rng.choice(P.PARALLEL_WEATHER[P.phrasing_split(split)]).format(city=city, city2=city2)
    return text, [_call("get_weather", city=city), _call("get_weather", city=city2)]


def _calculator(rng: random.Random, split: str) -> Request:
    a, b = rng.sample(P.pools(split)["numbers"], 2)
    name = rng.choice(("add", "multiply"))
    templates = (P.ADD if name == "add" else P.MULTIPLY)[P.phrasing_split(split)]
    text = rng.choice(templates).format(a=P.number_text(a), b=P.number_text(b))
    return text, [_call(name, a=a, b=b)]


def _calendar(rng: random.Random, split: str) -> Request:
    pool = P.pools(split)
    date = rng.choice(pool["dates"])
    phrase = rng.choice(P.date_phrases(date))
    phrasing = P.phrasing_split(split)
    if rng.random() < 0.3:
        limit = rng.choice(pool["limits"])
        text = rng.choice(P.CALENDAR_LIMIT[phrasing]).format(date=phrase, limit=limit)
        return text, [_call("list_events", date=date.isoformat(), limit=limit)]
    text = rng.choice(P.CALENDAR[phrasing]).format(date=phrase)
    return text, [_call("list_events", date=date.isoformat())]


def _unit_conversion(rng: random.Random, split: str) -> Request:
    pair = rng.choice(P.CONVERSION_PAIRS)
    src, dst = pair if rng.random() < 0.5 else pair[::-1]
    value = rng.choice(P.pools(split)["numbers"])
    text = rng.choice(P.CONVERT[P.phrasing_split(split)]).format(
        value=P.number_text(value), from_unit=rng.choice(P.UNIT_WORDS[src]),
        to_unit=rng.choice(P.UNIT_WORDS[dst]))
    return text, [_call("convert_units", value=value, from_unit=src, to_unit=dst)]


REQUESTS = {
    "weather": _weather, "calculator": _calculator, "calendar": _calendar,
    "unit_conversion": _unit_conversion, "parallel": _parallel,
}


def _control(rng: random.Random, split: str) -> tuple[str, str]:
    phrasing = P.phrasing_split(split)
    kind = rng.choice(("fixed", "capital", "hard_negative", "hard_negative"))
    if kind == "fixed":
        return rng.choice(P.CONTROLS[phrasing])
    if kind == "capital":
        country, capital = rng.choice(P.CAPITALS[phrasing])
        question = rng.choice(P.CAPITAL_QUESTIONS[phrasing]).format(country=country)
        return question, P.CAPITAL_ANSWER.format(country=country, capital=capital)
    pool = P.pools(split)
    template, answer = rng.choice(P.HARD_NEGATIVES[phrasing])
    date = rng.choice(pool["dates"])
    text = template.format(city=rng.choice(pool["cities"]),
                           number=P.number_text(rng.choice(pool["numbers"])),
                           date=rng.choice(P.date_phrases(date)))
    return text, answer


def final_answer(call: dict[str, Any], result: Any) -> str:
    """The assistant's answer once a tool result is back (the multi-turn gold final turn)."""
    name, args = call["name"], call["arguments"]
    if name == "get_weather":
        return (f"It is {result['temperature']} degrees {result['unit'].capitalize()} and "
                f"{result['condition']} in {result['city']}.")
    if name in ("add", "multiply"):
        verb = "plus" if name == "add" else "times"
        return f"{args['a']} {verb} {args['b']} is {result['result']}."
    if name == "convert_units":
        return f"{args['value']} {args['from_unit']} is {result['value']} {result['unit']}."
    listed = result["events"]
    if not listed:
        return f"You have no events on {result['date']}."
    items = ", ".join(f"{e['title']} at {e['time']}" for e in listed)
    plural = "s" if len(listed) > 1 else ""
    return f"You have {len(listed)} event{plural} on {result['date']}: {items}."


def arguments_text(arguments: dict[str, Any]) -> str:
    """Arguments as the chat template's ``tojson`` writes them (``", "``/``": "``, UTF-8 kept)."""
    return json.dumps(arguments, ensure_ascii=False)


def render_calls(calls: list[dict[str, Any]]) -> str:
    """The assistant text the chat template renders for ``calls`` (the SFT target)."""
    return "\n".join(
        f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {arguments_text(c["arguments"])}}}'
        "\n</tool_call>"
        for c in calls
    )


def assistant_call_message(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """An OpenAI assistant message with ``tool_calls`` (arguments as JSON text)."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [ToolCall(f"call_{i}", c["name"], arguments_text(c["arguments"])).to_dict()
                       for i, c in enumerate(calls)],
    }


def _make(category: str, rng: random.Random, split: str) -> dict[str, Any]:
    sample: dict[str, Any] = {"id": "", "split": split, "category": category}
    if category == "control":
        text, answer = _control(rng, split)
        gold: dict[str, Any] = {"no_call": True}
    else:
        kind = rng.choice(SINGLE_CALL_CATEGORIES) if category == "multi_turn" else category
        text, calls = REQUESTS[kind](rng, split)
        gold, answer = {"calls": calls}, render_calls(calls)
    sample.update(
        messages=[{"role": "system", "content": P.SYSTEM_PROMPT},
                  {"role": "user", "content": text}],
        tools=copy.deepcopy(TOOLS), gold=gold, gold_answer=answer,
    )
    if category == "multi_turn":
        (call,) = gold["calls"]
        result = execute(call["name"], call["arguments"])
        sample["turns"] = [
            {"role": "tool", "tool_call_id": "call_0", "content": result_content(result)},
            {"role": "assistant", "content": final_answer(call, result)},
        ]
    return sample


def gold_messages(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole gold conversation in OpenAI format: the prompt messages, the gold assistant turn
    (``tool_calls`` with JSON-text arguments, or the answer text) and any later ``turns``."""
    messages = copy.deepcopy(sample["messages"])
    calls = (sample.get("gold") or {}).get("calls")
    if calls:
        messages.append(assistant_call_message(calls))
    else:
        messages.append({"role": "assistant", "content": sample["gold_answer"]})
    messages.extend(copy.deepcopy(sample.get("turns") or []))
    return messages


def prompt_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A line of a prompts file for ``mlx-distill teacher generate``."""
    return {"id": sample["id"], "messages": sample["messages"], "tools": sample["tools"] or None}


def sft_record(sample: dict[str, Any]) -> dict[str, Any]:
    return {"id": sample["id"], "messages": gold_messages(sample), "tools": sample["tools"] or None}


def generate(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """The three splits. The same arguments always give the same samples; test depends on
    ``n_test`` and ``seed`` only, val also on the train prompts it must avoid."""
    check_counts(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    splits: dict[str, list[dict[str, Any]]] = {}
    used: set[str] = set()
    for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        rng = split_rng(TASK, seed, split)
        labels = allocate(n, CATEGORY_WEIGHTS, rng)
        samples = draw_samples(labels, lambda c, r, s=split: _make(c, r, s), rng, used)
        for i, sample in enumerate(samples):
            sample["id"] = f"{TASK}-{split}-{i:05d}"
        used |= {s["messages"][-1]["content"] for s in samples}
        splits[split] = samples
    return splits


def fixtures(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Broker fixtures for every gold call: the toy tools' real (or deterministic fake) results."""
    return [
        {"name": c["name"], "arguments": c["arguments"],
         "result": execute(c["name"], c["arguments"])}
        for s in samples for c in (s["gold"].get("calls") or [])
    ]


def write_toolcall(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int,
                   seed: int = 0) -> Path:
    """Write ``{split}.jsonl`` (eval samples), ``{split}.prompts.jsonl``, ``{split}.sft.jsonl``,
    ``fixtures.jsonl`` (broker fixtures for all gold calls), ``tools.json`` (the tool registry)
    and ``manifest.json`` (seed, counts, categories, sha256 per file), atomically."""
    splits = generate(n_train, n_val, n_test, seed)
    files = split_files(splits, prompt_record, sft_record)
    files["fixtures.jsonl"] = fixtures_text(
        f for samples in splits.values() for f in fixtures(samples))
    files["tools.json"] = json.dumps(TOOLS, indent=2, ensure_ascii=False) + "\n"
    files["manifest.json"] = manifest(TASK, seed, splits, files)
    return write_task_dir(out_dir, files, OUTPUT_FILES)

