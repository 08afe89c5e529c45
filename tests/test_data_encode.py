"""Encoding records into student tokens: prompt masking, target alignment, tool spans, bad records.

The public predecessor of this project trained with labels on the prompt and with teacher targets
shifted by the prompt length; the tests here pin both down against independent references (the
chat template rendered as text, and the teacher's own sampled tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_distill.data import (
    DataError,
    TokenVocab,
    encode_kd_record,
    encode_sft_example,
    load_dataset,
    render_turn,
)
from mlx_distill.teacher.records import build_record
from mlx_distill.teacher.types import ChatRequest, Completion, TokenLogprob, ToolCall
from mlx_distill.tokenizer import IM_END, load_tokenizer, train_tokenizer

CORPUS = Path(__file__).parent.parent / "mlx_distill" / "data" / "tiny_corpus.txt"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]
CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS.read_text() + '{"city": "Paris"} get_weather arguments\n' * 20)
    return load_tokenizer(train_tokenizer([corpus], 500, root / "tokenizer"))


@pytest.fixture(scope="module")
def vocab(tok):
    return TokenVocab(tok)


def teacher_tokens(vocab: TokenVocab, ids, alternatives=()) -> list[TokenLogprob]:
    """The teacher sampled exactly ``ids`` (logprob −0.25 each) with ``alternatives`` in top."""
    out = []
    for token_id in ids:
        data = vocab.bytes_of(int(token_id))
        text = data.decode("utf-8", errors="replace")
        top = [(text, -0.25)] + [(alt, -3.0 - n) for n, alt in enumerate(alternatives)
                                 if alt != text]
        out.append(TokenLogprob(text, -0.25, top, bytes=list(data)))
    return out


def kd_record(tok, vocab, messages, text="", calls=(), reasoning=None, *, tokens="canonical",
              finish_reason="stop", record_id="r1"):
    """A KD record as the teacher pipeline writes it; by default the teacher sampled the
    student tokenizer's canonical tokens of the completion (end-of-turn included)."""
    if tokens == "canonical":
        assistant = {"role": "assistant", "content": text,
                     "tool_calls": [c.to_dict() for c in calls]}
        if reasoning:
            assistant["reasoning_content"] = reasoning
        _, completion = render_turn(tok, vocab, messages, TOOLS, assistant)
        tokens = teacher_tokens(vocab, completion, alternatives=[" the", "is"])
    completion = Completion(text=text, reasoning=reasoning, tool_calls=list(calls),
                            finish_reason=finish_reason, tokens=tokens)
    return build_record(record_id, ChatRequest(messages=messages, tools=TOOLS),
                        completion.to_dict(), model="teacher", base_host="localhost",
                        cost_usd=0.0, created=1.0)


def rendered_completion(tok, messages, text, calls=()) -> tuple[str, str]:
    """(prompt text, completion text through end-of-turn) straight from the chat template."""
    prompt = tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True,
                                     tokenize=False)
    assistant = {"role": "assistant", "content": text, "tool_calls": [c.to_dict() for c in calls]}
    full = tok.apply_chat_template(messages + [assistant], tools=TOOLS, tokenize=False)
    completion = full[len(prompt):]
    return prompt, completion[: completion.rindex(IM_END) + len(IM_END)]


def test_loss_targets_are_exactly_the_completion(tok, vocab):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    example = encode_kd_record(kd_record(tok, vocab, messages, "Checking.", [CALL]), tok, vocab)
    arrays = example.arrays()
    prompt_text, completion_text = rendered_completion(tok, messages, "Checking.", [CALL])
    loss_at = np.flatnonzero(arrays["loss_mask"])
    # Labels only on the completion: it starts where the prompt ends, it runs to the end, and
    # its targets decode to the assistant turn as the template renders it, end token included.
    assert tok.decode(example.ids[: example.prompt_len].tolist()) == prompt_text
    assert loss_at.tolist() == list(range(example.prompt_len - 1, example.length))
    assert tok.decode(arrays["targets"][loss_at].tolist()) == completion_text
    assert arrays["targets"][loss_at].tolist() == example.completion_ids.tolist()
    # Position t reads token t and predicts token t + 1.
    assert np.array_equal(arrays["inputs"][1:], arrays["targets"][:-1])
    assert arrays["targets"][-1] == tok.convert_tokens_to_ids(IM_END)


