"""Data parallel over ``mx.distributed``: two ring-backend processes on loopback (``mlx.launch``)
end with the same weights as one process on the same global batches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from trainer_helpers import kd_records, make_tokenizer, toy_config, write_config, write_jsonl

from mlx_distill.train import all_sum_tree, map_bucketed
from mlx_distill.train_config import config_from_dict
from mlx_distill.train_run import run_training

ROOT = Path(__file__).resolve().parent.parent


def launcher() -> str | None:
    local = Path(sys.executable).parent / "mlx.launch"
    return str(local) if local.exists() else shutil.which("mlx.launch")


def free_port_pair() -> int:
    for _ in range(20):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def weights(out: Path) -> dict[str, np.ndarray]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    path = out / "checkpoints" / latest / "model.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_all_sum_tree_is_the_identity_on_one_process():
    tree = {"a": [mx.ones((2, 3)), {}], "b": {"c": mx.arange(4)}}
    assert all_sum_tree(tree) is tree


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1,
                       max_size=8),
       dtypes=st.lists(st.sampled_from(["float32", "float16", "int32"]), min_size=8, max_size=8),
       bucket_bytes=st.integers(4, 200))
def test_bucketed_collective_keeps_every_array_and_the_tree(shapes, dtypes, bucket_bytes):
    rng = np.random.default_rng(0)
    leaves = [mx.array(rng.normal(size=shape) * 10).astype(getattr(mx, dtype))
              for shape, dtype in zip(shapes, dtypes, strict=False)]
    tree = {"layers": [{"w": leaf} for leaf in leaves[1:]], "head": leaves[0], "empty": {}}
    calls = []

    def collective(flat):
        calls.append(flat.size)
        return flat * 3

    out = map_bucketed(tree, collective, bucket_bytes)
    assert [k for k, _ in tree_flatten(out)] == [k for k, _ in tree_flatten(tree)]
    for (_, a), (_, b) in zip(tree_flatten(tree), tree_flatten(out), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.array_equal(np.array(a * 3), np.array(b))
    assert sum(calls) == sum(leaf.size for leaf in leaves) and len(calls) <= len(leaves)
    calls.clear()
    map_bucketed(tree, collective, 1 << 30)
    kinds = [leaf.dtype for _, leaf in tree_flatten(tree)]
    runs = 1 + sum(a != b for a, b in zip(kinds, kinds[1:], strict=False))
    assert len(calls) == runs  # with room enough, same-dtype neighbours share one call


@pytest.mark.skipif(launcher() is None, reason="mlx.launch is not installed in this environment")
def test_two_ring_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    tokenizer_dir = make_tokenizer(tmp_path)
    data = write_jsonl(tmp_path / "kd.jsonl", kd_records(tokenizer_dir, 20, seed=3))
    # Records differ in length, so the two ranks hold different supervised-token counts: only
    # summed gradients (not averaged per rank) give the one-process update.
    config = toy_config(tmp_path, tokenizer_dir, data,
                        optim={"grad_accum": 2, "warmup_steps": 1},
                        train={"steps": 3, "eval_every": 3, "checkpoint_every": 0,
                               "compile": False})
    single = dict(config, out=str(tmp_path / "single"))
    run_training(config_from_dict(single), log=lambda _: None)

    config_path = write_config(tmp_path / "dist.yaml", dict(config, out=str(tmp_path / "dist")))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(free_port_pair()),
         "--python", sys.executable, "--", "-m", "mlx_distill", "train", str(config_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # mlx.launch exits 0 even when a rank fails: judge by what rank 0 wrote.
    assert (tmp_path / "dist" / "checkpoints" / "latest").exists(), proc.stdout + proc.stderr
    assert "WARN" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    latest = (tmp_path / "dist" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "dist" / "checkpoints" / latest / "trainer_state.json")
                       .read_text())
    assert state["world_size"] == 2  # really two ranks, not two independent runs

    one = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").open()]
    two = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").open()]
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "ce", "kd", "val_loss", "n_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    want, got = weights(tmp_path / "single"), weights(tmp_path / "dist")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
