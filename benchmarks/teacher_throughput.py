"""``teacher generate`` throughput against a FakeTeacher on loopback.

1. Request throughput: every answer takes a fixed ``--delay`` (100 ms) at the server, so with
   ``--concurrency`` (32) requests in flight the bound is concurrency / delay = 320 req/s. The
   FakeTeacher runs in its own process (``tests/fake_teacher.py``) so the server's CPU does not
   compete with the generator's for one interpreter. Goal: achieved ≥ 0.9 × bound.
   The peer, against the same server in the same run: a bare aiohttp loop posting the same
   request bodies at the same concurrency and only reading the answers (no parsing, cache,
   budget or output). What it misses of the bound is the server's own overhead, not a client's.
2. RPM limit: a tier allowing ``--rpm`` requests per window. A 60-s window would take minutes, so
   the client's limiter gets a short ``--window`` (2 s, limit scaled to match) through
   ``Generator(client_options={"limits": RateLimits(tier, window_s=...)})``: the same sliding-window
   code with another constant. A FakeTeacher in its own process logs each request's arrival; we
   report the most arrivals in any window-long interval. ``--full-minute`` uses the real 60 s.
   Goal: never above the limit.
3. Cache replay: the prompts of part 1 again, into new outputs, all answered from the cache.
   Goal: ≥ 5,000 records/s.

    .venv/bin/python benchmarks/teacher_throughput.py [--prompts 1600] [--top-logprobs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from kd_helpers import prompt_records, write_prompts, write_teachers  # noqa: E402

from mlx_distill.teacher.config import Tier  # noqa: E402
from mlx_distill.teacher.kdgen import Generator  # noqa: E402
from mlx_distill.teacher.kdrun import GenerateConfig, resolve_teacher  # noqa: E402
from mlx_distill.teacher.limits import RateLimits  # noqa: E402
from mlx_distill.teacher.prompts import load_prompts  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1600, help="prompts for parts 1 and 3")
    p.add_argument("--delay", type=float, default=0.1, help="server seconds per answer")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--top-logprobs", type=int, default=5, help="alternatives per token")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--rpm", type=int, default=40, help="requests allowed per window (part 2)")
    p.add_argument("--window", type=float, default=2.0, help="seconds per rate window (part 2)")
    p.add_argument("--full-minute", action="store_true", help="part 2 with the real 60-s window")
    p.add_argument("--replays", type=int, default=3, help="cache replays (median reported)")
    return p.parse_args(argv)


def generate_config(directory: Path, teachers: Path, prompts: Path, name: str,
                    args) -> GenerateConfig:
    return GenerateConfig(
        prompts=prompts, out=directory / name, teacher="fake", teachers_config=teachers,
        cache=directory / "cache", concurrency=args.concurrency, progress=False,
        top_logprobs=args.top_logprobs, max_tokens=args.max_tokens,
    )


def run(directory: Path, teachers: Path, prompts: Path, name: str, args):
    """One ``teacher generate`` invocation, timed from the first cache lookup to the last fsync
    (excluding reading the prompts and opening the files)."""
    generator = Generator(generate_config(directory, teachers, prompts, name, args))
    start, cpu = time.perf_counter(), time.process_time()
    result = generator.generate()
    return result, time.perf_counter() - start, time.process_time() - cpu


def peer_rps(url: str, cfg: GenerateConfig, args) -> float:
    """Requests/s of a bare aiohttp loop sending ``teacher generate``'s own request bodies."""
    spec, defaults = resolve_teacher(cfg)
    records, _ = load_prompts(cfg.prompts, spec.max_top_logprobs)
    bodies = [json.dumps(defaults.request(p).body(spec.model)).encode() for p in records]

    async def main() -> float:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            queue = iter(bodies)

            async def worker():
                for body in queue:
                    async with session.post(f"{url}/chat/completions", data=body) as response:
                        await response.read()
                        assert response.status == 200, response.status

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            return len(bodies) / (time.perf_counter() - start)

    return asyncio.run(main())


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))


def request_throughput(tmp: Path, args) -> dict:
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_teacher.py"), "--port",
                               "0", "--delay", str(args.delay)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[1]
        teachers = write_teachers(tmp, url, concurrency=args.concurrency * 2,
                                  max_tokens=args.max_tokens)
        prompts = write_prompts(tmp / "p.jsonl", prompt_records(args.prompts))
        result, wall, cpu = run(tmp, teachers, prompts, "kd.jsonl", args)
        assert result.exit_code == 0 and result.cache_misses == args.prompts, result
        peer = peer_rps(url, generate_config(tmp, teachers, prompts, "peer.jsonl", args), args)
        replays, replay_cpu = [], []
        for i in range(args.replays):
            again, seconds, cpu_s = run(tmp, teachers, prompts, f"replay{i}.jsonl", args)
            assert again.cache_hits == args.prompts and again.cache_misses == 0, again
            replays.append(args.prompts / seconds)
            replay_cpu.append(args.prompts / cpu_s)
    finally:
        server.terminate()
        server.wait()
    return {"rps": args.prompts / wall, "bound": args.concurrency / args.delay, "peer_rps": peer,
            "cpu_ms_per_request": 1000 * cpu / args.prompts,
            "replay": statistics.median(replays), "replays": replays,
            "replay_per_cpu_s": statistics.median(replay_cpu),
            "bytes_per_record": (tmp / "kd.jsonl").stat().st_size / args.prompts}


