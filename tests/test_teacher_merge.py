"""KD record validation, ``teacher merge`` (determinism, de-duplication, file:line errors, atomic
output) and the prompts-file parser (hypothesis)."""

from __future__ import annotations

import copy
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.cli import UserError
from mlx_distill.teacher.merge import merge_files
from mlx_distill.teacher.prompts import Shard, parse_prompts, shard_of
from mlx_distill.teacher.records import build_record, dump_record, validate_record
from mlx_distill.teacher.types import KD_SCHEMA, ChatRequest, Completion, TokenLogprob, Usage


def record(prompt_id: str, text: str = "hi", created: float = 1000.0) -> dict:
    completion = Completion(
        text=text, finish_reason="stop", usage=Usage(5, 2, 7, 0), model="m",
        tokens=[TokenLogprob("h", -0.1, [("h", -0.1), ("x", -2.5)]),
                TokenLogprob("i", -0.2, [("i", -0.2), ("y", -3.0)])],
    )
    request = ChatRequest([{"role": "user", "content": f"q {prompt_id}"}])
    return build_record(prompt_id, request, completion.to_dict(), model="m",
                        base_host="example.com", cost_usd=0.001, created=created)


def write(path, records) -> None:
    path.write_text("".join(dump_record(r) for r in records))


def test_a_built_record_is_valid_and_each_fault_is_named():
    good = record("a")
    assert validate_record(good) == []
    faults = [
        (lambda r: r.pop("usage"), "field 'usage': expected present"),
        (lambda r: r.update(extra=1), "field 'extra': expected no such field"),
        (lambda r: r.update(schema="mlx-distill.kd/0"), "field 'schema': expected"),
        (lambda r: r.update(id=""), "field 'id': expected a non-empty string"),
        (lambda r: r["tokens"][1].update(logprob=0.5), "field 'tokens[1].logprob'"),
        (lambda r: r["tokens"][0]["top"].reverse(), "field 'tokens[0].top': expected sorted"),
        (lambda r: r["tokens"][0]["top"].append(["z"]), "field 'tokens[0].top[2]'"),
        (lambda r: r["usage"].update(prompt_tokens=-1), "field 'usage.prompt_tokens'"),
        (lambda r: r["usage"].update(total_tokens=True), "field 'usage.total_tokens'"),
        (lambda r: r.update(cost_usd=-0.5), "field 'cost_usd': expected a number >= 0"),
        (lambda r: r["teacher"].pop("fingerprint"), "field 'teacher.fingerprint'"),
        (lambda r: r.update(tool_calls=[{"id": "c", "type": "function",
                                         "function": {"name": "f", "arguments": {}}}]),
         "field 'tool_calls[0].function.arguments': expected JSON text"),
        (lambda r: r.update(messages=[{"content": "no role"}]), "field 'messages[0].role'"),
        (lambda r: r.update(created=float("nan")), "field 'created'"),
    ]
    for mutate, expected in faults:
        bad = copy.deepcopy(good)
        mutate(bad)
        errors = validate_record(bad)
        assert errors and expected in errors[0], (expected, errors)
    assert validate_record([good])[0].startswith("field '<record>': expected a JSON object")


def test_merge_is_deterministic_sorted_and_drops_identical_duplicates(tmp_path):
    ids = [f"id{i:03d}" for i in range(30)]
    random.Random(0).shuffle(ids)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write(a, [record(i) for i in ids[:12]])
    write(b, [record(i) for i in ids[12:]])
    write(c, [record(i) for i in ids[5:15]])  # overlaps both, same answers
    merge_files([a, b, c], tmp_path / "m1.jsonl")
    result = merge_files([c, b, a], tmp_path / "m2.jsonl")
    merged = (tmp_path / "m1.jsonl").read_bytes()
    assert merged == (tmp_path / "m2.jsonl").read_bytes()
    assert [json.loads(x)["id"] for x in merged.splitlines()] == sorted(ids)
    assert (result.records, result.duplicates) == (30, 10)


def test_copies_differing_only_in_created_keep_the_earliest(tmp_path):
    write(tmp_path / "a.jsonl", [record("x", created=2000.0)])
    write(tmp_path / "b.jsonl", [record("x", created=1500.0)])
    merge_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m.jsonl")
    assert json.loads((tmp_path / "m.jsonl").read_text())["created"] == 1500.0


