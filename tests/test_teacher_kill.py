"""kill -9 a real ``teacher generate`` process at several points, resume, and compare with an
uninterrupted run: same records (ignoring ``created``), no duplicates, no torn lines, answers that
were committed before the kill never requested again, and the same USD spent.

An answer the server sent but the killed process had not yet committed to SQLite (a few ms per
request) is legitimately asked again after resume; the test checks exactly that boundary.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_teacher import FakeTeacher
from kd_helpers import (
    cli_args,
    config,
    prompt_records,
    read_records,
    without_created,
    write_prompts,
    write_teachers,
)

from mlx_distill.teacher.cache import CACHE_SCHEMA, DB_NAME, TeacherCache
from mlx_distill.teacher.config import load_teacher
from mlx_distill.teacher.kdgen import run_generate
from mlx_distill.teacher.types import ChatRequest

REPO = Path(__file__).resolve().parent.parent
N_PROMPTS = 60
# Fixed seed: the "random" kill times are reproducible run to run.
KILL_RNG = random.Random(20240611)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A FakeTeacher (40 ms per answer), the prompts, and an uninterrupted baseline run."""
    root = tmp_path_factory.mktemp("kill")
    with FakeTeacher(delay_s=0.04) as fake:
        teachers = write_teachers(root, fake.base_url)
        prompts = write_prompts(root / "p.jsonl", prompt_records(N_PROMPTS))
        base = config(root / "base", teachers, prompts, concurrency=4)
        base.out.parent.mkdir()
        assert run_generate(base) == 0
        records = read_records(base.out)
        spec = load_teacher("fake", path=teachers)
        keys = {ChatRequest(r["messages"], max_tokens=24, top_logprobs=5)
                .cache_key(spec.model, spec.fingerprint(), CACHE_SCHEMA): r["id"]
                for r in records}
        yield {"fake": fake, "teachers": teachers, "prompts": prompts, "root": root,
               "baseline": without_created(records), "keys": keys,
               "spent": json.loads(base.out.with_name("kd.jsonl.state.json").read_text())
               ["spent_usd"]}


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def committed_ids(cache_dir: Path, keys: dict[str, str]) -> set[str]:
    """Prompts whose answers are in the cache, read as a fresh process would after the crash."""
    if not (cache_dir / DB_NAME).exists():
        return set()
    db = sqlite3.connect(cache_dir / DB_NAME)
    try:
        return {keys[k] for (k,) in db.execute("SELECT key FROM answers")}
    except sqlite3.OperationalError:  # killed before the tables were created
        return set()
    finally:
        db.close()


def requested_ids(fake: FakeTeacher) -> collections.Counter:
    by_question = {f"question number {i}": f"q{i:04d}" for i in range(N_PROMPTS)}
    # A body cut short by the kill arrives as invalid JSON (and is never answered): not counted.
    return collections.Counter(by_question[body["messages"][0]["content"]]
                               for body in fake.requests if "messages" in body)


def kill_when(proc: subprocess.Popen, ready, delay_s: float = 0.0) -> None:
    """SIGKILL ``proc`` ``delay_s`` after ``ready()`` first holds (unless it finished by then)."""
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, f"generate exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "generate made no progress"
        time.sleep(0.002)
    time.sleep(delay_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# (how, after how many output lines / within how many seconds). One case goes through the full
# `python -m mlx_distill teacher generate` (slower to start: registering `teacher serve` loads
# mlx-lm); the others through `python -m mlx_distill.teacher.kdgen`, the same parser and code.
CASES = [("lines", 1), ("lines", 25), ("lines", 50), ("random_after_start", 0.5),
         ("random_from_spawn", 2.0), ("cli_lines", 12)]


@pytest.mark.parametrize("how, amount", CASES, ids=[f"{h}-{a}" for h, a in CASES])
def test_kill_9_then_resume_matches_an_uninterrupted_run(world, tmp_path, how, amount):
    fake = world["fake"]
    cfg = config(tmp_path, world["teachers"], world["prompts"], concurrency=4)
    out, manifest = cfg.out, tmp_path / "kd.jsonl.manifest.json"
    module = ["mlx_distill"] if how == "cli_lines" else ["mlx_distill.teacher.kdgen"]
    command = [sys.executable, "-m", *module, *(["teacher", "generate"] if how == "cli_lines"
                                                 else []), *cli_args(cfg)]
    fake.reset_counts()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        if how in ("lines", "cli_lines"):
            kill_when(proc, lambda: line_count(out) >= amount)
        elif how == "random_after_start":
            kill_when(proc, manifest.exists, KILL_RNG.uniform(0, amount))
        else:  # possibly still importing, or writing the manifest
            kill_when(proc, lambda: True, KILL_RNG.uniform(0, amount))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how in ("lines", "cli_lines"):
        assert proc.returncode == -signal.SIGKILL and line_count(out) < N_PROMPTS
    check_resume(world, cfg, fake)


def check_resume(world, cfg, fake) -> None:
    before_kill = requested_ids(fake)
    committed = committed_ids(cfg.cache, world["keys"])
    fake.reset_counts()
    cfg.resume = True
    assert run_generate(cfg) == 0
    after = requested_ids(fake)
    data = cfg.out.read_bytes()
    assert data.endswith(b"\n") and b"\n\n" not in data
    assert without_created(read_records(cfg.out)) == world["baseline"]  # also: no duplicate ids
    assert max(before_kill.values(), default=0) <= 1 and max(after.values(), default=0) <= 1
    assert not committed & set(after), "an answer committed before the kill was asked again"
    state = json.loads(cfg.out.with_name("kd.jsonl.state.json").read_text())
    assert state["finished"] and state["records"] == N_PROMPTS
    assert state["spent_usd"] == pytest.approx(world["spent"], rel=1e-9)
    cache = TeacherCache(cfg.cache)
    try:
        assert cache.run_spent(state["run_id"]) == pytest.approx(world["spent"], rel=1e-9)
    finally:
        cache.close()


def test_sigint_stops_cleanly_with_an_exact_checkpoint(world, tmp_path):
    fake = world["fake"]
    cfg = config(tmp_path, world["teachers"], world["prompts"], concurrency=4)
    fake.reset_counts()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_distill.teacher.kdgen", *cli_args(cfg)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while line_count(cfg.out) < 10:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"--resume" in err
    state = json.loads(cfg.out.with_name("kd.jsonl.state.json").read_text())
    assert state["stop_reason"] == "interrupted" and not state["finished"]
    assert state["bytes"] == cfg.out.stat().st_size and state["records"] < N_PROMPTS
    check_resume(world, cfg, fake)