def calibration() -> tuple[float, float]:
    """Seconds for a fixed pure-Python loop, and for reading and writing 20 MB of KD-shaped JSON:
    how fast this box is right now. On this VM the second one (objects, memory) varies up to
    ~1.7x from hour to hour while the first does not, and every figure here moves with it."""
    start, total = time.perf_counter(), 0
    for i in range(3_000_000):
        total += i
    loop_s = time.perf_counter() - start
    tokens = [{"token": f"t{i}", "logprob": -i / 7, "top": [[f"a{j}", -j / 3] for j in range(20)]}
              for i in range(24)]
    text = json.dumps([{"id": str(n), "tokens": tokens} for n in range(50)]).encode()
    start = time.perf_counter()
    for _ in range(-(-20_000_000 // len(text))):
        json.loads(text)
    return loop_s, time.perf_counter() - start


SERVER_LOGGING_ARRIVALS = """
import json, sys
sys.path.insert(0, sys.argv[2])
from fake_teacher import FakeTeacher
with FakeTeacher(delay_s=float(sys.argv[1])) as fake:
    print(fake.base_url, flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    print(json.dumps(fake.request_times), flush=True)
"""


def rpm_limit(tmp: Path, args) -> dict:
    """Arrivals are logged by a FakeTeacher in its own process: in this one, its handler threads
    would wait for the GIL and timestamp requests late and bunched."""
    window = 60.0 if args.full_minute else args.window
    rpm = args.rpm if not args.full_minute else max(args.rpm, 120)
    n = int(rpm * 3.5)  # three full windows and a half
    tier = Tier(concurrency=args.concurrency, rpm=rpm, tpm=10**9)
    server = subprocess.Popen([sys.executable, "-c", SERVER_LOGGING_ARRIVALS, str(args.delay),
                               str(REPO / "tests")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        teachers = write_teachers(tmp, url, concurrency=args.concurrency)
        prompts = write_prompts(tmp / "p.jsonl", prompt_records(n, prefix="r"))
        cfg = generate_config(tmp, teachers, prompts, "rpm.jsonl", args)
        start = time.perf_counter()
        result = Generator(cfg, {"limits": RateLimits(tier, window_s=window)}).generate()
        wall = time.perf_counter() - start
        assert result.exit_code == 0, result
        times, _ = server.communicate("", timeout=60)
        times = json.loads(times)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"window": window, "limit": rpm, "observed": max_in_window(times, window),
            "requests": len(times), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop_s, json_s = calibration()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        t = request_throughput(Path(a), args)
        r = rpm_limit(Path(b), args)
    t["calibration_s"], t["json_check_s"] = loop_s, json_s
    rows = [
        ("request throughput (req/s)", f"{t['rps']:.1f}", f"bound {t['bound']:.0f}",
         f"{t['rps'] / t['bound']:.2f}", "≥ 0.90"),
        ("bare aiohttp loop, same server (req/s)", f"{t['peer_rps']:.1f}",
         f"bound {t['bound']:.0f}", f"{t['peer_rps'] / t['bound']:.2f}", "peer"),
        ("ours / bare aiohttp loop", f"{t['rps'] / t['peer_rps']:.2f}", "", "", ""),
        (f"max requests in any {r['window']:g}-s window", str(r["observed"]),
         f"limit {r['limit']}", f"{r['observed'] / r['limit']:.2f}", "≤ 1.00"),
        ("cache replay (records/s)", f"{t['replay']:.0f}", "goal 5000",
         f"{t['replay'] / 5000:.2f}", "≥ 1.00"),
    ]
    print(f"{args.prompts} prompts, delay {args.delay * 1000:.0f} ms, concurrency "
          f"{args.concurrency}, top_logprobs {args.top_logprobs}, "
          f"{t['bytes_per_record']:.0f} bytes/record; RPM part: {r['requests']} requests in "
          f"{r['wall']:.1f} s; replays: {', '.join(f'{x:.0f}' for x in t['replays'])} rec/s")
    print(f"generator CPU: {t['cpu_ms_per_request']:.2f} ms per fetched request, "
          f"{t['replay_per_cpu_s']:.0f} replayed records per CPU-second; CPU check: "
          f"3M-step Python loop took {loop_s:.2f} s, reading 20 MB of JSON {json_s:.2f} s "
          f"(os.getloadavg {os.getloadavg()[0]:.1f})")
    print(f"{'measure':40} {'value':>8} {'reference':>12} {'ratio':>6} {'goal':>7}")
    for row in rows:
        print(f"{row[0]:40} {row[1]:>8} {row[2]:>12} {row[3]:>6} {row[4]:>7}")
    print(json.dumps({"throughput": t, "rpm": r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
