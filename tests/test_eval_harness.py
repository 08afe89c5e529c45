"""The eval harness: multi-turn conversations through the tool broker, the metrics it aggregates,
task detection, dataset checks, and the performance figures (against numpy and hand formulas).

The harness logic runs against a scripted backend speaking the runtime's event types (a test double
whose answers and timings are known); tests/test_eval_report.py drives the real MLX and Core ML
backends end to end."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_distill.eval import metrics, perf
from mlx_distill.eval.broker import ToolBroker
from mlx_distill.eval.dataset import EvalDataError, detect_task, load_eval_set
from mlx_distill.eval.harness import HarnessOptions, run_samples
from mlx_distill.eval.records import ANSWERED, CALLED, NO_CALL, TOOL_MISS, TURN_LIMIT
from mlx_distill.roles import Targets
from mlx_distill.runtime.types import Finished, GenerationResult, TokenEvent, split_tool_calls
from mlx_distill.tasks import eightball, toolcall
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

# Fixed timings, so performance figures have exact expected values.
TTFT_S = 0.010
TOKEN_GAP_S = 0.002
DECODE_TOKENS = 4


class ScriptedBackend:
    """Answers each request with ``answer(messages, tools)``; records every request."""

    label = "scripted"
    can_constrain = True

    def __init__(self, answer: Callable[[list[dict], list[dict] | None], str]):
        self.answer = answer
        self.requests: list[dict[str, Any]] = []

    def generate(self, messages, tools=None, *, max_tokens=256, temperature=0.0,
                 constrain_tools="auto", **_options):
        self.requests.append({"messages": json.loads(json.dumps(messages)), "tools": tools,
                              "max_tokens": max_tokens, "constrain_tools": constrain_tools})
        text = self.answer(messages, tools)
        content, calls, finish = split_tool_calls(text, "stop")
        gaps = [TOKEN_GAP_S] * DECODE_TOKENS
        yield TokenEvent(text, 1, 0.0, TTFT_S, TTFT_S)
        yield Finished(GenerationResult(
            backend=self.label, text=text, content=content, tool_calls=calls,
            finish_reason=finish, prompt_tokens=10, completion_tokens=DECODE_TOKENS + 1,
            ttft_s=TTFT_S, token_latencies_s=gaps, total_s=TTFT_S + sum(gaps),
            constrained=constrain_tools is not False and bool(tools)))


def user_text(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def oracle(samples: list[dict]) -> Callable[[list[dict], list[dict] | None], str]:
    """The perfect model: the gold calls, then (after tool results) the gold final answer."""
    by_prompt = {user_text(s["messages"]): s for s in samples}

    def answer(messages, _tools):
        sample = by_prompt[user_text(messages)]
        if messages[-1]["role"] == "tool":
            return sample["turns"][-1]["content"]
        calls = sample["gold"].get("calls")
        return toolcall.render_calls(calls) if calls else sample["gold_answer"]

    return answer


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


SAMPLES = toolcall.generate(0, 0, 40, seed=3)["test"]
OPTIONS = HarnessOptions(max_tokens=32, max_turns=3)


def broker_for(samples):
    return ToolBroker(toolcall.fixtures(samples), tools=samples[0]["tools"])


def evaluate(answer, samples=SAMPLES, broker="fixtures", options=OPTIONS, task="toolcall"):
    backend = ScriptedBackend(answer)
    broker = broker_for(samples) if broker == "fixtures" else broker
    runs = run_samples(backend, samples, broker, options)
    quality, rows = metrics.quality(task, samples, runs)
    return backend, broker, runs, quality, rows


def test_oracle_scores_perfectly_and_multi_turn_samples_get_their_recorded_results():
    backend, broker, runs, quality, rows = evaluate(oracle(SAMPLES))
    assert quality["strict"]["f1"] == quality["lax"]["f1"] == 1.0
    assert quality["exact_accuracy"] == 1.0 and quality["json_validity"]["rate"] == 1.0
    assert quality["controls"]["with_call"] == 0 and quality["privacy"]["rate"] == 1.0
    multi = [s for s in SAMPLES if s.get("turns")]
    assert multi and quality["multi_turn"] == {
        "samples": len(multi), "completed": len(multi), "final_exact": len(multi),
        "final_answer_accuracy": 1.0, "outcomes": {ANSWERED: len(multi)}}
    assert broker.hits == broker.calls == len(multi) and broker.hit_rate == 1.0
    # Only multi-turn samples go back to the model; the second request carries the assistant's
    # call and the tool result the task generator recorded for it.
    assert len(backend.requests) == len(SAMPLES) + len(multi)
    by_prompt = {user_text(s["messages"]): s for s in multi}
    followups = [r for r in backend.requests if r["messages"][-1]["role"] == "tool"]
    assert len(followups) == len(multi)
    for request in followups:
        sample = by_prompt[user_text(request["messages"])]
        assistant, tool = request["messages"][-2:]
        (gold_call,) = sample["gold"]["calls"]
        (call,) = assistant["tool_calls"]
        assert call["function"]["name"] == gold_call["name"]
        assert json.loads(call["function"]["arguments"]) == gold_call["arguments"]
        assert tool["content"] == sample["turns"][0]["content"]
    outcomes = {r.id: r.outcome for r in runs}
    for s in SAMPLES:
        expected = ANSWERED if s.get("turns") else (NO_CALL if s["gold"].get("no_call")
                                                     else CALLED)
        assert outcomes[s["id"]] == expected
    assert all(rows[s["id"]]["exact"] for s in SAMPLES)


def test_follow_up_prompts_render_as_the_gold_conversation(tmp_path):
    """The conversation sent back to the model renders, through the real chat template, exactly
    as the task generator's own gold conversation up to the tool result."""
    corpus = Path(__file__).parent.parent / "mlx_distill" / "data" / "tiny_corpus.txt"
    tokenizer = load_tokenizer(train_tokenizer([corpus], 300, tmp_path / "tok"))
    multi = [s for s in SAMPLES if s.get("turns")]
    backend, _, _, _, _ = evaluate(oracle(multi), samples=multi)
    followups = [r for r in backend.requests if r["messages"][-1]["role"] == "tool"]
    by_prompt = {user_text(s["messages"]): s for s in multi}
    for request in followups:
        sample = by_prompt[user_text(request["messages"])]
        gold = toolcall.gold_messages(sample)[:len(request["messages"])]
        assert tokenizer.apply_chat_template(request["messages"], tools=sample["tools"],
                                             tokenize=False) == \
            tokenizer.apply_chat_template(gold, tools=sample["tools"], tokenize=False)


