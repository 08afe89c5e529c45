"""Local teacher server: real HTTP on loopback, checked against a dense, cache-free MLX forward of
the same weights (log-softmax in float64), mlx-lm's own Llama, and Hugging Face decoding."""

from __future__ import annotations

import codecs
import random
import shutil
import subprocess
import sys
import threading
import time

import httpx
import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model, tiny_config
from mlx.utils import tree_flatten, tree_unflatten
from teacher_server_helpers import (
    MESSAGES,
    TOOLS,
    Reference,
    chat_from_stream,
    post,
    stream_events,
)

from mlx_distill.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from mlx_distill.teacher.server import (
    add_serve_parser,
    make_app,
    serve_app_in_thread,
    serve_in_thread,
)
from mlx_distill.tokenizer import TOKENIZER_OUTPUT_FILES, load_tokenizer, train_tokenizer

CALL_BODY = '\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'


# ---- fixtures and the reference ----

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_tok")
    rng = random.Random(0)
    words = ["the", "weather", "in", "Zürich", "is", "sunny", "rain", "😀", "{", "}", "42",
             "city", "name"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(300)))
    return train_tokenizer([corpus], 400, root / "tokenizer")


@pytest.fixture(scope="module")
def ckpt(tok_dir, tmp_path_factory):
    vocab = len(load_tokenizer(tok_dir))
    model = random_model(tiny_config(vocab_size=vocab, max_seq_len=1024), seed=1)
    return save_checkpoint(model, tmp_path_factory.mktemp("teacher") / "ckpt",
                           tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def ref(ckpt):
    return Reference(load_checkpoint(ckpt), load_tokenizer(ckpt))


@pytest.fixture(scope="module")
def served(ckpt):
    app = make_app(ckpt, model_id="tiny-teacher")
    url, stop = serve_app_in_thread(app)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, app.state.engine
    stop()


@pytest.fixture(scope="module")
def client(served):
    return served[0]


# ---- generation ----

def test_logprobs_are_the_sampled_tokens_under_the_model(client, ref):
    data = post(client, "/chat/completions", {
        "model": "anything", "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0,
        "seed": 11, "logprobs": True, "top_logprobs": 20,
    })
    choice = data["choices"][0]
    entries = choice["logprobs"]["content"]
    prompt = ref.prompt_ids(MESSAGES)
    ids = [e["id"] for e in entries]
    # The reference conditions on the reported ids: it agrees only if they are the ones sampled.
    ref.check(ref.rows(prompt + ids)[len(prompt) - 1:-1], entries, 20)
    assert any(e["id"] != e["top_logprobs"][0]["id"] for e in entries)  # sampled, not top-1
    text = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
    assert text == choice["message"]["content"]
    assert data["model"] == "tiny-teacher" and data["object"] == "chat.completion"
    ended_by_eos = choice["finish_reason"] == "stop"
    assert choice["finish_reason"] in ("stop", "length")
    assert data["usage"] == {"prompt_tokens": len(prompt),
                             "completion_tokens": len(ids) + ended_by_eos,
                             "total_tokens": len(prompt) + len(ids) + ended_by_eos,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_greedy_follows_the_reference_argmax(client, ref):
    data = post(client, "/chat/completions", {
        "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "logprobs": True,
    })
    entries = data["choices"][0]["logprobs"]["content"]
    prompt = ref.prompt_ids(MESSAGES)
    rows = ref.rows(prompt + [e["id"] for e in entries])[len(prompt) - 1:-1]
    assert [e["id"] for e in entries] == rows.argmax(axis=-1).tolist()
    assert all(e["top_logprobs"] == [] for e in entries)
    # top_p small enough to keep one token is greedy too, at any temperature.
    nucleus = post(client, "/chat/completions", {
        "messages": MESSAGES, "max_tokens": 10, "temperature": 1.5, "top_p": 1e-6,
        "logprobs": True, "seed": 3,
    })
    assert nucleus["choices"][0]["logprobs"]["content"] == entries


def test_seed_reproduces_and_streaming_equals_plain(client):
    body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 1.0, "seed": 5,
            "logprobs": True, "top_logprobs": 5}
    plain = post(client, "/chat/completions", body)
    again = post(client, "/chat/completions", body)
    other = post(client, "/chat/completions", {**body, "seed": 6})
    content = plain["choices"][0]["message"]["content"]
    entries = plain["choices"][0]["logprobs"]["content"]
    assert again["choices"] == plain["choices"]
    assert [e["id"] for e in other["choices"][0]["logprobs"]["content"]] != [
        e["id"] for e in entries]
    events = stream_events(client, "/chat/completions",
                           {**body, "stream_options": {"include_usage": True}})
    streamed = chat_from_stream(events)
    assert streamed["content"] == content
    assert streamed["entries"] == entries
    assert streamed["finish"] == plain["choices"][0]["finish_reason"]
    assert streamed["usage"] == plain["usage"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["choices"] == []
    assert {e["system_fingerprint"] for e in events} == {plain["system_fingerprint"]}

    # A stop string cuts the text, and the tokens lying wholly inside the cut-off part go.
    stop = next(content[i:i + 2] for i in range(4, len(content) - 2)
                if "\ufffd" not in content[i:i + 2])
    cut = content.find(stop)
    stopped = post(client, "/chat/completions", {**body, "stop": [stop]})
    assert stopped["choices"][0]["message"]["content"] == content[:cut]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    starts, decoder, offset = [], codecs.getincrementaldecoder("utf-8")("replace"), 0
    for e in entries:
        starts.append(offset)
        offset += len(decoder.decode(bytes(e["bytes"])))
    kept = [e for e, start in zip(entries, starts, strict=True) if start < cut]
    assert stopped["choices"][0]["logprobs"]["content"] == kept
    streamed = chat_from_stream(stream_events(client, "/chat/completions", {**body,
                                                                           "stop": stop}))
    assert (streamed["content"], streamed["entries"]) == (content[:cut], kept)


def test_usage_counts_the_templated_prompt_with_tools(client, ref):
    data = post(client, "/chat/completions", {
        "messages": MESSAGES, "tools": TOOLS, "max_tokens": 3, "temperature": 0,
        "tool_choice": "none",
    })
    prompt = ref.prompt_ids(MESSAGES, TOOLS)
    assert len(prompt) > len(ref.prompt_ids(MESSAGES)) + 20  # the tools were rendered
    assert data["usage"]["prompt_tokens"] == len(prompt)
    # Greedy on a random model ends by length here (eos is not the argmax).
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3


# ---- scoring ----

def test_score_endpoint_matches_the_reference(client, ref):
    completion = "sunny in Zürich 😀 {42}"
    data = post(client, "/score", {"messages": MESSAGES, "completion": completion,
                                   "top_logprobs": 20})
    prompt = ref.prompt_ids(MESSAGES)
    ids = ref.tok.encode(completion, add_special_tokens=False)
    assert [t["id"] for t in data["tokens"]] == ids
    ref.check(ref.rows(prompt + ids)[len(prompt) - 1:-1], data["tokens"], 20)
    assert data["logprob"] == pytest.approx(sum(t["logprob"] for t in data["tokens"]))
    assert data["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                             "total_tokens": len(prompt) + len(ids)}
    by_ids = post(client, "/score", {"messages": MESSAGES, "completion_ids": ids,
                                     "top_logprobs": 20})
    assert by_ids["tokens"] == data["tokens"]


def test_echo_scores_the_prompt(client, ref):
    prompt = "the weather in Zürich is 😀 rain"
    data = post(client, "/completions", {"prompt": prompt, "echo": True, "max_tokens": 0,
                                         "logprobs": 5})
    choice = data["choices"][0]
    ids = ref.tok.encode(prompt, add_special_tokens=False)
    logprobs = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert logprobs["token_ids"] == ids
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    rows = ref.rows(ids)[:-1]
    expected = [row[t] for row, t in zip(rows, ids[1:], strict=True)]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    for row, top in zip(rows, logprobs["top_logprobs"][1:], strict=True):
        order = np.argsort(-row, kind="stable")[:5]
        assert list(top) == [ref.token_text(i) for i in order]
        assert list(top.values()) == pytest.approx(row[order].tolist(), abs=1e-4)
    assert logprobs["text_offset"] == [len(ref.tok.decode(ids[:i])) for i in range(len(ids))]
    assert data["usage"]["prompt_tokens"] == len(ids)
    assert data["usage"]["completion_tokens"] == 0


def test_chat_prompt_logprobs_vllm_extension(client, ref):
    data = post(client, "/chat/completions", {"messages": MESSAGES, "max_tokens": 1,
                                               "prompt_logprobs": 3})
    prompt = ref.prompt_ids(MESSAGES)
    positions = data["prompt_logprobs"]
    assert len(positions) == len(prompt) and positions[0] is None
    for row, token, position in zip(ref.rows(prompt)[:-1], prompt[1:], positions[1:],
                                    strict=True):
        entry = position[str(token)]
        assert entry["logprob"] == pytest.approx(row[token], abs=1e-4)
        assert entry["rank"] == 1 + int((row > row[token] + 1e-6).sum())
        for rank, top_id in enumerate(np.argsort(-row, kind="stable")[:3], start=1):
            assert position[str(top_id)]["rank"] == rank


def test_legacy_completion_streams_what_it_returns(client):
    body = {"prompt": "the weather", "max_tokens": 12, "temperature": 1.0, "seed": 9,
            "logprobs": 3, "echo": True}
    plain = post(client, "/completions", body)["choices"][0]
    events = stream_events(client, "/completions", body)
    text = "".join(e["choices"][0]["text"] for e in events)
    merged = {key: [v for e in events for v in e["choices"][0]["logprobs"][key]]
              for key in plain["logprobs"]}
    assert text == plain["text"] and text.startswith("the weather")
    assert merged == plain["logprobs"]
    assert events[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


# ---- a checkpoint saved by mlx-lm ----

def test_serves_a_checkpoint_saved_by_mlx_lm(tok_dir, tmp_path):
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    vocab = len(load_tokenizer(tok_dir))
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
        tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512,
    )
    peer = llama.Model(args)
    rng = np.random.default_rng(4)
    peer.update(tree_unflatten([
        (k, mx.array(0.15 * rng.standard_normal(v.shape).astype(np.float32)))
        for k, v in tree_flatten(peer.parameters())
    ]))
    out = tmp_path / "mlx-lm-llama"
    save_model(out, peer)
    save_config({k: v for k, v in vars(args).items() if k != "layer_types"}, out / "config.json")
    for name in TOKENIZER_OUTPUT_FILES:
        shutil.copyfile(tok_dir / name, out / name)
    reference = Reference(peer, load_tokenizer(out))
    url, stop = serve_in_thread(out)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            models = client.get("/models").json()["data"]
            data = post(client, "/chat/completions", {
                "messages": MESSAGES, "max_tokens": 8, "temperature": 0.7, "seed": 2,
                "logprobs": True, "top_logprobs": 4,
            })
    finally:
        stop()
    assert [m["id"] for m in models] == ["mlx-lm-llama"]
    assert models[0]["max_model_len"] == 512
    assert data["system_fingerprint"] == "fp_" + sha256_file(out / "model.safetensors")[:16]
    entries = data["choices"][0]["logprobs"]["content"]
    prompt = reference.prompt_ids(MESSAGES)
    reference.check(reference.rows(prompt + [e["id"] for e in entries])[len(prompt) - 1:-1],
                    entries, 4)


# ---- tool calls ----

@pytest.fixture(scope="module")
def tool_model_dir(tok_dir, tmp_path_factory):
    """A model wired to answer ``sunny<tool_call>{call}</tool_call><|im_end|>``: every layer adds
    nothing to the residual, so the next token depends only on the last one, and lm_head maps
    each token of the chain to its successor. The call's JSON is one added token."""
    from tokenizers import AddedToken, Tokenizer

    root = tmp_path_factory.mktemp("tool_model")
    tok_out = root / "tokenizer"
    shutil.copytree(tok_dir, tok_out)
    raw = Tokenizer.from_file(str(tok_out / "tokenizer.json"))
    raw.add_tokens([AddedToken(CALL_BODY, special=False, normalized=False)])
    raw.save(str(tok_out / "tokenizer.json"))
    tok = load_tokenizer(tok_out)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    chain = [encode("\n"), encode("sunny"), encode("<tool_call>"), encode(CALL_BODY),
             encode("</tool_call>"), encode("<|im_end|>")]
    assert all(len(ids) == 1 for ids in chain), chain
    chain = [ids[0] for ids in chain]
    config = tiny_config(vocab_size=len(tok), tie_embeddings=False, max_seq_len=1024)
    model = random_model(config, seed=7)
    for layer in model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    head = np.array(model.lm_head.weight)
    for a, b in zip(chain, chain[1:], strict=False):
        features = np.array(model.model(mx.array([[a]]))[0, -1])
        head[b] = 6.0 * features / np.linalg.norm(features)
    model.lm_head.weight = mx.array(head)
    return save_checkpoint(model, root / "ckpt", tokenizer_dir=tok_out), chain


def test_tool_calls_end_to_end(tool_model_dir):
    model_dir, chain = tool_model_dir
    body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 10, "temperature": 0,
            "logprobs": True}
    url, stop = serve_in_thread(model_dir)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            data = post(client, "/chat/completions", body)
            events = stream_events(client, "/chat/completions", body)
            untouched = post(client, "/chat/completions", {**body, "tool_choice": "none"})
    finally:
        stop()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "sunny"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Zürich"}'}
    assert [e["id"] for e in choice["logprobs"]["content"]] == chain[1:-1]
    assert data["usage"]["completion_tokens"] == len(chain) - 1  # eos included
    streamed = chat_from_stream(events)
    assert streamed["content"] == "sunny" and streamed["finish"] == "tool_calls"
    assert streamed["calls"] == [{"index": 0, **call}]
    assert streamed["entries"] == choice["logprobs"]["content"]
    plain = untouched["choices"][0]
    assert plain["message"]["content"] == "sunny<tool_call>" + CALL_BODY + "</tool_call>"
    assert plain["finish_reason"] == "stop" and "tool_calls" not in plain["message"]


# ---- errors, concurrency, command line ----

@pytest.mark.parametrize("path,body,param", [
    ("/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/completions", {"prompt": "the", "logprobs": 21}, "logprobs"),
    ("/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"messages": []}, "messages"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ("/chat/completions", {"messages": MESSAGES, "temperature": 3}, "temperature"),
    ("/chat/completions", {"messages": MESSAGES, "max_tokens": "9"}, "max_tokens"),
    ("/chat/completions", {"messages": MESSAGES, "max_tokens": 10_000}, "max_tokens"),
    ("/chat/completions", {"messages": MESSAGES, "n": 2}, "n"),
    ("/chat/completions", {"messages": MESSAGES, "stop": [""]}, "stop"),
    ("/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/completions", {"prompt": "the " * 1100}, "prompt"),
    ("/completions", {"prompt": [1, 10**6]}, "prompt"),
    ("/score", {"messages": MESSAGES}, "completion"),
    ("/score", {"messages": MESSAGES, "completion_ids": [-1]}, "completion_ids"),
    ("/score", {"messages": MESSAGES, "completion": "x", "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_requests_get_openai_errors_naming_the_field(client, path, body, param):
    error = post(client, path, body, status=400)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param.split("[")[0])


def test_malformed_and_misrouted_requests(client):
    bad = client.post("/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]["message"]
    overflow = post(client, "/chat/completions", {"messages": MESSAGES, "max_tokens": 10_000},
                    status=400)
    assert overflow["error"]["code"] == "context_length_exceeded"
    assert client.get("/nowhere").status_code == 404
    wrong = client.get("/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["message"]
    assert wrong.headers["allow"] == "POST"


def test_models_answers_while_the_model_is_busy(served):
    client, engine = served
    result = {}

    def chat():
        result["status"] = client.post("/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 2}).status_code

    with engine.lock:  # the model is busy: the chat request waits for it
        worker = threading.Thread(target=chat)
        worker.start()
        start = time.perf_counter()
        models = client.get("/models")
        assert models.status_code == 200 and time.perf_counter() - start < 5
        assert models.json()["data"][0]["id"] == "tiny-teacher"
        worker.join(0.3)
        assert worker.is_alive()
    worker.join(30)
    assert result["status"] == 200


def test_serve_command_bad_dir_and_startup_line(ckpt, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    missing = tmp_path / "missing"
    args = parser.parse_args(["serve", str(missing)])
    with pytest.raises(CheckpointError) as err:  # mlx-distill prints it as one line, exit 2
        args.func(args)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_distill", "teacher", "serve", str(ckpt), "--port", "0",
         "--model-id", "t1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith(f"serving {ckpt} as t1 at http://127.0.0.1:"), (
            line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.rsplit(" ", 1)[1]
        assert httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"] == "t1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chunked_prefill_and_scoring_agree_with_the_reference(client, ref, monkeypatch):
    from mlx_distill.teacher import server_infer

    # Chunks far shorter than the prompt: every KV-cache hand-over is crossed several times.
    monkeypatch.setattr(server_infer, "PREFILL_CHUNK", 5)
    monkeypatch.setattr(server_infer, "SCORE_CHUNK", 7)
    prompt = ref.prompt_ids(MESSAGES)
    greedy = post(client, "/chat/completions", {"messages": MESSAGES, "max_tokens": 6,
                                                 "temperature": 0, "logprobs": True,
                                                 "top_logprobs": 3, "prompt_logprobs": 2})
    entries = greedy["choices"][0]["logprobs"]["content"]
    rows = ref.rows(prompt + [e["id"] for e in entries])
    ref.check(rows[len(prompt) - 1:-1], entries, 3)
    assert [e["id"] for e in entries] == rows[len(prompt) - 1:-1].argmax(axis=-1).tolist()
    for row, token, position in zip(rows, prompt[1:], greedy["prompt_logprobs"][1:],
                                    strict=False):
        assert position[str(token)]["logprob"] == pytest.approx(row[token], abs=1e-4)
    scored = post(client, "/score", {"messages": MESSAGES, "completion_ids": prompt[:20],
                                     "top_logprobs": 3})
    ref.check(ref.rows(prompt + prompt[:20])[len(prompt) - 1:-1], scored["tokens"], 3)
