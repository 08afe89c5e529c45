"""The MLX backend: the same tokens as ``mlx_distill.generate``; tool calls from a random model
that always validate once constrained (and mostly do not otherwise); the streaming contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_helpers import MESSAGES, TOOLS, call_errors, make_checkpoint, make_tokenizer

from mlx_distill.generate import generate
from mlx_distill.runtime import (
    BackendError,
    Finished,
    MLXBackend,
    TokenEvent,
    open_backend,
)
from mlx_distill.teacher.server_infer import TokenScore
from mlx_distill.teacher.server_text import TextAssembler, joined
from mlx_distill.tokenizer import _token_bytes_table


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_mlx")
    return make_checkpoint(root, make_tokenizer(root))


@pytest.fixture(scope="module")
def backend(ckpt):
    return open_backend(f"mlx:{ckpt}")


def reference(backend, ids, **options) -> list[int]:
    return [t.token for t in generate(backend.model, backend.tokenizer, ids, **options)]


@pytest.mark.parametrize("options", [
    {"max_tokens": 24},
    {"max_tokens": 24, "temperature": 0.9, "seed": 3},
    {"max_tokens": 24, "temperature": 1.3, "top_p": 0.8, "top_k": 40, "seed": 11},
])
def test_same_tokens_as_generate(backend, options):
    ids = backend.prompt_ids(MESSAGES)
    result = backend.run(MESSAGES, **options)
    assert result.token_ids == reference(backend, ids, **options)
    assert result.text == "".join(t.text for t in generate(backend.model, backend.tokenizer, ids,
                                                           **options))
    assert result.prompt_tokens == len(ids)
    assert result.backend.startswith("mlx") and not result.constrained


def test_stop_strings_cut_the_text_as_generate_does(backend):
    ids = backend.prompt_ids(MESSAGES)
    free = backend.run(MESSAGES, max_tokens=30)
    stop = free.text[8:11]
    want = "".join(t.text for t in generate(backend.model, backend.tokenizer, ids, max_tokens=30,
                                            stop=stop))
    got = backend.run(MESSAGES, max_tokens=30, stop=stop)
    assert got.text == want == free.text[:free.text.find(stop)]
    assert got.finish_reason == "stop"


def test_stream_events_add_up_to_the_result(backend):
    events = list(backend.generate(MESSAGES, max_tokens=12, temperature=1.0, seed=5))
    tokens, (final,) = events[:-1], events[-1:]
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(final, Finished)
    result = final.result
    assert "".join(e.text for e in tokens) == result.text
    assert [e.token for e in tokens] == result.token_ids
    assert result.completion_tokens == len(tokens)
    assert result.ttft_s == pytest.approx(tokens[0].elapsed_s)
    assert result.token_latencies_s == pytest.approx([e.latency_s for e in tokens[1:]])
    assert all(b.elapsed_s >= a.elapsed_s for a, b in zip(tokens, tokens[1:], strict=False))
    assert result.total_s >= tokens[-1].elapsed_s
    assert result.decode_tokens_per_s > 0
    logprobs = [e.logprob for e in tokens]
    assert all(lp <= 0 for lp in logprobs)


# ---- constrained tool calls on a random model ----

@pytest.mark.parametrize("tools", [TOOLS, TOOLS[1:2], TOOLS[2:]], ids=["all", "add", "alarm"])
def test_constrained_calls_always_validate(backend, tools):
    for seed in range(6):
        result = backend.run(MESSAGES, tools, max_tokens=150, temperature=1.0, seed=seed,
                             tool_choice="required", parallel_tool_calls=False)
        assert result.constrained
        assert result.finish_reason == "tool_calls", result.text
        assert len(result.tool_calls) == 1 and result.content == ""
        assert call_errors(result, tools) == []
        assert result.token_ids[-1] in backend.eos_ids


def test_unconstrained_random_output_rarely_validates(backend):
    valid = 0
    for seed in range(4):
        result = backend.run(MESSAGES, TOOLS, max_tokens=40, temperature=1.0, seed=seed,
                             constrain_tools=False)
        assert not result.constrained
        valid += bool(result.tool_calls) and not call_errors(result, TOOLS)
    assert valid == 0  # a random model does not write a valid call by chance


def test_parallel_calls_and_named_tool(backend):
    choice = {"type": "function", "function": {"name": "set_alarm"}}
    names = []
    for seed in range(4):
        result = backend.run(MESSAGES, TOOLS, max_tokens=200, temperature=1.0, seed=seed,
                             tool_choice=choice)
        assert result.finish_reason == "tool_calls" and call_errors(result, TOOLS) == []
        names += [c.name for c in result.tool_calls]
    assert set(names) == {"set_alarm"} and len(names) >= 4


def test_auto_answers_are_text_or_valid_calls(backend):
    for seed in range(4):
        result = backend.run(MESSAGES, TOOLS, max_tokens=40, temperature=1.0, seed=seed)
        assert result.constrained
        assert call_errors(result, TOOLS) == []
        if not result.tool_calls:  # text without a call marker
            assert "<tool_call>" not in result.text
        if result.finish_reason == "stop":  # whole characters (a cut-off one is held back)
            assert "\ufffd" not in result.text


def test_greedy_constrained_call_is_the_masked_argmax(backend):
    """Each constrained greedy token is the most likely allowed one under an independent dense
    forward pass of the whole sequence (no KV cache)."""
    import mlx.core as mx

    from mlx_distill.runtime.constrain import ToolGrammar

    ids = backend.prompt_ids(MESSAGES, TOOLS)
    result = backend.run(MESSAGES, TOOLS, max_tokens=80, tool_choice="required")
    mask = ToolGrammar(backend.tokenizer, backend.vocab_size, TOOLS, "required").mask()
    full = ids + result.token_ids
    logits = np.array(backend.model(mx.array(full)[None])[0].astype(mx.float32))
    for i, token in enumerate(result.token_ids):
        row = np.where(mask.allowed(), logits[len(ids) + i - 1], -np.inf)
        assert token == int(np.argmax(row))
        mask.advance(token)


def test_result_matches_what_our_openai_server_would_send(backend):
    """The server's own token-to-response assembly gives the same content, calls and reason."""
    table = _token_bytes_table(backend.tokenizer)
    for seed, choice in ((0, "required"), (1, "auto")):
        result = backend.run(MESSAGES, TOOLS, max_tokens=100, temperature=1.0, seed=seed,
                             tool_choice=choice)
        assembler = TextAssembler(table, backend.eos_ids, [], parse_tools=True)
        deltas = [d for t in result.token_ids if (d := assembler.add(TokenScore(t, 0.0, [])))]
        if not assembler.done:
            deltas.append(assembler.finish())
        sent = joined(deltas)
        assert sent.text == result.content
        assert sent.finish_reason == result.finish_reason
        assert [c.to_dict() for c in sent.tool_calls or []] == \
            [c.to_dict() for c in result.tool_calls]