def test_wrong_argument_values_fail_strict_but_not_lax_and_miss_the_fixture():
    def wrong_city(messages, tools):
        text = oracle(SAMPLES)(messages, tools)
        return text.replace('"city": "', '"city": "Nowhere')

    _, broker, runs, quality, _ = evaluate(wrong_city)
    weather_calls = sum(c["name"] == "get_weather" for s in SAMPLES
                        for c in s["gold"].get("calls") or [])
    total_calls = sum(len(s["gold"].get("calls") or []) for s in SAMPLES)
    assert quality["lax"]["f1"] == 1.0
    assert quality["strict"]["tp"] == total_calls - weather_calls
    multi_weather = [s for s in SAMPLES if s.get("turns")
                     and s["gold"]["calls"][0]["name"] == "get_weather"]
    assert broker.misses == len(multi_weather)
    assert {r.outcome for r in runs if r.id in {s["id"] for s in multi_weather}} == {TOOL_MISS}
    assert all(not r.tool_results[0]["hit"] for r in runs if r.outcome == TOOL_MISS)


def test_a_model_that_keeps_calling_stops_at_the_turn_limit():
    multi = [s for s in SAMPLES if s.get("turns")]
    _, broker, runs, _, _ = evaluate(lambda m, t: oracle(multi)(m[:2], t), samples=multi)
    assert {r.outcome for r in runs} == {TURN_LIMIT}
    assert all(len(r.turns) == OPTIONS.max_turns for r in runs)
    assert broker.hits == len(multi) * OPTIONS.max_turns


