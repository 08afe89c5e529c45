"""Tokenizer training, loading, chat template, CLI, and mlx-lm interoperability."""

from __future__ import annotations

import json
import random
import re

import mlx.core as mx
import pytest
from helpers import random_model, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.cli import main
from mlx_distill.tokenizer import (
    ENDOFTEXT,
    IM_END,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    ByteLevelStreamingDetokenizer,
    TokenizerError,
    load_tokenizer,
    streaming_detokenizer,
    train_tokenizer,
)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
    ]},
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "21 °C and sunny."},
    {"role": "user", "content": "Thanks!"},
]

# Module-scoped fixtures are shared across hypothesis examples on purpose (read-only tokenizer).
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def write_corpus(path, lines: int = 400, seed: int = 0):
    rng = random.Random(seed)
    words = ["the", "weather", "in", "Zürich", "is", "sunny", "def", "return", "{", "}", "日本語",
             "😀", "tool", "call", "arguments", '"city":', "42", "naïve", "—", "\t"]
    path.write_text(
        "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(lines)) + "\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_tokenizer([write_corpus(root / "corpus.txt")], 500, root / "tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_writes_hf_tokenizer_files(tok_dir):
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == IM_END and config["pad_token"] == "<|pad|>"
    assert "chat_template" in config and config["model_max_length"] == 2048
    generation = json.loads((tok_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [SPECIAL_TOKENS.index(IM_END), 0]


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=st.text())
def test_any_text_round_trips(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detokenizer = streaming_detokenizer(tok)
    streamed = ""
    for token in ids:
        detokenizer.add_token(token)
        streamed += detokenizer.last_segment
    detokenizer.finalize()
    assert streamed + detokenizer.last_segment == text


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_streaming_detokenizer_matches_decode_for_any_ids(tok, data):
    # Arbitrary ids include split multi-byte characters and special tokens mid-text.
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    detokenizer = tok.detokenizer
    assert isinstance(detokenizer, ByteLevelStreamingDetokenizer)
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == tok.decode(ids)


def test_leading_space_and_nul_survive_streaming(tok):
    # mlx-lm's own BPE detokenizer drops a leading space and turns NUL into "Ā".
    for text in (" hello", "a\x00b", "  two"):
        detokenizer = streaming_detokenizer(tok)
        for token in tok.encode(text):
            detokenizer.add_token(token)
        detokenizer.finalize()
        assert detokenizer.text == text


def test_special_tokens_are_single_ids(tok):
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token) == [expected_id]
        assert tok.convert_tokens_to_ids(token) == expected_id
    ids = tok.encode(f"hi{IM_END}<tool_call>x</tool_call>")
    assert SPECIAL_TOKENS.index(IM_END) in ids and ids.count(4) == 1 and ids.count(5) == 1
    assert tok.eos_token_ids == {SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)}
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)  # no BOS added


def test_chat_template_with_tools_and_tool_calls(tok):
    text = tok.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n" in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")

    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert tok.decode(ids) == text
    # system, user, assistant, tool results (a user turn), assistant, user, generation prompt
    assert ids.count(SPECIAL_TOKENS.index("<|im_start|>")) == 7
    assert ids.count(SPECIAL_TOKENS.index("<tool_call>")) == 3  # 2 in the instructions, 1 call
    # mlx-lm recognises the format and parses the call back.
    inner = text.split("<|im_start|>assistant\n<tool_call>")[1].split("</tool_call>")[0]
    assert tok.tool_parser(inner) == {"name": "get_weather", "arguments": {"city": "Zürich"}}


def test_chat_template_variants(tok):
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"
    string_args = [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"x": 1}'}},
        {"function": {"name": "g", "arguments": {}}},
    ]}]
    text = tok.apply_chat_template(string_args, tokenize=False)
    assert text == (
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
        '</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call><|im_end|>\n'
    )
    no_think = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False,
        enable_thinking=False,
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    reasoning = [{"role": "assistant", "content": "4", "reasoning_content": "2+2"}]
    assert "<think>\n2+2\n</think>\n\n4<|im_end|>" in tok.apply_chat_template(
        reasoning, tokenize=False
    )


def test_cli_train(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "a.txt", seed=1)
    more = write_corpus(tmp_path / "b.txt", seed=2)
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--corpus", str(corpus), "--corpus", str(more),
            "--vocab-size", "400", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^vocab size: \d+", printed, re.M)
    assert "<|im_start|>=1" in printed and str(out) in printed
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert main(args) == 0  # a tokenizer-only directory may be replaced


def test_cli_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--corpus", "--vocab-size", "--out", "<tool_call>"):
        assert flag in text


@pytest.mark.parametrize("problem", ["missing", "empty", "small_vocab", "foreign_out"])
def test_cli_errors_are_one_line(tmp_path, capsys, problem):
    corpus = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    vocab = "400"
    if problem == "missing":
        corpus = tmp_path / "nope.txt"
    elif problem == "empty":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("")
    elif problem == "small_vocab":
        vocab = str(MIN_VOCAB_SIZE - 1)
    else:
        out.mkdir()
        (out / "model.safetensors").write_text("keep me")
    code = main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", vocab,
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mlx-distill tokenizer: error:")
    assert {"missing": "not found", "empty": "empty", "small_vocab": str(MIN_VOCAB_SIZE),
            "foreign_out": "other files"}[problem] in err
    if problem == "foreign_out":
        assert (out / "model.safetensors").read_text() == "keep me"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="positive integer"):
        train_tokenizer([tmp_path / "x"], 0, tmp_path / "t")


def test_mlx_lm_loads_checkpoint_with_our_tokenizer(tok, tok_dir, tmp_path):
    import mlx_lm

    model = random_model(tiny_config(vocab_size=len(tok)), seed=1)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_dir=tok_dir)
    lm_model, lm_tok = mlx_lm.load(str(ckpt))

    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert lm_tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True) == ids
    assert lm_tok.eos_token_ids == tok.eos_token_ids
    tokens = mx.array(ids)[None]
    ours, theirs = model(tokens), lm_model(tokens)
    assert ours.dtype == theirs.dtype == mx.float32
    assert mx.abs(ours - theirs).max().item() <= 1e-4
