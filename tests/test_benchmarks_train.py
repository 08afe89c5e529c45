"""The training benchmarks: the rebuilt mlx-lm step equals mlx-lm's own ``train()``, and both
scripts run end to end at the tiniest settings, printing their tables with finite numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from helpers import random_model, tiny_config
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.trainer import train as mlx_lm_train

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _finite_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _finite_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _finite_numbers(v)]
    if isinstance(tree, bool) or not isinstance(tree, int | float):
        return []
    assert math.isfinite(tree), tree
    return [float(tree)]


def test_rebuilt_mlx_lm_step_matches_mlx_lm_train(tmp_path):
    """Three steps of the benchmark's mlx-lm loop leave the same weights as three iterations of
    ``mlx_lm.tuner.trainer.train`` itself on the same batches."""
    tt = _load("train_throughput")
    config = tiny_config(vocab_size=61)
    base = random_model(config, seed=3)
    batches = [peer for _, peer in tt.make_batches(config.vocab_size, 2, 12, 4, 0.5, 3, seed=1)]

    def fresh():
        model = llama.Model(llama.ModelArgs.from_dict(config.to_hf_dict()))
        tt.copy_weights(base, model)
        return model, optim.AdamW(learning_rate=1e-2)

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        yield from (batches * 2)

    reference, ref_opt = fresh()
    args = TrainingArgs(batch_size=2, iters=len(batches), steps_per_report=100,
                        steps_per_save=100, adapter_file=str(tmp_path / "adapters.safetensors"))
    mlx_lm_train(reference, ref_opt, list(range(4)), args=args, iterate_batches=iterate)

    rebuilt, opt = fresh()
    loop = tt.MlxLmLoop(rebuilt, opt, batches)
    for _ in batches:
        loop()
    ours, theirs = dict(tree_flatten(rebuilt.parameters())), dict(tree_flatten(
        reference.parameters()))
    assert ours.keys() == theirs.keys()
    start = dict(tree_flatten(base.parameters()))
    for name, value in theirs.items():
        assert not np.array_equal(np.array(value), np.array(start[name])), name  # it trained
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), rtol=0, atol=1e-6,
                                   err_msg=name)
    assert loop.first_loss is not None and math.isfinite(loop.first_loss)
    mx.clear_cache()


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    stdout = _run("train_throughput.py", "--sizes", "toy", "--batch", "2", "--seq-len", "32",
                  "--rounds", "2", "--steps", "1", "--warmup", "1", "--distinct-batches", "1",
                  "--json", str(out))
    assert "| size | params | batch x seq | step | tok/s (median)" in stdout
    assert "| size | ours KD / mlx-lm (goal >= 1.0)" in stdout
    for runner in ("mlx-lm", "ours CE", "ours KD"):
        assert f"| {runner} |" in stdout
    assert "toy: ours KD / mlx-lm >= 1.0:" in stdout and "KD overhead <= 15%:" in stdout
    (result,) = json.loads(out.read_text())
    assert result["size"] == "toy" and (result["batch"], result["seq_len"]) == (2, 32)
    assert set(result["runners"]) == {"mlx-lm", "ours CE", "ours KD"}
    for runner in result["runners"].values():
        assert runner["tok_per_s"] > 0 and runner["resident_bytes"] > 0
        assert len(runner["seconds_per_step"]) == 2
    assert len(result["kd_vs_mlx_lm"]) == len(result["kd_overhead"]) == 2
    assert all(x > 0 for x in result["kd_vs_mlx_lm"] + result["ce_vs_mlx_lm"])
    _finite_numbers(result)


def test_kd_vs_sft_smoke(tmp_path):
    out = tmp_path / "kd.json"
    stdout = _run("kd_vs_sft.py", "--quick", "--n-train", "24", "--n-val", "3", "--n-test", "3",
                  "--teacher-steps", "3", "--student-steps", "3", "--batch", "4",
                  "--teacher-dims", "32,1,2,1,64", "--student-dims", "16,1,1,1,32",
                  "--vocab", "300", "--max-new-tokens", "8", "--student-seeds", "2",
                  "--json", str(out))
    assert "config:" in stdout and "| model | params | steps |" in stdout
    for name in ("teacher", "KD student", "CE student"):
        assert f"| {name} |" in stdout
    result = json.loads(out.read_text())
    assert "students: mean (min-max) over 2 seeds" in stdout
    assert result["records"] == 24
    runs = {name: len(scores) for name, scores in result["scores"].items()}
    assert runs == {"teacher": 1, "KD student": 2, "CE student": 2}
    for scores in result["scores"].values():
        for run in scores:
            for split in ("val", "test"):
                for key in ("strict_f1", "lax_f1", "exact"):
                    assert 0.0 <= run[split][key] <= 1.0
    assert result["timings"]["total"] > 0
    _finite_numbers({k: v for k, v in result.items() if k != "config"})
