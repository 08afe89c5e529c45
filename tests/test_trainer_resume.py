"""``mlx-distill train`` end to end: kill -9 and --resume reproduce the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from trainer_helpers import kd_records, make_tokenizer, toy_config, write_config, write_jsonl

from mlx_distill import cli
from mlx_distill.train_config import config_from_dict
from mlx_distill.train_run import run_training

ROOT = Path(__file__).resolve().parent.parent
STEPS, CHECKPOINT_EVERY, HANG_AFTER = 9, 3, 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tokenizer_dir = make_tokenizer(root)
    data = write_jsonl(root / "kd.jsonl", kd_records(tokenizer_dir, 24))
    config = toy_config(root, tokenizer_dir, data,
                        train={"steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                               "eval_every": 4, "keep_last": 2})
    reference = dict(config, out=str(root / "reference"))
    run_training(config_from_dict(reference), log=lambda _: None)
    return root, config


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, np.ndarray]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return {k: np.array(v) for k, v in
            mx.load(str(out / "checkpoints" / latest / "model.safetensors")).items()}


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and any(json.loads(line).get("step") == step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with status {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} did not appear in {path} within {timeout} s")


def test_resume_after_kill_9_matches_the_uninterrupted_run(setup):
    root, config = setup
    out = root / "killed"
    config_path = write_config(root / "killed.yaml", dict(config, out=str(out)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(root / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_distill", "train", str(config_path),
             "--set", f"debug.hang_after_step={HANG_AFTER}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_step(out / "metrics.jsonl", HANG_AFTER, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Killed after step 7: its metrics are on disk, the latest checkpoint is step 6.
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert max(r["step"] for r in metrics(out)) == HANG_AFTER

    assert cli.main(["train", str(config_path), "--resume"]) == 0

    reference, resumed = metrics(root / "reference"), metrics(out)
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in reference]
    for ref, got in zip(reference, resumed, strict=True):
        for key in ("loss", "ce", "kd", "val_loss", "lr", "grad_norm"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (ref["step"], key)
    want, have = final_weights(root / "reference"), final_weights(out)
    for name in want:
        np.testing.assert_allclose(have[name], want[name], atol=1e-5, err_msg=name)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    best = (out / "checkpoints" / "best").read_text().strip()
    # keep_last 2 newest step dirs, plus the best one wherever it is.
    assert kept[-2:] == ["step-00000006", "step-00000009"] or kept[-2:] == [
        "step-00000008", "step-00000009"]
    assert best in kept and len(kept) <= 3
    state = json.loads((out / "checkpoints" / "step-00000009" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["data"]["step"] == STEPS
    assert state["best_step"] is not None


def test_resume_refusals_are_one_line_and_write_nothing(setup, tmp_path, capsys):
    root, config = setup
    fresh = write_config(tmp_path / "fresh.yaml", dict(config, out=str(tmp_path / "none")))
    assert cli.main(["train", str(fresh), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume: no checkpoint" in err
    assert not (tmp_path / "none").exists()

    existing = write_config(tmp_path / "again.yaml", dict(config, out=str(root / "reference")))
    before = (root / "reference" / "metrics.jsonl").read_bytes()
    assert cli.main(["train", str(existing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already has checkpoints" in err and "--resume" in err

    assert cli.main(["train", str(existing), "--resume", "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.lr differs" in err
    assert (root / "reference" / "metrics.jsonl").read_bytes() == before
