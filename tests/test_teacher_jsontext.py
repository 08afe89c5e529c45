"""``teacher.jsontext``: orjson-written text must be byte-identical to the ``json`` spelling of KD
records and cached answers (reference: the standard library), and a cache replay must write the
same lines and reject the same answers as before."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.teacher.cache import TeacherCache
from mlx_distill.teacher.jsontext import (
    dumps_canonical,
    dumps_compact,
    loads,
    loads_plain,
    written_plainly,
)
from mlx_distill.teacher.kdgen import Generator
from mlx_distill.teacher.records import COMPLETION_FIELDS, build_record, dump_record
from mlx_distill.teacher.types import (
    ChatRequest,
    Completion,
    TokenLogprob,
    Usage,
    canonical_json,
)

sys.path.insert(0, str(Path(__file__).parent))
from kd_helpers import config, prompt_records, write_prompts, write_teachers  # noqa: E402


def reference(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# Floats from every decade, the edges of the plain range [1e-4, 1e16) included.
FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.sampled_from([0.0, -0.0, 1e-4, -1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0,
                     5e-324, 1.7976931348623157e308, 1e-05, -1.2e-05, 1e-10, 0.1, 1.0]),
    st.builds(lambda m, e: m * 10.0 ** e, st.floats(-10, 10), st.integers(-12, 20)),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                    FLOATS, st.text())
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                     st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(VALUES)
def test_dumps_compact_spells_every_value_as_json_does(value):
    assert dumps_compact(value) == reference(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(FLOATS, max_size=8), st.sampled_from([math.nan, math.inf, -math.inf]),
       st.integers(0, 8))
def test_non_finite_floats_raise_like_json(floats, bad, at):
    value = {"tokens": [[f"t{i}", x] for i, x in enumerate(floats)]}
    value["tokens"].insert(min(at, len(floats)), ["bad", bad])
    with pytest.raises(ValueError):
        reference(value)
    with pytest.raises(ValueError):
        dumps_compact(value)


CANONICAL_VALUES = st.recursive(
    st.one_of(SCALARS, st.sampled_from([math.nan, math.inf, -math.inf])),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(CANONICAL_VALUES)
def test_dumps_canonical_spells_every_value_as_sorted_json_does(value):
    """Cache keys depend on this spelling: it must not change with the writer."""
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert dumps_canonical(value) == expected == canonical_json(value)


def test_canonical_falls_back_for_what_orjson_cannot_take():
    for value in [{1: 2}, {"b": (1, 2.5e-7), "a": None}, [2**64], {"a": "\ud800"},
                  {"z": [math.nan], "é": 1, "e": 2}]:
        expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert dumps_canonical(value) == expected
    with pytest.raises(TypeError):  # json cannot sort mixed key types either
        dumps_canonical({1: 2, "a": 3})


ANY_FLOAT = st.one_of(FLOATS, st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ANY_FLOAT, st.integers(-3, 3), st.text(max_size=6)), max_size=12))
def test_written_plainly_is_never_wrong(values):
    definition = all(type(v) is not float or v == 0.0 or 1e-4 <= abs(v) < 1e16 for v in values)
    if written_plainly(values):
        assert definition and orjson.dumps(values).decode() == reference(values)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=4), ANY_FLOAT,
                          st.lists(st.tuples(st.text(max_size=4), ANY_FLOAT), max_size=4),
                          st.one_of(st.none(), st.lists(st.integers(0, 255), max_size=4))),
                max_size=5))
def test_cached_answers_are_spelled_as_canonical_json(tokens):
    completion = Completion(text="t", usage=Usage(1, 2, 3), tokens=[
        TokenLogprob(token, logprob, top, raw) for token, logprob, top, raw in tokens])
    payload = TeacherCache._row("key", completion, 0.0, None, 1.0, None)[1]
    assert payload == json.dumps(completion.to_dict(), sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=False)


def test_strings_keep_utf8_and_escape_as_json_does():
    text = "".join(chr(c) for c in range(0x80)) + "ü日本😀\u2028\u2029\ufeff"
    assert dumps_compact({text: [text]}) == reference({text: [text]})


def test_values_orjson_cannot_take_fall_back_to_json():
    for value in [{1: 2}, (1, 2.5e-7), [2**64], {"a": "\ud800"}, [float.fromhex("0x1p-1074")]]:
        assert dumps_compact(value) == reference(value)


WRITERS = [
    lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    lambda v: json.dumps(v, indent=1),
    lambda v: orjson.dumps(v).decode(),  # spells 1e-05 as 0.00001, 1e-07 as 1e-7
]


@settings(max_examples=400, deadline=None)
@given(VALUES, st.sampled_from(range(len(WRITERS))))
def test_loads_plain_reads_as_json_and_plain_is_never_wrong(value, writer):
    try:
        text = WRITERS[writer](value)
    except (TypeError, orjson.JSONEncodeError):  # orjson: integers beyond 64 bits
        return
    loaded, plain = loads_plain(text)
    assert reference(loaded) == reference(json.loads(text))
    assert reference(loads(text)) == reference(json.loads(text))
    if plain:  # trusted without a look: must still be spelled as json spells it
        assert dumps_compact({"v": loaded}, plain_keys=("v",)) == reference({"v": loaded})


@pytest.mark.parametrize("text", ['[NaN]', '{"a":-Infinity}', '[1e400]', '["\\ud800"]',
                                  '[123456789012345678901]', '[-9223372036854775809]'])
def test_loads_keeps_json_extensions_and_exact_integers(text):
    loaded, plain = loads_plain(text)
    assert not plain
    assert repr(loaded) == repr(json.loads(text))


def test_plain_ignores_number_shapes_inside_strings():
    assert loads_plain('{"id":"chatcmpl-16ecd917216e02","fp":"fp_3e5","x":-0.5}')[1]
    assert not loads_plain('{"x":-1.5e-05}')[1]
    assert not loads_plain('{"x": 2E+20}')[1]
    assert not loads_plain('[0.00005]')[1]


def _completion(logprob: float) -> dict:
    return Completion(
        text="hi ü", finish_reason="stop", usage=Usage(5, 2, 7, 0), model="m",
        tokens=[TokenLogprob("h", logprob, [("h", logprob), ("x", -25.5)]),
                TokenLogprob("i", -0.25, [("i", -0.25), ("y", -3.0)])],
    ).to_dict()


def test_dump_record_matches_json_for_tiny_logprobs_and_rejects_nan():
    request = ChatRequest([{"role": "user", "content": "q"}])
    for logprob in (-1.2e-05, -3e-9, 0.0, -0.5):
        record = build_record("a", request, _completion(logprob), model="m", base_host="h",
                              cost_usd=1e-05, created=1000.5)
        assert dump_record(record) == reference(record) + "\n"
    record = build_record("a", request, _completion(math.nan), model="m", base_host="h",
                          cost_usd=0.0, created=1000.5)
    with pytest.raises(ValueError):
        dump_record(record, COMPLETION_FIELDS - {"tokens"})


def test_cache_replay_writes_json_spelled_lines_and_rejects_nan_answers(tmp_path):
    """Answers put straight into the cache (no teacher runs: the URL is never contacted)."""
    teachers = write_teachers(tmp_path, "http://127.0.0.1:9/v1")
    prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(4))
    logprobs = [-1.2e-05, -0.5, math.nan, -2.0]
    generator = Generator(config(tmp_path, teachers, prompts, concurrency=2, failure_limit="5"))
    expected = {}
    for prompt, logprob in zip(generator.pending(), logprobs, strict=True):
        request = generator.defaults.request(prompt)
        completion = _completion(logprob)
        generator.cache.put(generator._key(request), completion, 0.5, None, created=1234.5)
        if not math.isnan(logprob):  # replayed as stored: canonical JSON, keys sorted
            stored = json.loads(canonical_json(completion))
            expected[prompt.id] = reference(build_record(
                prompt.id, request, stored, model="fake-teacher",
                base_host=generator.spec.base_host, cost_usd=0.5, created=1234.5)) + "\n"
    result = generator.generate()
    assert result.cache_hits == 4 and result.cache_misses == 0 and result.stop_reason is None
    assert result.failed_ids == ["q0002"] and result.failures == {"invalid_answer": 1}
    lines = (tmp_path / "kd.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert sorted(lines) == sorted(expected.values())
