"""The Core ML backend on an exported toy package, run by the MIL reference interpreter: the same
greedy tokens as MLX for prompts at, below (padded) and above the enumerated prefill lengths;
constrained tool calls; the contract and tokenizer checks."""

from __future__ import annotations

import json
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from runtime_helpers import MESSAGES, TOOLS, call_errors, make_checkpoint, make_tokenizer

from converters.export import contract_path, export_coreml
from converters.verify import TIE_MARGIN, margins, mlx_greedy
from mlx_distill.checkpoint import load_checkpoint
from mlx_distill.runtime import BackendError, CoreMLBackend, open_backend
from mlx_distill.runtime.coreml_backend import REFERENCE_LABEL

SHAPES, MAX_CONTEXT = (8, 32, 224), 288
STEPS = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_coreml")
    tokenizer_dir = make_tokenizer(root)
    ckpt = make_checkpoint(root, tokenizer_dir, seed=2)
    pkg = export_coreml(ckpt, root / "toy.mlpackage", precision="fp16", shapes=SHAPES,
                        max_context=MAX_CONTEXT)
    return root, ckpt, pkg


@pytest.fixture(scope="module")
def backend(built):
    return open_backend(f"coreml:{built[2]}")


@pytest.fixture(scope="module")
def model(built):
    return load_checkpoint(built[1], dtype=mx.float32)


def assert_same_greedy(got: list[int], want: list[int], want_logits: list[np.ndarray]) -> None:
    """Token for token, except that a step where MLX's top two logits lie within fp16 noise
    (verify-coreml's tie rule) may go either way; the sequences are compared up to there."""
    mismatch = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    if mismatch is not None:
        assert float(margins(want_logits[mismatch])) < TIE_MARGIN, (got, want)


@pytest.mark.parametrize("length", [5, 8, 20, 40, 250],
                         ids=["pad-to-8", "exactly-8", "pad-to-32", "pad-to-224",
                              "224-then-decode"])
def test_greedy_tokens_equal_mlx(backend, model, length):
    prompt = np.random.default_rng(length).integers(0, backend.vocab_size, length)
    want, want_logits = mlx_greedy(model, prompt, STEPS)
    result = backend.run_ids(prompt.tolist(), max_tokens=STEPS, constrain_tools=False)
    got = result.token_ids
    eos = next((i for i, t in enumerate(want) if t in backend.eos_ids), None)
    if eos is not None:  # generation ends at an end-of-turn token
        want, want_logits = want[:eos + 1], want_logits[:eos + 1]
    assert_same_greedy(got[:len(want)], want[:len(got)], want_logits)
    expected = backend.prefill_length(length)
    assert result.notes[0].startswith(f"prefill at enumerated length {expected}")
    assert result.backend == f"{REFERENCE_LABEL} (toy.mlpackage)"
    assert result.prompt_tokens == length


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs on macOS only")
def test_core_ml_itself_gives_mlx_greedy_tokens(built, model):  # pragma: macos
    native = CoreMLBackend(built[2], runtime="coreml")
    assert native.label == "coreml (toy.mlpackage)"
    for length in (5, 40, 250):
        prompt = np.random.default_rng(length).integers(0, native.vocab_size, length)
        want, want_logits = mlx_greedy(model, prompt, STEPS)
        got = native.run_ids(prompt.tolist(), max_tokens=STEPS).token_ids
        assert_same_greedy(got, want[:len(got)], want_logits)


def test_chat_greedy_equals_the_mlx_backend(built, backend):
    mlx = open_backend(f"mlx:{built[1]}")
    got = backend.run(MESSAGES, max_tokens=10)
    want = mlx.run(MESSAGES, max_tokens=10)
    assert got.prompt_tokens == want.prompt_tokens
    _, logits = mlx_greedy(load_checkpoint(built[1], dtype=mx.float32),
                           np.array(mlx.prompt_ids(MESSAGES)), 10)
    assert_same_greedy(got.token_ids, want.token_ids[:len(got.token_ids)], logits)


def test_constrained_calls_validate(backend):
    tools = TOOLS[1:2]
    for seed in range(3):
        result = backend.run(MESSAGES, tools, max_tokens=80, temperature=1.0, seed=seed,
                             tool_choice="required", parallel_tool_calls=False)
        assert result.constrained and result.finish_reason == "tool_calls", result.text
        assert call_errors(result, tools) == []
        assert result.mask_ms_per_token > 0
        assert REFERENCE_LABEL in result.backend


def test_the_context_window_ends_generation(backend):
    prompt = np.random.default_rng(0).integers(10, backend.vocab_size, MAX_CONTEXT - 2).tolist()
    result = backend.run_ids(prompt, max_tokens=20, constrain_tools=False)
    # Three tokens fit: one from prefill, two fed back into the last free cache slots.
    assert result.completion_tokens <= 3
    if not set(result.token_ids) & backend.eos_ids:
        assert result.completion_tokens == 3 and result.finish_reason == "length"
    with pytest.raises(BackendError, match=f"prompt has {MAX_CONTEXT + 1} tokens; toy.mlpackage "
                                           f"holds at most {MAX_CONTEXT}"):
        backend.generate_ids([1] * (MAX_CONTEXT + 1))


def test_tokenizer_from_the_spec_must_be_the_exported_one(built, tmp_path):
    root, ckpt, pkg = built
    explicit = open_backend(f"coreml:{pkg}#{ckpt}")
    assert explicit.tokenizer.encode("weather") == CoreMLBackend(pkg).tokenizer.encode("weather")
    other = make_tokenizer(tmp_path, vocab_size=500)
    with pytest.raises(BackendError, match="not the tokenizer toy.mlpackage was exported with"):
        open_backend(f"coreml:{pkg}", tokenizer=other)
    with pytest.raises(BackendError, match="tokenizer given twice"):
        open_backend(f"coreml:{pkg}#{ckpt}", tokenizer=ckpt)


def test_contract_problems_are_one_line_errors(built, tmp_path):
    _, _, pkg = built
    copy = tmp_path / "copy.mlpackage"
    shutil.copytree(pkg, copy)
    with pytest.raises(BackendError, match="copy.contract.json: missing"):
        CoreMLBackend(copy)
    contract = json.loads(contract_path(pkg).read_text())
    contract["source"]["checkpoint"] = str(tmp_path / "gone")
    contract_path(copy).write_text(json.dumps(contract))
    with pytest.raises(BackendError, match="source.checkpoint .*gone no longer exists"):
        CoreMLBackend(copy)
    del contract["prefill_shapes"]
    contract_path(copy).write_text(json.dumps(contract))
    with pytest.raises(BackendError, match="prefill_shapes: required field is missing"):
        CoreMLBackend(copy)
    with pytest.raises(BackendError, match="expected a .mlpackage path"):
        CoreMLBackend(tmp_path / "model.bin")
    with pytest.raises(BackendError, match="Core ML runs on macOS only"):
        CoreMLBackend(pkg, runtime="coreml")
