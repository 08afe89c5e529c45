"""The fused single-function step equals the separate gradient + update functions: the same
parameters, optimizer state and metrics, and the same skip of a non-finite step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import numpy_weights, random_model, tiny_config
from mlx.utils import tree_flatten
from trainer_helpers import ListSource, random_batch

from mlx_distill.train_config import config_from_dict
from mlx_distill.trainer import Trainer

VOCAB = 97
STEPS = 5


def make_config(tmp_path, compile_: bool, poison: list[int], grad_clip: float):
    return config_from_dict({
        "out": str(tmp_path / f"run-{compile_}-{grad_clip}"),
        "student": {"size": "toy", "tokenizer": "unused"},
        "data": {"train": ["unused"]},
        "loss": {"kind": "forward_kl", "alpha": 0.3, "temperature": 2.0, "tool_weight": 3.0},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "grad_clip": grad_clip},
        "train": {"steps": STEPS, "progress": False, "plot": False, "compile": compile_},
        "debug": {"poison_steps": poison},
    })


def train(tmp_path, fused: bool, compile_: bool, poison: list[int], grad_clip: float):
    batches = [random_batch(np.random.default_rng(i), 2, 16, VOCAB) for i in range(3)]
    trainer = Trainer(make_config(tmp_path, compile_, poison, grad_clip),
                      random_model(tiny_config(), seed=11), ListSource(batches),
                      fused_step=fused)
    assert trainer.fused_step is fused
    records, opt_steps = [], []
    for _ in range(STEPS):
        records.append(trainer.step())
        opt_steps.append(trainer.optimizer.step.item())
    return trainer, records, opt_steps


@pytest.mark.parametrize(("compile_", "grad_clip"), [(True, 0.5), (False, 0.5), (True, 0.0)])
def test_fused_step_equals_separate_functions_including_a_skipped_step(
        tmp_path, compile_, grad_clip):
    poison = [3]
    fused, fused_records, fused_steps = train(tmp_path / "f", True, compile_, poison, grad_clip)
    split, split_records, split_steps = train(tmp_path / "s", False, compile_, poison, grad_clip)

    assert [r["skipped"] for r in fused_records] == [False, False, True, False, False]
    assert [r["skipped"] for r in split_records] == [False, False, True, False, False]
    # The skipped step left the optimizer's counter (and so the schedule) where it was.
    assert fused_steps == split_steps == [1, 2, 2, 3, 4]
    assert fused.loop.nan_streak == split.loop.nan_streak == 0
    assert fused.loop.tokens_seen == split.loop.tokens_seen
    for a, b in zip(fused_records, split_records, strict=True):
        assert a["n_tokens"] == b["n_tokens"] and a["step"] == b["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
        keys = ("loss", "ce", "kd", "grad_norm")
        # NaN where the other is NaN (the poisoned step), equal within float tolerance elsewhere.
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-4)
    assert not math.isfinite(fused_records[2]["loss"])
    ours, ref = numpy_weights(fused.model), numpy_weights(split.model)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-5, err_msg=name)
    fused_state = dict(tree_flatten(fused.optimizer.state))
    split_state = dict(tree_flatten(split.optimizer.state))
    assert fused_state.keys() == split_state.keys()
    for name, value in split_state.items():
        np.testing.assert_allclose(np.array(fused_state[name]), np.array(value), rtol=1e-4,
                                   atol=1e-7, err_msg=name)
    assert all(np.isfinite(v).all() for v in ours.values())


def test_poisoned_first_step_leaves_the_initial_weights_and_state(tmp_path):
    trainer = Trainer(make_config(tmp_path, True, [1], 1.0), random_model(tiny_config(), seed=12),
                      ListSource([random_batch(np.random.default_rng(0), 2, 16, VOCAB)]))
    before = numpy_weights(trainer.model)
    state_before = {k: np.array(v) for k, v in tree_flatten(trainer.optimizer.state)}
    record = trainer.step()
    assert record["skipped"] and trainer.loop.nan_streak == 1 and trainer.loop.tokens_seen == 0
    after = numpy_weights(trainer.model)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    for name, value in tree_flatten(trainer.optimizer.state):
        if name in state_before:  # "learning_rate" appears at the first update
            assert np.array_equal(np.array(value), state_before[name]), name
    assert not trainer.step()["skipped"]
    assert trainer.optimizer.step.item() == 1
