"""``teacher generate`` end to end against a FakeTeacher on loopback: records, resume, sharding,
budget, failures, and every refusal to mix or overwrite runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from fake_teacher import FakeTeacher
from kd_helpers import (
    cli_args,
    config,
    expected_cost,
    prompt_records,
    read_records,
    without_created,
    write_prompts,
    write_teachers,
)

from mlx_distill.teacher.cache import TeacherCache
from mlx_distill.teacher.cli import generate_main
from mlx_distill.teacher.kdgen import Generator, run_generate
from mlx_distill.teacher.kdstate import RunState, save_checkpoint_files
from mlx_distill.teacher.merge import merge_files
from mlx_distill.teacher.prompts import Shard
from mlx_distill.teacher.records import validate_record
from mlx_distill.teacher.types import KD_RECORD_FIELDS


@pytest.fixture(scope="module")
def fake():
    with FakeTeacher() as server:
        yield server


@pytest.fixture
def setup(tmp_path, fake):
    fake.reset_counts()
    teachers = write_teachers(tmp_path, fake.base_url)
    prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(24))
    return tmp_path, teachers, prompts


def state_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".state.json").read_text())


def test_generate_writes_valid_records_manifest_and_state(setup, fake):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    records = read_records(cfg.out)
    assert sorted(r["id"] for r in records) == [f"q{i:04d}" for i in range(24)]
    for record in records:
        assert validate_record(record) == []
        assert list(record) == list(KD_RECORD_FIELDS)
        assert record["cost_usd"] == pytest.approx(expected_cost(record["usage"]), rel=1e-12)
        assert record["teacher"] == {"model": "fake-teacher", "base_host": fake.base_url[7:-3],
                                     "fingerprint": fake.fingerprint}
        assert all(len(t["top"]) == 5 for t in record["tokens"])
    assert fake.answered_count == 24
    state = state_of(cfg.out)
    data = cfg.out.read_bytes()
    assert (state["records"], state["bytes"], state["finished"]) == (24, len(data), True)
    assert state["sha256"] == hashlib.sha256(data).hexdigest()
    assert state["spent_usd"] == pytest.approx(sum(r["cost_usd"] for r in records), rel=1e-12)
    manifest = json.loads(cfg.out.with_name("kd.jsonl.manifest.json").read_text())
    assert manifest["prompts"]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert manifest["teacher"]["base_url"] == fake.base_url
    assert manifest["request"]["top_logprobs"] == 5


def test_rerun_is_all_cache_hits_and_bills_nothing(setup, fake):
    tmp, teachers, prompts = setup
    assert run_generate(config(tmp, teachers, prompts)) == 0
    fake.reset_counts()
    second = config(tmp, teachers, prompts, name="again.jsonl")
    result = Generator(second).generate()
    assert (result.exit_code, result.cache_hits, result.cache_misses) == (0, 24, 0)
    assert fake.request_count == 0 and result.spent_usd == 0
    first = {r["id"]: r for r in read_records(tmp / "kd.jsonl")}
    assert all(first[r["id"]] == r for r in read_records(second.out))  # created too


def test_identical_prompts_in_flight_share_one_request(tmp_path, fake):
    fake.reset_counts()
    teachers = write_teachers(tmp_path, fake.base_url)
    same = [{"role": "user", "content": "the same question"}]
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": f"d{i}", "messages": same}
                                                   for i in range(6)])
    assert run_generate(config(tmp_path, teachers, prompts)) == 0
    records = read_records(tmp_path / "kd.jsonl")
    assert fake.request_count == 1 and len(records) == 6
    assert len({json.dumps(r["tokens"]) for r in records}) == 1


def test_streamed_and_plain_answers_give_identical_records(setup):
    tmp, teachers, prompts = setup
    assert run_generate(config(tmp, teachers, prompts)) == 0
    streamed = config(tmp, teachers, prompts, name="s.jsonl", cache=tmp / "cache2", stream=True)
    assert run_generate(streamed) == 0
    assert without_created(read_records(streamed.out)) == without_created(
        read_records(tmp / "kd.jsonl"))


def test_resume_after_completion_sends_nothing(setup, fake):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    before = cfg.out.read_bytes()
    fake.reset_counts()
    cfg.resume = True
    assert run_generate(cfg) == 0
    assert cfg.out.read_bytes() == before and fake.request_count == 0


def test_torn_last_line_is_cut_and_rewritten_from_cache(setup, fake, capsys):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    complete = cfg.out.read_bytes()
    lines = complete.splitlines(keepends=True)
    # The state as of 10 lines, then 13 more lines and half of the last: a crash mid-write.
    head = b"".join(lines[:10])
    save_checkpoint_files(cfg.out, RunState(run_id=state_of(cfg.out)["run_id"], records=10,
                                            bytes=len(head),
                                            sha256=hashlib.sha256(head).hexdigest()))
    cfg.out.write_bytes(b"".join(lines[:23]) + lines[23][: len(lines[23]) // 2])
    fake.reset_counts()
    capsys.readouterr()
    cfg.resume = True
    assert run_generate(cfg) == 0
    assert "cut off a torn last line" in capsys.readouterr().err
    assert cfg.out.read_bytes() == complete  # lines after the checkpoint kept, the torn one redone
    assert fake.request_count == 0


def _error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert generate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_checksum_mismatch_is_refused(setup, capsys):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    data = bytearray(cfg.out.read_bytes())
    data[data.index(b'"text":"') + 8] ^= 0x01  # one flipped bit inside the checkpointed prefix
    cfg.out.write_bytes(bytes(data))
    line = _error_line(capsys, cli_args(cfg, "--resume"))
    assert "kd.jsonl was modified since the last checkpoint (sha256 mismatch" in line
    assert cfg.out.read_bytes() == bytes(data)


def test_shortened_output_is_refused(setup, capsys):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    cfg.out.write_bytes(cfg.out.read_bytes()[:-100])
    assert "shorter than at the last checkpoint" in _error_line(capsys, cli_args(cfg, "--resume"))


def test_existing_output_is_never_overwritten(setup, capsys):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    cfg.out.write_text("precious\n")
    line = _error_line(capsys, cli_args(cfg))
    assert "already exists (never overwritten)" in line and "--resume" in line
    assert cfg.out.read_text() == "precious\n"


@pytest.mark.parametrize("change, message", [
    (["--temperature", "0.5"], "--temperature: request.temperature is 0.5 now but 1.0"),
    (["--shard", "1/2"], "--shard"),
    (["--top-logprobs", "3"], "--top-logprobs"),
])
def test_resume_refuses_different_settings(setup, capsys, change, message):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    args = cli_args(cfg, "--resume")
    if "--shard" in change or "--top-logprobs" in change:
        i = args.index(change[0])
        del args[i:i + 2]
    assert message in _error_line(capsys, args + change)


def test_resume_refuses_changed_prompts(setup, capsys):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts)
    assert run_generate(cfg) == 0
    write_prompts(prompts, prompt_records(25))
    assert "changed since the run" in _error_line(capsys, cli_args(cfg, "--resume"))


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [{"role": "user", "content": "x"}]}', "field 'id': expected a non-empty"),
    ('{"id": "a", "messages": []}', "field 'messages': expected a non-empty list"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ('{"id": "a", "messages": [{"role": "user", "content": 3}]}', "messages[0].content"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
     "field 'temperature': expected a number in [0, 2]"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}], "temprature": 1}',
     "field 'temprature'"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}',
     "field 'top_logprobs': expected an integer in [0, 20]"),
    ('{"id": "q0001", "messages": [{"role": "user", "content": "x"}]}',
     "duplicate 'q0001', first on line 2"),
    ('{"id": "a", "messages": ', "one JSON object per line"),
])
def test_bad_prompt_lines_name_line_and_field(tmp_path, fake, capsys, line, expected):
    teachers = write_teachers(tmp_path, fake.base_url)
    good = [json.dumps(r) for r in prompt_records(3)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(good[:2] + [line] + good[2:]) + "\n")
    cfg = config(tmp_path, teachers, prompts)
    error = _error_line(capsys, cli_args(cfg))
    assert error.startswith(f"mlx-distill teacher: error: {prompts}:3: ") and expected in error
    assert not cfg.out.exists() and not (tmp_path / "kd.jsonl.manifest.json").exists()


def test_shards_partition_and_merge_to_the_unsharded_run(setup, fake):
    tmp, teachers, prompts = setup
    outs = []
    for i in range(4):
        cfg = config(tmp, teachers, prompts, name=f"kd-{i}.jsonl", shard=Shard(i, 4))
        assert run_generate(cfg) == 0
        outs.append(cfg.out)
    ids = [{r["id"] for r in read_records(out)} for out in outs]
    assert sum(map(len, ids)) == 24 and set().union(*ids) == {f"q{i:04d}" for i in range(24)}
    assert fake.request_count == 24  # each prompt asked once over all shards
    full = config(tmp, teachers, prompts, name="full.jsonl")
    assert run_generate(full) == 0 and fake.request_count == 24  # all cache hits
    merge_files(outs[::-1], tmp / "merged.jsonl")
    merge_files([full.out], tmp / "full-sorted.jsonl")
    assert (tmp / "merged.jsonl").read_bytes() == (tmp / "full-sorted.jsonl").read_bytes()


def test_budget_stop_then_resume_restores_spend(setup, fake, capsys):
    tmp, teachers, prompts = setup
    probe = config(tmp, teachers, prompts, name="probe.jsonl", cache=tmp / "probe-cache")
    assert run_generate(probe) == 0
    full_spend = state_of(probe.out)["spent_usd"]
    fake.reset_counts()
    cfg = config(tmp, teachers, prompts, budget_usd=round(full_spend / 3, 6), concurrency=4)
    assert run_generate(cfg) == 3
    err = capsys.readouterr().err
    assert "does not fit the budget" in err and "--resume" in err
    state = state_of(cfg.out)
    assert 0 < state["records"] < 24 and state["spent_usd"] <= cfg.budget_usd
    assert state["spent_usd"] == pytest.approx(TeacherCache(cfg.cache).run_spent(state["run_id"]))
    cfg.resume = True
    assert run_generate(cfg) == 3  # same cap: the restored spend leaves no room either
    assert state_of(cfg.out)["records"] == state["records"]
    cfg.budget_usd = full_spend * 2
    assert run_generate(cfg) == 0
    assert fake.answered_count == 24  # nothing fetched twice over three invocations
    assert state_of(cfg.out)["spent_usd"] == pytest.approx(full_spend, rel=1e-9)


def test_failures_are_recorded_then_retried_on_resume(tmp_path):
    with FakeTeacher(faults={"500": 1.0}) as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(6))
        cfg = config(tmp_path, teachers, prompts, max_attempts=1, failure_limit="100%")
        assert run_generate(cfg) == 4
        failed = [json.loads(x) for x in (tmp_path / "kd.jsonl.failed.jsonl").read_text()
                  .splitlines()]
        assert [f["id"] for f in failed] == [f"q{i:04d}" for i in range(6)]
        assert {(f["reason"], f["status"], f["attempts"]) for f in failed} == {("http_500", 500, 1)}
        assert "fake fault: 500" in failed[0]["message"]
        fake.faults = {}
        cfg.resume = True
        assert run_generate(cfg) == 0
        assert len(read_records(cfg.out)) == 6
        assert (tmp_path / "kd.jsonl.failed.jsonl").read_text() == ""


def test_failure_limit_stops_the_run(tmp_path):
    with FakeTeacher(faults={"503": 1.0}) as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(40))
        cfg = config(tmp_path, teachers, prompts, max_attempts=1, failure_limit="3",
                     concurrency=2)
        result = Generator(cfg).generate()
        assert result.exit_code == 5 and result.stop_reason == "failure_limit"
        assert 4 <= sum(result.failures.values()) < 40


def test_non_retryable_error_fails_at_once_with_the_server_message(tmp_path):
    with FakeTeacher() as fake:  # it refuses top_logprobs > 20 with HTTP 400
        teachers = write_teachers(tmp_path, fake.base_url, max_top_logprobs=25)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(2))
        cfg = config(tmp_path, teachers, prompts, top_logprobs=25, failure_limit="100%")
        assert run_generate(cfg) == 4
        info = state_of(cfg.out)["failed"]["q0000"]
        assert (info["reason"], info["status"], info["attempts"]) == ("http_400", 400, 1)
        assert "top_logprobs must be between 0 and 20" in info["message"]
        assert fake.request_count == 2


def test_cli_registers_generate_merge_and_serve():
    import argparse

    from mlx_distill.teacher import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["teacher", "merge", "a.jsonl", "b.jsonl", "--out", "m.jsonl"])
    assert args.shards == ["a.jsonl", "b.jsonl"] and args.func is cli._cmd_merge
    args = parser.parse_args(["teacher", "generate", "--prompts", "p", "--out", "o",
                              "--teacher", "kimi", "--shard", "2/4", "--no-logprobs"])
    assert args.shard == Shard(2, 4) and args.top_logprobs is None
    assert parser.parse_args(["teacher", "serve", "dir"]).func is not None


def test_lost_cache_keeps_the_checkpointed_spend(setup, fake):
    tmp, teachers, prompts = setup
    cfg = config(tmp, teachers, prompts, cache=None)
    assert run_generate(cfg) == 0
    assert (tmp / "kd.jsonl.cache" / "teacher-cache.sqlite3").exists()
    spent = state_of(cfg.out)["spent_usd"]
    shutil.rmtree(tmp / "kd.jsonl.cache")
    fake.reset_counts()
    cfg.resume = True
    assert run_generate(cfg) == 0 and fake.request_count == 0
    assert state_of(cfg.out)["spent_usd"] == spent


def test_progress_bar_shows_counts_rate_and_spend(setup, capsys):
    tmp, teachers, prompts = setup
    assert run_generate(config(tmp, teachers, prompts, progress=True)) == 0
    err = capsys.readouterr().err
    assert "24/24" in err and "rec/s" in err and "hits=0 failed=0 spent=$" in err
    assert "records: 24/24" in err and "cache hits 0, misses 24" in err


def test_shards_running_in_parallel_share_one_cache(setup, fake):
    import threading

    tmp, teachers, prompts = setup
    results = {}

    def shard(i: int) -> None:
        cfg = config(tmp, teachers, prompts, name=f"kd-{i}.jsonl", shard=Shard(i, 2))
        results[i] = run_generate(cfg)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: 0, 1: 0} and fake.request_count == 24
    cache = TeacherCache(tmp / "cache")
    try:
        assert len(cache) == 24
    finally:
        cache.close()


def test_tool_calls_and_reasoning_are_kept(tmp_path):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    with FakeTeacher(model="fake-thinking") as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", [
            {"id": "t", "tools": tools, "tool_choice": "auto",
             "messages": [{"role": "user", "content": "use the tool for Zürich"}]},
            {"id": "r", "messages": [{"role": "user", "content": "just think"}]},
        ])
        assert run_generate(config(tmp_path, teachers, prompts)) == 0
        # Requests run concurrently: find the one with tools rather than trusting arrival order.
        assert next(r for r in fake.requests if r.get("tools"))["tool_choice"] == "auto"
    by_id = {r["id"]: r for r in read_records(tmp_path / "kd.jsonl")}
    call = by_id["t"]["tool_calls"][0]
    assert by_id["t"]["finish_reason"] == "tool_calls" and by_id["t"]["tools"] == tools
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city", "days"}
    assert by_id["r"]["reasoning"] and by_id["r"]["text"] and by_id["r"]["tool_calls"] == []
    assert by_id["r"]["teacher"]["model"] == "fake-thinking"


def test_attempts_billed_without_an_answer_count_in_the_ledger(tmp_path):
    # A malformed 200 may have been billed: the client charges it at its worst case.
    with FakeTeacher(faults={"bad_json": 0.4}, fault_seed=1) as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(12))
        cfg = config(tmp_path, teachers, prompts, max_attempts=4, failure_limit="100%")
        result = Generator(cfg).generate()
        assert fake.injected["bad_json"] > 0
    answered = sum(r["cost_usd"] for r in read_records(cfg.out))
    state = state_of(cfg.out)
    cache = TeacherCache(cfg.cache)
    try:
        ledger = cache.run_spent(state["run_id"])
    finally:
        cache.close()
    assert result.spent_usd > answered
    assert ledger == pytest.approx(result.spent_usd, rel=1e-12)
    assert state["spent_usd"] == pytest.approx(ledger, rel=1e-12)
