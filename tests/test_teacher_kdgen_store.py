"""``teacher generate`` commits answers in the background: workers keep sending while SQLite
commits, an answer still reaches ``OUT`` only after its commit, and a cache that stops accepting
writes stops the run with its one-line error and an exact checkpoint. Lines emitted in one
event-loop turn (a cache replay) go out in one write(); a failed write stops the run the same
way."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time

import pytest
from fake_teacher import FakeTeacher
from kd_helpers import config, prompt_records, read_records, write_prompts, write_teachers

from mlx_distill.teacher import kdstate
from mlx_distill.teacher.cache import CacheError, TeacherCache
from mlx_distill.teacher.kdgen import run_generate

N_PROMPTS = 20


def test_workers_send_new_requests_while_a_commit_is_held(tmp_path, monkeypatch):
    """Two workers, and the first commit held until the server has seen four more requests:
    workers that waited for their commits could send at most two."""
    held: list[int] = []
    original = TeacherCache._write_batch

    def held_first(self, rows):
        if not held:
            start, deadline = fake.request_count, time.monotonic() + 10
            while fake.request_count < start + 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            held.append(fake.request_count - start)
        return original(self, rows)

    monkeypatch.setattr(TeacherCache, "_write_batch", held_first)
    with FakeTeacher(delay_s=0.01) as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(N_PROMPTS))
        cfg = config(tmp_path, teachers, prompts, concurrency=2)
        assert run_generate(cfg) == 0
    assert held[0] >= 4
    assert sorted(r["id"] for r in read_records(cfg.out)) == sorted(
        r["id"] for r in prompt_records(N_PROMPTS))


def test_a_cache_that_stops_accepting_writes_stops_the_run(tmp_path, monkeypatch, capsys):
    commits = []
    original = TeacherCache._write_rows

    def fail_third(self, rows):
        commits.append(len(rows))
        if len(commits) >= 3:
            raise sqlite3.OperationalError("disk I/O error")
        return original(self, rows)

    with FakeTeacher(delay_s=0.05) as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(N_PROMPTS))
        cfg = config(tmp_path, teachers, prompts, concurrency=2)
        monkeypatch.setattr(TeacherCache, "_write_rows", fail_third)
        with pytest.raises(CacheError, match="cannot be written: disk I/O error"):
            run_generate(cfg)
        sent_before_stop = fake.request_count
        kept, kept_bytes = read_records(cfg.out), cfg.out.stat().st_size
        state = json.loads(cfg.out.with_name("kd.jsonl.state.json").read_text())

        monkeypatch.setattr(TeacherCache, "_write_rows", original)
        cfg.resume = True
        assert run_generate(cfg) == 0
    # Only committed answers reached OUT, and the checkpoint describes exactly those bytes.
    assert len(kept) == sum(commits[:2]) and state["records"] == len(kept)
    assert state["bytes"] == kept_bytes
    assert sent_before_stop < N_PROMPTS // 2  # stopped sending, not carried on for nothing
    records = read_records(cfg.out)
    assert len(records) == N_PROMPTS == len({r["id"] for r in records})


def test_a_replay_writes_its_lines_in_few_writes_and_a_failed_write_stops_the_run(tmp_path,
                                                                                   monkeypatch):
    with FakeTeacher() as fake:
        teachers = write_teachers(tmp_path, fake.base_url)
        prompts = write_prompts(tmp_path / "p.jsonl", prompt_records(N_PROMPTS * 10))
        first = config(tmp_path, teachers, prompts)
        assert run_generate(first) == 0
    writes = []
    real_write = os.write

    def counting(fd, data):
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(kdstate.os, "write", counting)
    replay = config(tmp_path, teachers, prompts, name="replay.jsonl")
    assert run_generate(replay) == 0  # all cache hits: no server needed
    # The same lines (the first run wrote them in completion order, the replay in prompt order).
    assert sorted(replay.out.read_bytes().splitlines()) == sorted(
        first.out.read_bytes().splitlines())
    assert len(writes) <= 2 * (N_PROMPTS * 10 // replay.checkpoint_interval) + 2  # not 200

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kdstate.os, "write", disk_full)
    failing = config(tmp_path, teachers, prompts, name="full.jsonl")
    with pytest.raises(Exception, match="cannot append to .*full.jsonl: No space left"):
        run_generate(failing)
    state = json.loads(failing.out.with_name("full.jsonl.state.json").read_text())
    assert (state["records"], state["bytes"]) == (0, failing.out.stat().st_size) == (0, 0)
    assert not state["finished"] and state["stop_reason"] == "error"
