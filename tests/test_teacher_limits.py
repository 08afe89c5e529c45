"""Rate limits (sliding-window RPM/TPM, server hints, virtual clock), budget, pricing bounds."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.teacher.budget import Budget
from mlx_distill.teacher.config import Pricing, Tier, token_bounds
from mlx_distill.teacher.errors import BudgetExceeded
from mlx_distill.teacher.limits import (
    RateLimits,
    SlidingWindowLimiter,
    parse_duration,
    parse_retry_after,
)
from mlx_distill.teacher.types import ChatRequest, Usage

WINDOW = 60.0


def window_sums(times: list[float], weights: list[float], window: float) -> list[float]:
    """Reference: for each admission, the total weight admitted in (t - window, t]."""
    return [math.fsum(w for s, w in zip(times, weights, strict=True) if t - window < s <= t)
            for t in times]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8),
       st.lists(st.tuples(st.floats(0, 40), st.integers(1, 10)), min_size=1, max_size=60))
def test_sliding_window_never_exceeds_the_limit_in_any_window(limit, arrivals):
    limiter = SlidingWindowLimiter(limit * 5, WINDOW)
    now, times, weights = 0.0, [], []
    for gap, weight in arrivals:
        now += gap
        slot = limiter.reserve(now, weight)
        assert slot.time >= now and (not times or slot.time >= times[-1])
        assert slot.weight == min(weight, limit * 5)  # bigger than a window: goes in alone
        weight = slot.weight
        earliest = max(now, times[-1]) if times else now
        if slot.time > earliest:  # it waited: a moment earlier the weight would not have fit
            before = max(earliest, slot.time - 1e-6)
            in_window = math.fsum(w for s, w in zip(times, weights, strict=True)
                                  if before - WINDOW < s <= before)
            assert in_window + weight > limit * 5
        times.append(slot.time)
        weights.append(weight)
    assert max(window_sums(times, weights, WINDOW)) <= limit * 5


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.lists(st.floats(0, 30), min_size=1, max_size=50))
def test_rpm_any_limit_plus_one_admissions_span_a_full_window(rpm, gaps):
    limiter = SlidingWindowLimiter(rpm, WINDOW)
    times = [limiter.reserve(t, 1).time for t in itertools.accumulate(gaps)]
    assert all(times[i + rpm] - times[i] >= WINDOW for i in range(len(times) - rpm))


def test_a_token_bucket_would_burst_twice_the_rate_but_the_window_log_does_not():
    rpm = 10
    tokens, last, bucket_times = float(rpm), 0.0, []
    for t in [0.0] * rpm + [59.9] * rpm:  # full bucket at 0, refilled by 59.9
        tokens = min(rpm, tokens + (t - last) * rpm / WINDOW)
        last = t
        if tokens >= 1:
            tokens -= 1
            bucket_times.append(t)
    # 19 requests inside one 60 s window: nearly twice the rate.
    assert max(window_sums(bucket_times, [1] * len(bucket_times), WINDOW)) == 2 * rpm - 1
    limiter = SlidingWindowLimiter(rpm, WINDOW)
    times = [limiter.reserve(t).time for t in [0.0] * rpm + [59.9] * rpm]
    assert max(window_sums(times, [1] * len(times), WINDOW)) == rpm


def test_settled_tokens_free_capacity():
    tpm = SlidingWindowLimiter(1000, WINDOW)
    first = tpm.reserve(0.0, 900)
    assert tpm.earliest(1.0, 500) > WINDOW  # the estimate blocks a second request
    tpm.settle(first, 100)  # the answer used far fewer tokens than estimated
    assert tpm.earliest(1.0, 500) == 1.0
    assert tpm.reserve(0, 5000).time >= 1.0  # larger than the window: waits, then goes alone


class VirtualClock:
    """Time that only moves when every task is asleep: minutes of schedule in milliseconds."""

    def __init__(self):
        self.now = 0.0
        self._sleepers: list = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), next(self._order), future))
        await future

    async def run(self, coroutines):
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        while not all(t.done() for t in tasks):
            for _ in range(50):
                await asyncio.sleep(0)
            while self._sleepers:
                when, _, future = heapq.heappop(self._sleepers)
                if not future.done():  # a cancelled sleep does not move time
                    self.now = max(self.now, when)
                    future.set_result(None)
                    break
        return [t.result() for t in tasks]


def run_virtual(tier: Tier, jobs, **kwargs):
    clock = VirtualClock()
    limits = RateLimits(tier, clock=clock, sleep=clock.sleep, margin_s=0.0, **kwargs)
    peak = [0]

    async def one(tokens, latency, actual):
        permit = await limits.acquire(tokens)
        peak[0] = max(peak[0], limits.in_flight)
        await clock.sleep(latency)
        limits.release(permit, actual)
        return permit

    async def main():
        return await clock.run([one(*job) for job in jobs])

    return asyncio.run(main()), peak[0], limits, clock


def test_rate_limits_hold_rpm_tpm_and_concurrency_on_a_virtual_clock():
    tier = Tier(concurrency=3, rpm=5, tpm=2000)
    rng = random.Random(0)
    jobs = [(rng.randint(50, 400), rng.uniform(0.1, 30), None) for _ in range(40)]
    permits, peak, _, clock = run_virtual(tier, jobs)
    starts = [p.start for p in permits]
    order = sorted(range(len(starts)), key=starts.__getitem__)
    times = [starts[i] for i in order]
    assert peak == 3
    assert max(window_sums(times, [1] * len(times), WINDOW)) <= tier.rpm
    assert max(window_sums(times, [jobs[i][0] for i in order], WINDOW)) <= tier.tpm
    assert clock.now >= (len(jobs) // tier.rpm - 1) * WINDOW  # 40 requests at 5/min take ≥ 7 min


def test_actual_usage_replaces_the_tpm_estimate():
    tier = Tier(concurrency=10, rpm=1000, tpm=1000)
    estimated = run_virtual(tier, [(600, 1.0, None)] * 3)[0]
    settled = run_virtual(tier, [(600, 1.0, 100)] * 3)[0]
    assert max(p.start for p in estimated) >= 2 * WINDOW  # 600-token estimates: one per window
    # Settled to 100 tokens when each answer arrives (after 1 s): the next one fits right then.
    assert sorted(p.start for p in settled) == [0.0, 1.0, 2.0]


def test_server_rate_limit_headers_and_pauses_are_obeyed():
    async def scenario():
        clock = VirtualClock()
        limits = RateLimits(Tier(10, 1000, 10**6), clock=clock, sleep=clock.sleep)
        starts = []

        async def go(tokens):
            permit = await limits.acquire(tokens)
            starts.append(clock())
            limits.release(permit, tokens)

        limits.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"})
        await clock.run([go(10)])
        limits.observe({"x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "6m0s"})
        await clock.run([go(400)])  # fits in the 500 left
        await clock.run([go(400)])  # 100 left now: wait for the token reset
        limits.pause(0.05)  # e.g. 429 with Retry-After: 0.05
        await clock.run([go(1)])
        return starts

    starts = asyncio.run(scenario())
    assert starts[0] == pytest.approx(2.0)
    assert starts[1] == pytest.approx(2.0)
    assert starts[2] == pytest.approx(2.0 + 360.0)
    assert starts[3] == pytest.approx(starts[2] + 0.05)


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
    ("250us", 0.00025), ("", None), ("soon", None), ("-1", None), ("1x", None), (None, None),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.05") == 0.05
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now) == pytest.approx(30.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0
    assert parse_retry_after("not a date") is None


# ---- budget ----

budget_ops = st.lists(st.tuples(st.sampled_from(["reserve", "commit", "release"]),
                                st.floats(0, 3), st.floats(0, 1), st.integers(0, 1000)),
                      max_size=80)


@settings(max_examples=200, deadline=None)
@given(st.none() | st.floats(0, 10), st.floats(0, 2), budget_ops)
def test_budget_is_never_exceeded_and_matches_a_reference(cap, spent0, ops):
    budget = Budget(cap, spent0)
    if cap is not None and spent0 > cap:
        cap = budget.cap = spent0  # resumed at the cap: nothing more may be reserved
    open_, spent = {}, [spent0]
    for op, amount, fraction, pick in ops:
        if op == "reserve":
            fits = cap is None or math.fsum([*spent, *open_.values(), amount]) <= cap
            try:
                r = budget.reserve(amount)
            except BudgetExceeded as exc:
                assert not fits and exc.requested_usd == amount
            else:
                assert fits
                open_[r] = amount
        elif open_:
            r = sorted(open_, key=lambda x: x.id)[pick % len(open_)]
            amount = open_.pop(r)
            if op == "commit":
                budget.commit(r, amount * fraction)
                spent.append(amount * fraction)
            else:
                budget.release(r)
        assert budget.spent == pytest.approx(math.fsum(spent), abs=1e-12)
        assert budget.reserved == pytest.approx(math.fsum(open_.values()), abs=1e-12)
        if cap is not None:
            assert budget.spent + budget.reserved <= cap + 1e-9
            assert budget.remaining == pytest.approx(cap - budget.spent - budget.reserved,
                                                     abs=1e-9)


def test_budget_settles_once_and_is_thread_safe():
    budget = Budget(5.0)
    r = budget.reserve(1.0)
    budget.commit(r, 0.5)
    with pytest.raises(ValueError, match="already"):
        budget.commit(r, 0.5)
    budget.release(r)  # releasing a settled reservation is a no-op
    assert (budget.spent, budget.reserved) == (0.5, 0.0)

    committed = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(300):
            try:
                reservation = budget.reserve(rng.uniform(0, 0.05))
            except BudgetExceeded:
                continue
            assert budget.spent + budget.reserved <= 5.0 + 1e-9
            actual = reservation.amount * rng.random()
            budget.commit(reservation, actual)
            committed.append(actual)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.reserved == 0.0
    assert budget.spent == pytest.approx(0.5 + math.fsum(committed)) and budget.spent <= 5.0


# ---- pricing ----

def test_cost_prices_cached_prompt_tokens_at_the_hit_price():
    pricing = Pricing(input_cache_hit=0.15, input_cache_miss=0.60, output=2.50)
    cost = pricing.cost(Usage(prompt_tokens=1_000_000, completion_tokens=200_000,
                              total_tokens=1_200_000, cached_tokens=400_000))
    assert cost == pytest.approx(0.4 * 0.15 + 0.6 * 0.60 + 0.2 * 2.50)
    assert Pricing().cost(Usage(10, 10, 20)) == 0.0


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(1)
    words = ["the", "weather", "Zürich", "tool", "😀", '{"', '":', "name", "  ", "\n", "日本"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join("".join(rng.choices(words, k=20)) for _ in range(400)))
    return load_tokenizer(train_tokenizer([corpus], 600, root / "tokenizer"))


message_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
roles = st.sampled_from(["system", "user", "assistant"])
tools = st.lists(st.builds(
    lambda name, desc, prop: {"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": {prop: {"type": "string"}}}}},
    st.text("abcdef_", min_size=1, max_size=10), message_text, st.text("xyz", min_size=1)),
    max_size=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(roles, message_text), min_size=1, max_size=5), tools,
       st.integers(1, 4000))
def test_worst_case_bounds_the_real_prompt_token_count(chat_tokenizer, messages, tool_list,
                                                       max_tokens):
    messages = [{"role": r, "content": c} for r, c in messages]
    request = ChatRequest(messages, tools=tool_list or None, max_tokens=max_tokens)
    rendered = chat_tokenizer.apply_chat_template(messages, tools=tool_list or None,
                                                  add_generation_prompt=True, tokenize=True)
    prompt_bound, completion_bound = token_bounds(request)
    assert len(rendered) <= prompt_bound and completion_bound == max_tokens
    pricing = Pricing(0.1, 1.0, 4.0)
    real = pricing.cost(Usage(len(rendered), max_tokens, len(rendered) + max_tokens, 0))
    assert real <= pricing.worst_case(request)


def test_worst_case_counts_images_and_n_choices():
    plain = ChatRequest([{"role": "user", "content": "hi"}], max_tokens=10)
    image = ChatRequest([{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
        max_tokens=10, extra={"n": 3})
    assert token_bounds(image)[0] >= token_bounds(plain)[0] + 4096
    assert token_bounds(image)[1] == 30
