"""The teacher client against a real third-party peer: ``mlx_lm.server`` serving a tiny local
checkpoint. Records how the client handles the server's quirks (FIELD-NOTES): with the
``mlx_lm_server`` quirk the client refuses what the server would answer wrongly, downgrades
streamed logprob requests, and sends ``logprobs`` as a bool; without it, the wrong tokens come
through (shown here) and legacy /completions logprobs are refused by the server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import random_model, tiny_config

from mlx_distill.checkpoint import load_checkpoint, save_checkpoint
from mlx_distill.generate import generate
from mlx_distill.teacher.client import AsyncTeacherClient
from mlx_distill.teacher.config import load_teacher
from mlx_distill.teacher.errors import InvalidRequest, RequestFailed
from mlx_distill.teacher.types import ChatRequest
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

MESSAGES = [{"role": "user", "content": "the weather in Zürich"}]
N_TOKENS = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_lm_server")
    rng = random.Random(0)
    words = ["the", "weather", "in", "Zürich", "is", "sunny", "rain", "😀", "{", "}", "42"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(300)))
    tok_dir = train_tokenizer([corpus], 400, root / "tokenizer")
    vocab_size = len(load_tokenizer(tok_dir))
    return save_checkpoint(random_model(tiny_config(vocab_size=vocab_size)), root / "ckpt",
                           tokenizer_dir=tok_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(ckpt, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("mlx_lm_log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(ckpt),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 45
        while True:
            if proc.poll() is not None:
                pytest.skip(f"mlx_lm.server exited with {proc.returncode} before serving: "
                            f"{log.read_text()[-300:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.skip("mlx_lm.server did not answer /health within 45 s")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def greedy_reference(ckpt):
    """Our own greedy decode of the same prompt: token ids and their logprobs."""
    model, tokenizer = load_checkpoint(ckpt), load_tokenizer(ckpt)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    tokens = list(generate(model, tokenizer, ids, max_tokens=N_TOKENS, temperature=0.0))
    return len(ids), [t.token for t in tokens], [t.logprob for t in tokens]


def run_client(spec, work):
    async def main():
        async with AsyncTeacherClient(spec, max_attempts=2) as client:
            return await work(client), client.stats
    return asyncio.run(main())


def request(**kwargs) -> ChatRequest:
    return ChatRequest(MESSAGES, max_tokens=N_TOKENS, temperature=0.0, **kwargs)


def test_with_the_quirk_the_client_gets_only_reliable_logprobs(server_url, greedy_reference):
    spec = dataclasses.replace(load_teacher("mlx-lm"), base_url=server_url)
    n_prompt, _, reference_logprobs = greedy_reference

    async def work(client):
        whole = await client.chat(request(top_logprobs=0))
        downgraded = await client.chat(request(top_logprobs=0), stream=True)
        plain = await client.chat(request())
        streamed = await client.chat(request(), stream=True)
        scored = await client.complete("the weather", max_tokens=3, temperature=0.0,
                                       top_logprobs=0)
        refused = []
        for call in (client.chat(request(top_logprobs=3)), client.chat(request(top_logprobs=12)),
                     client.complete("x", top_logprobs=0, echo=True)):
            with pytest.raises(InvalidRequest) as info:
                await call
            refused.append(str(info.value))
        return whole, downgraded, plain, streamed, scored, refused

    (whole, downgraded, plain, streamed, scored, refused), stats = run_client(spec, work)
    # Sampled-token logprobs are right: they match our own greedy decode of the same checkpoint.
    assert whole.usage.prompt_tokens == n_prompt and whole.usage.completion_tokens == N_TOKENS
    assert [t.logprob for t in whole.tokens] == pytest.approx(reference_logprobs, abs=1e-4)
    assert all(t.token == "" and t.top == [] for t in whole.tokens)  # it sends ids, no text
    # Streaming would drop the logprobs: the client asked unstreamed instead.
    assert (downgraded.text, downgraded.tokens) == (whole.text, whole.tokens)
    assert stats["stream_downgraded"] == 1
    # Without logprobs, real SSE streaming works and agrees with the whole answer.
    assert streamed.text == plain.text == whole.text and streamed.tokens is None
    assert streamed.usage.completion_tokens == N_TOKENS and streamed.finish_reason == "length"
    # /completions: logprobs went out as a bool, and came back in the chat layout.
    assert len(scored.tokens) == scored.usage.completion_tokens == 3
    assert "first entry of an unsorted top-k" in refused[0]
    assert "maximum of 11" in refused[1] and "echo" in refused[2]
    assert stats["requests"] == 5 and stats["failures"] == {}


def test_without_the_quirk_top_logprobs_come_back_wrong_and_legacy_logprobs_fail(
        server_url, greedy_reference):
    spec = load_teacher(server_url, model="default_model")
    _, _, reference_logprobs = greedy_reference

    async def work(client):
        answer = await client.chat(request(top_logprobs=3))
        with pytest.raises(RequestFailed) as info:
            await client.complete("the weather", max_tokens=3, top_logprobs=2)
        return answer, info.value

    (answer, failure), _ = run_client(spec, work)
    # Greedy decoding samples each position's top-1, and the client sorted every top-k list...
    assert all(t.top == sorted(t.top, key=lambda p: -p[1]) and len(t.top) == 3
               for t in answer.tokens)
    assert [t.top[0][1] for t in answer.tokens] == pytest.approx(reference_logprobs, abs=1e-4)
    # ...but mlx_lm.server reported another entry of its unsorted list as the sampled token, in
    # byte-level vocabulary spelling ("Ġ" for a space) rather than text.
    assert any(t.logprob < t.top[0][1] for t in answer.tokens)
    assert (failure.reason, failure.status, failure.attempts) == ("http_400", 400, 1)
    assert "logprobs must be of type bool" in failure.message