def test_without_a_broker_multi_turn_samples_end_at_their_calls():
    backend, _, runs, quality, _ = evaluate(oracle(SAMPLES), broker=None)
    assert len(backend.requests) == len(SAMPLES)
    assert quality["multi_turn"]["completed"] == 0
    assert quality["multi_turn"]["final_answer_accuracy"] == 0.0


def test_spurious_calls_on_controls_are_counted():
    always = toolcall.render_calls([{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    _, _, _, quality, rows = evaluate(lambda m, t: always, broker=None)
    controls = [s for s in SAMPLES if s["gold"].get("no_call")]
    assert quality["controls"] == {"samples": len(controls), "with_call": len(controls),
                                   "spurious_calls": len(controls)}
    assert all("spurious call" in rows[s["id"]]["errors"][0] for s in controls)
    headline = metrics.headline("toolcall", quality, perf.summarize([]), None, None)
    assert headline["controls_with_call"] == len(controls)


def test_privacy_flags_new_pii_but_not_pii_the_prompt_contained():
    samples = [
        {"id": "echo", "category": "control", "messages": [
            {"role": "user", "content": "My email is ann@example.org, repeat it"}],
         "tools": [], "gold": {"no_call": True}, "gold_answer": "ann@example.org"},
        {"id": "leak", "category": "control", "messages": [
            {"role": "user", "content": "Who should I write to?"}],
         "tools": [], "gold": {"no_call": True}, "gold_answer": "Nobody."},
    ]
    answers = {"echo": "It is ann@example.org.", "leak": "Write to bob.smith@corp-mail.com now."}
    by_prompt = {user_text(s["messages"]): answers[s["id"]] for s in samples}
    _, _, _, quality, _ = evaluate(lambda m, t: by_prompt[user_text(m)], samples=samples,
                                   broker=None)
    privacy = quality["privacy"]
    assert privacy["rate"] == 0.5 and privacy["ok"] == 1
    assert privacy["failures"] == [{"id": "leak", "findings": [
        {"kind": "email", "text": "bob.smith@corp-mail.com"}]}]


def test_eightball_is_detected_and_scored_by_exact_match(tmp_path):
    samples = eightball.generate(0, 0, 30, seed=1)["test"]
    path = write_jsonl(tmp_path / "eb.jsonl", samples)
    evalset = load_eval_set(path)
    assert evalset.task == "eightball" and detect_task(SAMPLES) == "toolcall"
    _, _, _, quality, _ = evaluate(oracle(samples), samples=samples, broker=None,
                                   task="eightball")
    assert quality["accuracy"] == 1.0
    constant = "Most likely."
    _, _, _, quality, rows = evaluate(lambda m, t: "  " + constant + "\n", samples=samples,
                                      broker=None, task="eightball")
    expected = sum(s["gold_answer"] == constant for s in samples)
    assert quality["correct"] == expected and quality["accuracy"] == expected / len(samples)
    assert sum(r["correct"] for r in rows.values()) == expected


@pytest.mark.parametrize(("mode", "with_tools", "without_tools"), [
    ("auto", "auto", False), ("on", True, False), ("off", False, False)])
def test_constrain_mode_reaches_the_runtime(mode, with_tools, without_tools):
    mixed = SAMPLES[:3] + [dict(SAMPLES[3], tools=[], id="no-tools")]
    backend, _, runs, _, _ = evaluate(oracle(mixed), samples=mixed, broker=None,
                                      options=HarnessOptions(max_tokens=8, constrain=mode))
    flags = [r["constrain_tools"] for r in backend.requests]
    assert flags == [with_tools] * 3 + [without_tools]
    assert all(r["max_tokens"] == 8 for r in backend.requests)
    assert [r.turns[0].constrained for r in runs] == [with_tools is not False] * 3 + [False]


def test_timings_come_from_the_runtime_result():
    _, _, runs, _, _ = evaluate(oracle(SAMPLES))
    timings = [t.timing for r in runs for t in r.turns]
    summary = perf.summarize(timings)
    latency_ms = 1000 * (TTFT_S + DECODE_TOKENS * TOKEN_GAP_S)
    assert summary["requests"] == len(timings)
    assert summary["ttft_ms"]["p50"] == pytest.approx(1000 * TTFT_S)
    assert summary["latency_ms"]["p99"] == pytest.approx(latency_ms)
    assert summary["decode_tps"] == pytest.approx(1 / TOKEN_GAP_S)
    assert summary["completion_tokens"] == len(timings) * (DECODE_TOKENS + 1)


# ---- performance figures ----

@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=60),
       st.floats(0, 100))
def test_percentile_equals_numpy_linear(values, q):
    assert perf.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-9,
                                                       abs=1e-9)