def test_conflicting_duplicates_name_both_places(tmp_path):
    write(tmp_path / "a.jsonl", [record("p"), record("x", text="one")])
    write(tmp_path / "b.jsonl", [record("x", text="two")])
    with pytest.raises(UserError) as info:
        merge_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m.jsonl")
    assert str(info.value).startswith(f"{tmp_path / 'b.jsonl'}:1: id 'x' conflicts with "
                                      f"{tmp_path / 'a.jsonl'}:2")


@pytest.mark.parametrize("tail, expected", [
    (b'{"schema": "nope"}\n', ":3: field 'schema'"),
    (b"not json\n", ":3: not valid JSON"),
    (b'{"schema": "' + KD_SCHEMA.encode() + b'", "id"', ":3: torn last line"),
])
def test_bad_lines_are_reported_with_file_and_line_and_output_is_untouched(tmp_path, tail,
                                                                           expected):
    shard = tmp_path / "a.jsonl"
    write(shard, [record("a"), record("b")])
    shard.write_bytes(shard.read_bytes() + tail)
    out = tmp_path / "m.jsonl"
    out.write_text("old\n")
    with pytest.raises(UserError) as info:
        merge_files([shard], out)
    assert str(info.value).startswith(f"{shard}{expected}")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "m.jsonl"]  # no temp left


ids_strategy = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True)


@settings(max_examples=100, deadline=None)
@given(ids=ids_strategy, count=st.integers(1, 9))
def test_shards_partition_any_ids(ids, count):
    shards = [[i for i in ids if Shard(k, count).contains(i)] for k in range(count)]
    assert sorted(sum(shards, [])) == sorted(ids)
    assert all(0 <= shard_of(i, count) < count for i in ids)


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.text(max_size=40)})
prompt = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "max_tokens": st.integers(1, 4096), "seed": st.integers(-2**31, 2**31),
              "stop": st.one_of(st.text(min_size=1, max_size=5),
                                st.lists(st.text(min_size=1, max_size=5), max_size=3)),
              "top_logprobs": st.integers(0, 20)},
)


@settings(max_examples=60, deadline=None)
@given(ids=ids_strategy, records=st.data())
def test_valid_prompt_files_parse_back_exactly(ids, records):
    rows = [{"id": i, **records.draw(prompt)} for i in ids]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows).encode()
    parsed = parse_prompts(data, "p.jsonl")
    assert [p.id for p in parsed] == ids
    for p, row in zip(parsed, rows, strict=True):
        assert p.messages == row["messages"] and p.line == 2 * ids.index(p.id) + 1
        if isinstance(row.get("stop"), str):
            assert p.overrides["stop"] == [row["stop"]]


@settings(max_examples=100, deadline=None)
@given(junk=st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                      st.builds(lambda v: json.dumps(v).encode(), st.one_of(
                          st.integers(), st.lists(st.integers()), st.dictionaries(
                              st.sampled_from(["id", "messages", "tools", "seed", "x"]),
                              st.one_of(st.none(), st.integers(), st.text()))))))
def test_junk_lines_give_one_line_errors_naming_the_line(junk):
    good = b'{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n'
    line = junk.replace(b"\n", b" ")
    try:
        parsed = parse_prompts(good + line + b"\n", "p.jsonl")
    except UserError as exc:
        assert str(exc).startswith("p.jsonl:2: ") and "\n" not in str(exc)
    else:  # only a blank line can pass: the junk never contains "messages" with a list
        assert not line.strip() and len(parsed) == 1


logprob = st.one_of(st.floats(-30, 0.01), st.floats(allow_nan=True), st.integers(-3, 1))
token_entry = st.fixed_dictionaries(
    {"token": st.one_of(st.text(max_size=3), st.integers()), "logprob": logprob,
     "top": st.lists(st.one_of(st.tuples(st.text(max_size=3), logprob).map(list),
                               st.lists(st.text(max_size=2), max_size=3)), max_size=4)},
    optional={"bytes": st.one_of(st.none(), st.lists(st.integers(-1, 300), max_size=3))},
)


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(token_entry, max_size=4), sort=st.booleans())
def test_fast_token_check_never_accepts_what_the_detailed_check_rejects(tokens, sort):
    from mlx_distill.teacher.records import _Checker, _tokens_plainly_valid, check_tokens_in_detail

    if sort:  # make the valid case common
        for tok in tokens:
            tok["top"] = sorted(tok["top"], key=lambda p: -p[1] if len(p) == 2
                                and isinstance(p[1], float) and p[1] == p[1] else 0)
    detailed = _Checker()
    check_tokens_in_detail(detailed, tokens)
    if _tokens_plainly_valid(tokens):
        assert detailed.errors == []
    assert (validate_record({**record("x"), "tokens": tokens}) == []) == (detailed.errors == [])