def test_mask_overhead_is_measured(backend):
    result = backend.run(MESSAGES, TOOLS, max_tokens=80, temperature=1.0, seed=2,
                         tool_choice="required")
    print(f"\nmask overhead: {result.mask_ms_per_token:.3f} ms/token over "
          f"{result.completion_tokens} tokens (vocab {backend.vocab_size})")
    assert 0 < result.mask_ms_per_token < 50


@pytest.mark.parametrize("options, message", [
    ({"max_tokens": 0}, "max_tokens: expected an integer >= 1"),
    ({"temperature": -1}, "temperature: expected >= 0"),
    ({"seed": -3}, "seed: expected an integer >= 0"),
    ({"constrain_tools": "yes"}, "constrain_tools: expected True, False or 'auto'"),
    ({"constrain_tools": 1}, "constrain_tools: expected True, False or 'auto'"),
    ({"constrain_tools": True}, "no tools to constrain to"),
])
def test_bad_options_fail_when_called(backend, options, message):
    with pytest.raises(BackendError, match=message):
        backend.generate(MESSAGES, **options)


def test_bad_prompts_and_directories(backend, tmp_path):
    with pytest.raises(BackendError, match="outside the model vocabulary"):
        backend.generate_ids([1, backend.vocab_size])
    with pytest.raises(BackendError, match="prompt is empty"):
        backend.generate_ids([])
    with pytest.raises(BackendError, match="messages: expected a non-empty list"):
        backend.generate([])
    with pytest.raises(BackendError, match=f"{tmp_path / 'none'}: checkpoint directory not found"):
        open_backend(f"mlx:{tmp_path / 'none'}")


def test_result_serializes(backend):
    result = backend.run(MESSAGES, TOOLS, max_tokens=60, tool_choice="required")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tool_calls"][0]["function"]["name"] == result.tool_calls[0].name
    assert data["constrained"] is True and data["backend"] == result.backend
    assert isinstance(MLXBackend(backend.model, backend.tokenizer).label, str)


def test_an_mlx_lm_model_gives_the_same_answers(ckpt, backend):
    from mlx_lm.utils import load

    model, tokenizer = load(str(ckpt))
    other = MLXBackend(model, tokenizer)
    assert other.vocab_size == backend.vocab_size
    for options in ({"max_tokens": 12}, {"max_tokens": 60, "tool_choice": "required"}):
        got, want = other.run(MESSAGES, TOOLS, **options), backend.run(MESSAGES, TOOLS, **options)
        assert got.token_ids == want.token_ids and got.text == want.text