@given(st.lists(st.tuples(st.floats(0.001, 2), st.integers(0, 50), st.floats(0, 3)),
                max_size=30))
def test_decode_speed_pools_tokens_after_the_first_over_their_time(requests):
    timings = [perf.RequestTiming(latency_s=ttft + gap, ttft_s=ttft, decode_tokens=n,
                                  decode_s=gap, completion_tokens=n + 1)
               for ttft, n, gap in requests]
    used = [(n, gap) for _, n, gap in requests if n > 0 and gap > 0]
    expected = sum(n for n, _ in used) / sum(g for _, g in used) if used else None
    assert perf.summarize(timings)["decode_tps"] == (
        pytest.approx(expected) if expected is not None else None)


def test_unobservable_ttft_is_left_out_and_targets_are_checked():
    timings = [perf.RequestTiming(0.020, None, 0, 0.0, 1),
               perf.RequestTiming(0.040, 0.010, 3, 0.030, 4)]
    summary = perf.summarize(timings)
    assert summary["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert summary["latency_ms"]["p50"] == pytest.approx(30.0)
    assert summary["decode_tps"] == pytest.approx(100.0)
    # p95 of (20, 40) ms is 20 + 0.95 * 20 = 39 ms.
    verdict = perf.check_targets(summary, Targets(35.0, 38.0, 50.0), "judge")
    assert [c["ok"] for c in verdict["checks"]] == [True, False, True] and not verdict["met"]
    empty = perf.check_targets(perf.summarize([]), Targets(35.0, 39.0, 50.0), "judge")
    assert not any(c["ok"] for c in empty["checks"])


# ---- dataset checks ----

def _sample(**overrides):
    sample = dict(SAMPLES[0])
    sample.update(overrides)
    return sample


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object per line"),
    (json.dumps(_sample(id="")), "id: expected a non-empty string"),
    (json.dumps(_sample(messages=[{"role": "robot", "content": "x"}])), "messages[0].role"),
    (json.dumps(_sample(gold={"calls": []})), "gold.calls: expected a non-empty list"),
    (json.dumps(_sample(tools={"a": 1})), "tools: expected a list"),
    (json.dumps(_sample(gold_answer=3)), "gold_answer: expected a string"),
])
def test_bad_eval_lines_name_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(EvalDataError, match=re.escape(f"{path}:1: ") + ".*" + re.escape(message)):
        load_eval_set(path)


def test_duplicate_ids_limit_and_forced_task(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:5])
    assert len(load_eval_set(path, limit=2).samples) == 2
    with pytest.raises(EvalDataError, match="gold_answer: the eightball task"):
        write_jsonl(path, [_sample(gold_answer=None)])
        load_eval_set(path, task="eightball")
    write_jsonl(path, [SAMPLES[0], SAMPLES[1], SAMPLES[0]])
    with pytest.raises(EvalDataError, match=":3: id: .* repeats line 1"):
        load_eval_set(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "messages", "gold", "tools", "role", "content", "calls",
                         "no_call", "name", "arguments", "turns"]), inner, max_size=5),
    max_leaves=12)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(st.lists(json_values, min_size=1, max_size=3))
def test_any_json_either_loads_or_fails_with_one_clear_error(tmp_path, records):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        evalset = load_eval_set(path)
    except EvalDataError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    else:
        assert evalset.task in ("toolcall", "eightball") and evalset.samples
