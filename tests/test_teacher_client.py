"""The teacher client against a real loopback server (FakeTeacher): faults, retries, budget,
limits, streaming, secrets; and teacher specs from teachers.yaml."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fake_teacher import FakeTeacher

from mlx_distill.config import ConfigError
from mlx_distill.teacher.budget import Budget
from mlx_distill.teacher.client import AsyncTeacherClient, TeacherClient
from mlx_distill.teacher.config import Pricing, Tier, load_teacher, token_bounds
from mlx_distill.teacher.errors import BudgetExceeded, InvalidRequest, RequestFailed
from mlx_distill.teacher.limits import RateLimits
from mlx_distill.teacher.types import ChatRequest

PRICED = Pricing(input_cache_hit=1.0, input_cache_miss=4.0, output=16.0)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def chat(i: int, **kwargs) -> ChatRequest:
    kwargs.setdefault("top_logprobs", 3)
    kwargs.setdefault("max_tokens", 40)
    return ChatRequest([{"role": "user", "content": f"prompt {i}: tell me something"}], **kwargs)


def client_for(fake: FakeTeacher, *, pricing: Pricing | None = None, read_s: float = 2.0,
               **kwargs) -> AsyncTeacherClient:
    spec = load_teacher(fake.base_url, model="fake")
    if pricing is not None:
        spec = dataclasses.replace(spec, pricing=pricing)
    kwargs.setdefault("backoff_base_s", 0.01)
    kwargs.setdefault("backoff_max_s", 0.05)
    return AsyncTeacherClient(spec, timeout=httpx.Timeout(5.0, read=read_s),
                              rng=random.Random(0), **kwargs)


def run(coroutine):
    return asyncio.run(coroutine)


async def one(fake, request, *, stream=False, **kwargs):
    async with client_for(fake, **kwargs) as client:
        try:
            return await client.chat(request, stream=stream), client
        except RequestFailed as exc:
            return exc, client


EXPECTED_REASON = {
    ("429", False): "http_429", ("500", False): "http_500", ("502", False): "http_502",
    ("503", False): "http_503", ("stall", False): "timeout", ("reset", False): "connection_reset",
    ("truncated_sse", False): "connection_reset", ("bad_json", False): "bad_json",
    ("truncated_sse", True): "truncated_stream",
}
MAYBE_BILLED = {"stall", "reset", "truncated_sse", "bad_json"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "sse"])
@pytest.mark.parametrize("fault", ["429", "500", "502", "503", "stall", "reset", "truncated_sse",
                                   "bad_json"])
def test_each_fault_is_retried_then_fails_with_its_reason(fault, stream):
    with FakeTeacher(faults={fault: 1.0}, stall_s=2.0) as fake:
        budget = Budget(1.0)
        request = chat(0)
        error, client = run(one(fake, request, stream=stream, max_attempts=3, budget=budget,
                                pricing=PRICED, read_s=0.3))
    assert isinstance(error, RequestFailed), error
    reason = EXPECTED_REASON.get((fault, stream), EXPECTED_REASON[(fault, False)])
    assert (error.reason, error.attempts) == (reason, 3)
    assert error.status == (int(fault) if fault.isdigit() else None)
    assert fake.request_count == 3 and fake.answered_count == 0
    assert client.stats["retries"] == 2 and client.stats["failures"] == {reason: 1}
    # Refused with a status: never billed. Cut or garbled answers may have been: worst case each.
    expected = 3 * PRICED.worst_case(request) if fault in MAYBE_BILLED else 0.0
    assert budget.spent == pytest.approx(expected) and budget.reserved == 0.0


@pytest.mark.parametrize("fault", ["429", "503", "stall", "reset", "truncated_sse", "bad_json"])
def test_each_fault_recovers_on_retry_with_the_clean_answer(fault):
    with FakeTeacher() as clean:
        expected, _ = run(one(clean, chat(1), stream=True))
    with FakeTeacher(faults={fault: 0.5}, fault_seed=3, stall_s=2.0) as fake:
        results = [run(one(fake, chat(1), stream=True, max_attempts=10, read_s=0.3))[0]
                   for _ in range(4)]
    assert all(r == expected for r in results)
    assert fake.injected[fault] > 0 and fake.request_count == 4 + fake.injected[fault]


def test_retry_after_is_a_minimum_wait_and_pauses_the_client():
    with FakeTeacher(faults={"429": 1.0}, retry_after_s=0.3) as fake:
        error, client = run(one(fake, chat(0), max_attempts=3))
    assert (error.reason, error.status, error.attempts) == ("http_429", 429, 3)
    gaps = [b - a for a, b in zip(fake.request_times, fake.request_times[1:], strict=False)]
    assert min(gaps) >= 0.3 and client.stats["rate_limited"] == 3


@pytest.mark.parametrize("bad_key", [False, True])
def test_client_errors_are_not_retried_and_carry_the_server_message(bad_key):
    with FakeTeacher(api_key="sk-right-key-0123456789") as fake:
        key = "sk-wrong-key-0123456789" if bad_key else "sk-right-key-0123456789"
        request = chat(0) if bad_key else chat(0, max_tokens=0)
        error, _ = run(one(fake, request, api_key=key))
    assert isinstance(error, RequestFailed) and error.attempts == 1 and fake.request_count == 1
    if bad_key:
        assert (error.reason, error.status) == ("http_401", 401)
        assert "Invalid Authentication" in str(error)
    else:
        assert (error.reason, error.status) == ("http_400", 400)
        assert "max_tokens must be a positive integer, got 0" in str(error)


def test_requests_refused_before_sending():
    with FakeTeacher() as fake:
        with pytest.raises(InvalidRequest, match="top_logprobs=21 exceeds .* maximum of 20"):
            run(one(fake, chat(0, top_logprobs=21)))
        request = chat(0)
        budget = Budget(PRICED.worst_case(request) * 0.99)
        with pytest.raises(BudgetExceeded, match="budget cap"):
            run(one(fake, request, budget=budget, pricing=PRICED))
        assert fake.request_count == 0 and budget.spent == 0.0 and budget.reserved == 0.0


def test_top_k_is_sorted_although_the_server_sends_it_unsorted():
    with FakeTeacher() as fake:
        raw = httpx.post(f"{fake.base_url}/chat/completions",
                         json=chat(5, top_logprobs=8).body("fake")).json()
        completion, _ = run(one(fake, chat(5, top_logprobs=8)))
    raw_tops = [[t["logprob"] for t in e["top_logprobs"]]
                for e in raw["choices"][0]["logprobs"]["content"]]
    assert any(lps != sorted(lps, reverse=True) for lps in raw_tops)
    assert len(completion.tokens) == len(raw_tops)
    for token, lps in zip(completion.tokens, raw_tops, strict=True):
        assert [lp for _, lp in token.top] == sorted(lps, reverse=True) and len(token.top) == 8


@pytest.mark.parametrize("model", ["fake-teacher", "fake-thinking"])
def test_streamed_and_whole_answers_are_identical(model):
    requests = [chat(i, top_logprobs=i % 4 if i % 5 else None, max_tokens=3 + i) for i in range(8)]
    requests.append(ChatRequest([{"role": "user", "content": "use the tool please"}], tools=TOOLS))
    requests.append(ChatRequest([{"role": "user", "content": "just chat, please"}], tools=TOOLS))

    async def both():
        async with client_for(fake) as client:
            return [(await client.chat(r), await client.chat(r, stream=True)) for r in requests]

    with FakeTeacher(model=model) as fake:
        pairs = run(both())
    for whole, streamed in pairs:
        assert whole == streamed
    assert any(w.finish_reason == "length" for w, _ in pairs)
    assert pairs[-2][0].tool_calls[0].name == "get_weather"
    assert set(json.loads(pairs[-2][0].tool_calls[0].arguments)) == {"city", "days"}
    assert pairs[-2][0].finish_reason == "tool_calls" and not pairs[-1][0].tool_calls
    assert all((w.reasoning is not None) == (model == "fake-thinking") for w, _ in pairs[:-2])


def test_first_streamed_output_is_timed_and_whole_answers_are_not():
    import time

    async def timed():
        async with client_for(fake) as client:
            started, streamed, whole = time.perf_counter(), [], [0.0]
            await client.chat(chat(1, max_tokens=6), stream=True, first_output=streamed)
            ended = time.perf_counter()
            await client.chat(chat(2, max_tokens=6), first_output=whole)
            return started, streamed, ended, whole

    with FakeTeacher(delay_s=0.05) as fake:
        started, streamed, ended, whole = run(timed())
    assert len(streamed) == 1 and started < streamed[0] <= ended
    assert whole == []  # cleared at the attempt; nothing streamed, so nothing timed


def test_legacy_completions_with_echo_stream_and_whole():
    async def both():
        async with client_for(fake) as client:
            kwargs = dict(max_tokens=5, top_logprobs=2, echo=True)
            return (await client.complete("the weather in Zürich", **kwargs),
                    await client.complete("the weather in Zürich", stream=True, **kwargs))

    with FakeTeacher() as fake:
        whole, streamed = run(both())
    assert whole == streamed and whole.text.startswith("the weather in Zürich")
    assert "".join(t.token for t in whole.tokens) == whole.text
    assert whole.tokens[0].top == [] and all(len(t.top) == 2 for t in whole.tokens[1:])


def test_mixed_faults_over_hundreds_of_prompts_every_prompt_ends_once_within_budget():
    n = 300
    requests = {f"p{i}": chat(i, top_logprobs=i % 6) for i in range(n)}
    worst = max(PRICED.worst_case(r) for r in requests.values())
    faults = {"429": 0.1, "500": 0.04, "502": 0.03, "503": 0.03, "stall": 0.01, "reset": 0.04,
              "truncated_sse": 0.04, "bad_json": 0.04}
    budget = Budget(worst * 200)
    outcomes: dict[str, list] = {pid: [] for pid in requests}
    peak = [0.0]

    async def go(client, pid):
        try:
            outcomes[pid].append(await client.chat(requests[pid], stream=int(pid[1:]) % 2 == 0))
        except RequestFailed as exc:
            outcomes[pid].append(exc.reason)
        except BudgetExceeded:
            outcomes[pid].append("budget")
        peak[0] = max(peak[0], budget.spent + budget.reserved)

    async def main():
        async with client_for(fake, budget=budget, pricing=PRICED, read_s=0.5,
                              max_attempts=4) as client:
            await asyncio.gather(*(go(client, pid) for pid in requests))
            return client.stats

    with FakeTeacher(faults=faults, fault_seed=11, stall_s=1.0) as fake:
        stats = run(main())
    with FakeTeacher() as clean:
        async def reference(pids):
            async with client_for(clean) as client:
                return {pid: await client.chat(requests[pid]) for pid in pids}
        stored = {pid: o[0] for pid, o in outcomes.items() if not isinstance(o[0], str)}
        expected = run(reference(list(stored)))

    assert all(len(o) == 1 for o in outcomes.values())  # every prompt ended exactly once
    failed = [o[0] for o in outcomes.values() if isinstance(o[0], str)]
    assert stored == expected and len(stored) > n // 3
    assert "budget" in failed and set(failed) - {"budget"} <= set(EXPECTED_REASON.values())
    assert peak[0] <= budget.cap and budget.spent <= budget.cap and budget.reserved == 0.0
    billed = sum(PRICED.cost(c.usage) for c in stored.values())
    assert budget.spent == pytest.approx(billed + stats["usd_uncertain"])
    assert stats["completed"] == len(stored) and stats["requests"] == fake.request_count
    assert sum(stats["failures"].values()) == len(failed) - failed.count("budget")


def test_rpm_limit_holds_at_the_server_in_every_sliding_window():
    # A 1 s window stands in for the minute. The limiter counts sends; the server counts
    # arrivals, which lag sends by a varying few ms (a new connection more): margin_s covers it.
    window, rpm, margin, n = 1.0, 4, 0.25, 9
    with FakeTeacher() as fake:
        async def burst():
            limits = RateLimits(Tier(concurrency=16, rpm=rpm, tpm=10**9), window_s=window,
                                margin_s=margin)
            async with client_for(fake, limits=limits) as client:
                await asyncio.gather(*(client.chat(chat(i)) for i in range(n)))
        run(burst())
        times = sorted(fake.request_times)
    assert len(times) == n
    assert all(times[i + rpm] - times[i] >= window for i in range(n - rpm))
    assert times[-1] - times[0] < 2 * (window + margin) + 0.5  # and no slower than needed


def test_server_rate_limit_headers_hold_the_next_request():
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms"}
    with FakeTeacher(extra_headers=headers) as fake:
        async def two():
            async with client_for(fake) as client:
                await client.chat(chat(0))
                await client.chat(chat(1))
        run(two())
    assert fake.request_times[1] - fake.request_times[0] >= 0.3


def test_cancelled_request_is_charged_its_worst_case():
    request = chat(0)
    budget = Budget(1.0)

    async def cancel():
        async with client_for(fake, budget=budget, pricing=PRICED) as client:
            task = asyncio.ensure_future(client.chat(request))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return client.limits.in_flight

    with FakeTeacher(delay_s=2.0) as fake:
        assert run(cancel()) == 0
    assert budget.spent == pytest.approx(PRICED.worst_case(request)) and budget.reserved == 0.0


class _EchoKeyHandler(BaseHTTPRequestHandler):
    """A server that quotes the Authorization header back in its error (some APIs do)."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"message": f"bad key {self.headers['Authorization']}"}})
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_the_api_key_never_appears_in_errors_reprs_stats_or_logs(monkeypatch, caplog):
    secret = "sk-SECRET-5f2b9c1d7e4a8b3c6d0e9f1a"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoKeyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FAKE_TEACHER_KEY", secret)
    spec = dataclasses.replace(load_teacher(f"http://127.0.0.1:{server.server_address[1]}/v1"),
                               api_key_env="FAKE_TEACHER_KEY")
    try:
        with TeacherClient(spec) as client, pytest.raises(RequestFailed) as info:
            client.chat(chat(0))
        texts = [str(info.value), repr(info.value), repr(client), str(client.stats), caplog.text,
                 repr(client._client._http)]
    finally:
        server.shutdown()
        server.server_close()
    assert info.value.reason == "http_403" and "bad key Bearer [REDACTED]" in str(info.value)
    assert not any(secret in t or secret[:16] in t or secret[16:] in t for t in texts)


