"""The OpenAI backend against our teacher server on loopback (real HTTP), compared with the MLX
backend on the same checkpoint; and backend specs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from runtime_helpers import MESSAGES, TOOLS, make_checkpoint, make_tokenizer

from mlx_distill.runtime import BackendError, Finished, TokenEvent, open_backend, parse_spec
from mlx_distill.runtime.openai_backend import TIMING_NOTE
from mlx_distill.teacher.server import serve_in_thread


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_openai")
    return make_checkpoint(root, make_tokenizer(root), seed=3)


@pytest.fixture(scope="module")
def served(ckpt):
    url, stop = serve_in_thread(ckpt, model_id="tiny-teacher")
    with open_backend(f"openai:{url}#tiny-teacher") as backend:
        yield backend
    stop()


@pytest.fixture(scope="module")
def mlx(ckpt):
    return open_backend(f"mlx:{ckpt}")


@pytest.mark.parametrize("tools, options", [
    (None, {"max_tokens": 20}),
    (TOOLS, {"max_tokens": 16}),
    (None, {"max_tokens": 20, "stop": ["e"]}),
], ids=["plain", "tools", "stop"])
def test_greedy_answer_equals_the_mlx_backend(served, mlx, tools, options):
    got = served.run(MESSAGES, tools, **options)
    want = mlx.run(MESSAGES, tools, constrain_tools=False, **options)
    assert got.content == want.content and got.text == want.text
    assert got.tool_calls == want.tool_calls
    assert got.finish_reason == want.finish_reason
    assert (got.prompt_tokens, got.completion_tokens) == \
        (want.prompt_tokens, want.completion_tokens)
    assert not got.constrained
    assert got.backend.startswith("openai (tiny-teacher at 127.0.0.1:")


def test_the_answer_arrives_as_one_event(served):
    events = list(served.generate(MESSAGES, max_tokens=8))
    assert isinstance(events[-1], Finished)
    result = events[-1].result
    assert [e.text for e in events[:-1] if isinstance(e, TokenEvent)] == [result.text]
    # The first streamed chunk with output is timed; per-token gaps are not observable.
    assert 0 < result.ttft_s <= result.total_s and result.token_latencies_s == []
    assert result.decode_tokens_per_s is None and result.total_s > 0
    assert result.notes == [TIMING_NOTE]


def test_constraints_cannot_be_required_of_an_endpoint(served):
    with pytest.raises(BackendError, match="does not expose logits"):
        served.generate(MESSAGES, TOOLS, constrain_tools=True)
    with pytest.raises(BackendError, match="top_k: not an OpenAI API option"):
        served.generate(MESSAGES, top_k=5)
    result = served.run(MESSAGES, TOOLS, max_tokens=4, constrain_tools="auto")
    assert not result.constrained


def test_server_refusals_are_one_line_errors(served):
    # Our server supports tool_choice "auto"/"none" only: its 400 comes back as one line.
    with pytest.raises(BackendError, match="tool_choice"):
        served.run(MESSAGES, TOOLS, max_tokens=4, tool_choice="required")


# ---- specs ----

@pytest.mark.parametrize("spec, parsed", [
    ("mlx:runs/student", ("mlx", "runs/student", None)),
    ("mlx:runs/a#b", ("mlx", "runs/a#b", None)),
    ("coreml:out/s.mlpackage", ("coreml", "out/s.mlpackage", None)),
    ("coreml:out/s.mlpackage#runs/student", ("coreml", "out/s.mlpackage", "runs/student")),
    ("openai:http://127.0.0.1:8080/v1#m", ("openai", "http://127.0.0.1:8080/v1", "m")),
    ("openai:kimi", ("openai", "kimi", None)),
])
def test_parse_spec(spec, parsed):
    assert parse_spec(spec) == parsed


@given(st.text(max_size=30))
def test_other_specs_are_refused_with_the_forms(spec):
    kind, sep, rest = spec.partition(":")
    target, hashed, fragment = rest.partition("#")
    # mlx paths may hold '#'; elsewhere '#' separates two non-empty parts.
    if sep and rest and (kind == "mlx" or kind in ("coreml", "openai") and target
                         and (fragment or not hashed)):
        assert parse_spec(spec)[0] == kind
    else:
        with pytest.raises(BackendError, match="backend"):
            parse_spec(spec)


def test_unknown_teacher_names_the_config(tmp_path):
    teachers = tmp_path / "teachers.yaml"
    teachers.write_text("teachers: {}\n")
    with pytest.raises(BackendError, match=f"{teachers}: teachers.nope: no such teacher"):
        open_backend("openai:nope", teachers=teachers)