def test_teacher_distribution_sits_on_the_token_it_was_sampled_for(tok, vocab):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    record = kd_record(tok, vocab, messages, "Beautiful is better than ugly.")
    arrays = encode_kd_record(record, tok, vocab, by_id=True).arrays(k=4)
    kd_at = np.flatnonzero(arrays["kd_mask"])
    assert len(kd_at) == len(record["tokens"])
    for t, token in zip(kd_at, record["tokens"], strict=True):
        # Unshifted: the teacher's sampled token is this position's target, with its logprob.
        assert vocab.bytes_of(int(arrays["targets"][t])) == bytes(token["bytes"])
        assert arrays["top_ids"][t, 0] == arrays["targets"][t]
        assert arrays["top_logprobs"][t, 0] == pytest.approx(token["logprob"])


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
@given(garbage=st.text(max_size=80), system=st.booleans())
def test_garbage_in_the_prompt_changes_no_loss_term(tok, vocab, garbage, system):
    answer = "Simple is better than complex."
    clean = [{"role": "user", "content": "Zen?"}]
    noisy = ([{"role": "system", "content": garbage}] if system else []) + [
        {"role": "user", "content": "Zen?" + garbage}]
    # The same teacher answer (same tokens and distributions) after two different prompts.
    tokens = kd_record(tok, vocab, clean, answer, [CALL])["tokens"]
    terms = []
    for messages in (clean, noisy):
        record = kd_record(tok, vocab, messages, answer, [CALL], tokens=[
            TokenLogprob.from_dict(t) for t in tokens])
        arrays = encode_kd_record(record, tok, vocab).arrays(k=3)
        at = arrays["loss_mask"] == 1
        terms.append({key: arrays[key][at] for key in
                      ("targets", "kd_mask", "tool_mask", "top_ids", "top_logprobs")})
    for key in terms[0]:
        assert np.array_equal(terms[0][key], terms[1][key]), key
    # ... and every teacher distribution landed on a loss position.
    assert terms[0]["kd_mask"].sum() == len(tokens)


def test_tool_mask_marks_the_tool_call_json(tok, vocab):
    messages = [{"role": "user", "content": "Weather?"}]
    example = encode_kd_record(kd_record(tok, vocab, messages, "One moment.", [CALL]), tok, vocab)
    arrays = example.arrays()
    marked = arrays["targets"][arrays["tool_mask"] == 1].tolist()
    json_text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert tok.decode(marked).strip() == json_text
    assert set(np.flatnonzero(arrays["tool_mask"])) <= set(np.flatnonzero(arrays["loss_mask"]))
    plain = encode_kd_record(kd_record(tok, vocab, messages, "No tools."), tok, vocab)
    assert plain.arrays()["tool_mask"].sum() == 0


def test_answer_cut_at_max_tokens_has_no_end_of_turn_label(tok, vocab):
    messages = [{"role": "user", "content": "Zen?"}]
    full = encode_kd_record(kd_record(tok, vocab, messages, "Flat is"), tok, vocab).arrays()
    cut = encode_kd_record(kd_record(tok, vocab, messages, "Flat is", finish_reason="length"),
                           tok, vocab).arrays()
    assert np.array_equal(full["targets"], cut["targets"])
    assert full["loss_mask"][-1] == 1 and cut["loss_mask"][-1] == 0 and cut["kd_mask"][-1] == 0
    assert np.array_equal(full["loss_mask"][:-1], cut["loss_mask"][:-1])


