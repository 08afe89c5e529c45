"""The API key never reaches a file: run ``teacher generate`` end to end (debug logging on, faults,
a failed prompt, a kill -9 that leaves SQLite's -wal/-shm behind, a resume) and scan every byte
written (output, manifest, state, failed list, cache database and its WAL, captured logs)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from fake_teacher import FakeTeacher
from kd_helpers import cli_args, config, prompt_records, write_prompts, write_teachers

REPO = Path(__file__).resolve().parent.parent
KEY_ENV = "MLXD_TEST_TEACHER_KEY"
CHILD = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); "
         "from mlx_distill.teacher.cli import generate_main; sys.exit(generate_main(sys.argv[1:]))")


def leaks(root: Path, key: str) -> list[str]:
    """Files under ``root`` containing the key, or either half of it (a masked echo)."""
    needles = [key.encode(), key[: len(key) // 2].encode(), key[len(key) // 2:].encode()]
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path} contains {n[:6]!r}…" for n in needles if n in data]
    return found


def run_child(cfg, env, log: Path, *extra: str) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - owned by the child; closed by the caller's wait
    return subprocess.Popen([sys.executable, "-c", CHILD, *cli_args(cfg, *extra)], cwd=REPO,
                            env=env, stdout=out, stderr=subprocess.STDOUT)


def test_api_key_never_reaches_any_file(tmp_path):
    key = f"sk-mlxd-{secrets.token_hex(20)}"
    env = {**os.environ, KEY_ENV: key}
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "k").write_text(f"x{key}y")
    assert leaks(canary, key)  # the scanner does find a key
    work = tmp_path / "run"
    work.mkdir()
    with FakeTeacher(api_key=key, delay_s=0.03, faults={"500": 0.1, "429": 0.1},
                     fault_seed=7) as fake:
        teachers = write_teachers(work, fake.base_url, api_key_env=KEY_ENV, max_top_logprobs=25)
        records = prompt_records(30)
        records.append({"id": "too-many-logprobs", "top_logprobs": 25,  # the server says 400
                        "messages": [{"role": "user", "content": "question number 0"}]})
        prompts = write_prompts(work / "p.jsonl", records)
        cfg = config(work, teachers, prompts, concurrency=4, max_attempts=4,
                     failure_limit="100%")
        log = work / "generate.log"

        first = run_child(cfg, env, log)
        deadline = time.monotonic() + 60
        while not cfg.out.exists() or cfg.out.read_bytes().count(b"\n") < 8:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert (cfg.cache / "teacher-cache.sqlite3-wal").exists()  # scanned as left by the crash
        assert leaks(work, key) == []

        second = run_child(cfg, env, log, "--resume")
        assert second.wait(timeout=120) == 4  # finished, with the one failed prompt
        assert fake.answered_count > 0 and fake.injected  # the key was accepted; faults happened

    failed = [json.loads(x) for x in (work / "kd.jsonl.failed.jsonl").read_text().splitlines()]
    assert [(f["id"], f["reason"]) for f in failed] == [("too-many-logprobs", "http_400")]
    assert (work / "kd.jsonl").read_bytes().count(b"\n") == 30
    # Logging at DEBUG really was captured: httpx's request lines and the client's retries.
    assert b"INFO:httpx:HTTP Request: POST" in log.read_bytes()
    assert b"; retrying in " in log.read_bytes()
    assert leaks(work, key) == []