def test_sync_client_from_many_threads():
    with FakeTeacher(delay_s=0.05) as fake:
        spec = load_teacher(fake.base_url, model="fake")
        results = {}
        with TeacherClient(spec) as client:
            def worker(k):
                for i in range(k * 10, k * 10 + 10):
                    results[i] = client.chat(chat(i))
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            assert client.stats["completed"] == 40 and client.stats["requests"] == 40
    assert len(results) == 40 and elapsed < 40 * 0.05  # threads overlapped on one loop


# ---- teacher specs ----

def test_named_teachers_and_ad_hoc_urls(monkeypatch):
    kimi = load_teacher("kimi")
    assert (kimi.base_host, kimi.model, kimi.api_key_env) == ("api.moonshot.ai", "kimi-k2.6",
                                                              "MOONSHOT_API_KEY")
    assert kimi.tiers["T0"] == Tier(1, 3, 500_000) and kimi.tiers["T5"] == Tier(1000, 10000,
                                                                                5_000_000)
    assert load_teacher("kimi", tier="T3").limits == Tier(200, 5000, 3_000_000)
    assert load_teacher("kimi", model="kimi-k3").fingerprint() == "api.moonshot.ai/kimi-k3"
    assert load_teacher("mlx-lm").quirks == ("mlx_lm_server",)
    local = load_teacher("http://127.0.0.1:8081/v1/", model="m")
    assert (local.base_url, local.fingerprint(), local.api_key_env) == (
        "http://127.0.0.1:8081/v1", "127.0.0.1:8081/m", None)
    assert local.pricing.is_free and local.pricing.worst_case(chat(0)) == 0.0
    monkeypatch.delenv("MOONSHOT_API_KEY", raising=False)
    with pytest.raises(Exception, match="set the environment variable MOONSHOT_API_KEY"):
        AsyncTeacherClient(kimi)
    with pytest.raises(ConfigError, match="tier 'T9' unknown"):
        load_teacher("kimi", tier="T9")
    with pytest.raises(ConfigError, match="no such teacher; known:"):
        load_teacher("nope")
    with pytest.raises(ConfigError, match="credentials in the URL") as info:
        load_teacher("https://user:sk-inline-secret@api.example.com/v1")
    assert "sk-inline-secret" not in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model"), r"teachers\.x\.model: required key is missing"),
    (lambda t: t["pricing"].update(output=-1), r"teachers\.x\.pricing\.output: expected a non-n"),
    (lambda t: t["tiers"]["a"].update(rpm=0), r"teachers\.x\.tiers\.a\.rpm: expected a positive"),
    (lambda t: t.update(tier="b"), r"teachers\.x\.tier: 'b' is not one of the tiers \['a'\]"),
    (lambda t: t.update(base_url="ftp://x"), r"teachers\.x\.base_url: expected an http\(s\) URL"),
    (lambda t: t.update(api_key_env="sk-123"), r"teachers\.x\.api_key_env: expected an environ"),
    (lambda t: t.update(colour="red"), r"teachers\.x\.colour: unknown key"),
    (lambda t: t.update(quirks=["odd"]), r"teachers\.x\.quirks: expected a list of"),
])
def test_bad_teacher_files_name_the_file_and_field(tmp_path, edit, message):
    spec = {"base_url": "http://h/v1", "model": "m", "api_key_env": None,
            "pricing": {"input_cache_hit": 0, "input_cache_miss": 0, "output": 0},
            "tiers": {"a": {"concurrency": 1, "rpm": 1, "tpm": 1}}, "tier": "a",
            "max_top_logprobs": 20, "max_tokens": 10}
    edit(spec)
    path = tmp_path / "teachers.yaml"
    path.write_text(json.dumps({"teachers": {"x": spec}}))
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_teacher("x", path=path)


def test_token_bounds_cover_the_fake_teachers_usage():
    with FakeTeacher() as fake:
        request = ChatRequest([{"role": "user", "content": "use the tool"}], tools=TOOLS)
        completion, _ = run(one(fake, request))
    prompt_bound, completion_bound = token_bounds(request)
    assert completion.usage.prompt_tokens <= prompt_bound
    assert completion.usage.completion_tokens <= completion_bound