def test_sft_example_trains_the_last_assistant_turn_without_teacher(tok, vocab):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL.to_dict()]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "21 degrees."},
    ]
    example = encode_sft_example({"messages": messages, "tools": TOOLS}, tok, vocab,
                                 example_id="s1")
    arrays = example.arrays(k=2)
    _, completion_text = rendered_completion(tok, messages[:-1], "21 degrees.")
    assert tok.decode(arrays["targets"][arrays["loss_mask"] == 1].tolist()) == completion_text
    assert arrays["kd_mask"].sum() == 0 and np.all(arrays["top_logprobs"] == -np.inf)
    # The earlier assistant turn is context only.
    assert arrays["tool_mask"].sum() == 0


def test_tool_arguments_as_text_or_object(tok, vocab):
    call = ToolCall(id="c", name="get_weather", arguments='{"city":"Paris"}')
    messages = [{"role": "user", "content": "Weather?"}]
    record = kd_record(tok, vocab, messages, "", [call], tokens=None)
    as_text = encode_kd_record(record, tok, vocab).completion_ids.tolist()
    as_object = encode_kd_record(record, tok, vocab, tool_arguments="object").completion_ids
    assert '"arguments": {"city":"Paris"}}' in tok.decode(as_text)
    assert '"arguments": {"city": "Paris"}}' in tok.decode(as_object.tolist())
    broken = kd_record(tok, vocab, messages, "", [ToolCall("c", "get_weather", "[1]")],
                       tokens=None)
    with pytest.raises(ValueError, match=r"arguments: expected a JSON object"):
        encode_kd_record(broken, tok, vocab, tool_arguments="object")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_records_are_counted_by_reason_and_stop_the_run(tok, vocab, tmp_path):
    messages = [{"role": "user", "content": "Zen?"}]
    good = [kd_record(tok, vocab, messages, f"Answer {i}.", record_id=f"g{i}") for i in range(5)]
    missing = dict(good[0], id="m")
    del missing["tokens"]
    rows = [*good,
            "{not json",
            dict(good[0], id="v", schema="mlx-distill.kd/0"),
            missing,
            dict(good[0], id="e", text="", tool_calls=[]),
            dict(good[0], id="t", tokens=[{"token": "x", "logprob": "high", "top": []}]),
            dict(good[1]),  # duplicate id
            ]
    path = write_jsonl(tmp_path / "kd.jsonl", rows)
    data = load_dataset(path, tok, max_bad_fraction=0.6)
    assert [e.id for e in data.examples] == [f"g{i}" for i in range(5)]
    assert dict(data.report.bad.counts) == {
        "invalid JSON": 1, "wrong schema version": 1, "missing field": 1,
        "empty completion": 1, "invalid field": 1, "duplicate id": 1}
    assert data.report.records == 11 and data.report.kd == 5
    assert any("kd.jsonl:6" in m for m in data.report.bad.examples["invalid JSON"])
    with pytest.raises(DataError, match=r"6 of 11 records are bad .*wrong schema version: 1"):
        load_dataset(path, tok, max_bad_fraction=0.5)


def test_template_that_breaks_the_prompt_prefix_names_the_record(tok, vocab, tmp_path):
    # A template whose generation prompt is not how it renders the assistant turn.
    tok_dir = Path(tmp_path / "odd")
    train_tokenizer([CORPUS], 400, tok_dir)
    config_path = tok_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT>{% endif %}")
    config_path.write_text(json.dumps(config))
    odd = load_tokenizer(tok_dir)
    record = kd_record(tok, vocab, [{"role": "user", "content": "Zen?"}], "Yes.",
                       record_id="odd-1", tokens=None)
    path = write_jsonl(tmp_path / "kd.jsonl", [record])
    with pytest.raises(DataError, match=r"kd.jsonl:1 \(id 'odd-1'\): .*not a prefix"):
        load_dataset(path, odd, max_bad_fraction=0.0)


def test_non_byte_level_tokenizer_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordlevel = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(DataError, match="not a byte-level BPE tokenizer"):
        TokenVocab(wordlevel)
