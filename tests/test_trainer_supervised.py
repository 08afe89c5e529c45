"""Logits at the supervised positions only (``loss_positions``) give the same losses and gradients
as logits everywhere, for every loss kind; and the loader's positions are exactly its loss mask."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from trainer_helpers import random_batch

from mlx_distill.data.batches import BatchLoader
from mlx_distill.data.encode import Example
from mlx_distill.train_config import config_from_dict
from mlx_distill.trainer import make_objective

VOCAB = 97


def objective_for(kind: str):
    return make_objective(config_from_dict({
        "out": "unused", "student": {"size": "toy", "tokenizer": "unused"},
        "data": {"train": ["unused"]},
        "loss": {"kind": kind, "alpha": 0.4, "temperature": 1.5, "tool_weight": 2.0},
        **({"teacher": {"mode": "local", "model": "unused", "top_k": 0}} if kind == "jsd" else {}),
    }, "test"))


def with_positions(batch: dict, extra_slots: int, rng: np.random.Generator) -> dict:
    """``batch`` plus positions/slots read off its loss mask, padded with junk positions."""
    mask = np.array(batch["loss_mask"])
    rows = [np.flatnonzero(m) for m in mask]
    width = max(len(r) for r in rows) + extra_slots
    positions = rng.integers(0, mask.shape[1], (len(rows), width)).astype(np.int32)
    slots = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        positions[i, :len(r)], slots[i, :len(r)] = r, 1.0
    return {**batch, "loss_positions": mx.array(positions), "loss_slots": mx.array(slots)}


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["ce", "forward_kl", "reverse_kl", "jsd"]), seed=st.integers(0, 99),
       extra=st.integers(0, 5))
def test_supervised_positions_only_equal_all_positions(kind, seed, extra):
    rng = np.random.default_rng(seed)
    model = random_model(tiny_config(vocab_size=VOCAB), seed=seed)
    batch = random_batch(rng, 3, 24, VOCAB)
    if kind == "jsd":  # a dense teacher: the full distribution at every position
        batch = {k: v for k, v in batch.items() if k not in ("top_ids", "top_logprobs")}
        batch["teacher_logits"] = mx.array(rng.normal(size=(3, 24, VOCAB)).astype(np.float32))
    objective = objective_for(kind)




    grad_fn = nn.value_and_grad(model, objective)
    (full_loss, full_sums), full_grads = grad_fn(model, batch)
    (part_loss, part_sums), part_grads = grad_fn(model, with_positions(batch, extra, rng))
    np.testing.assert_allclose(np.array(part_sums), np.array(full_sums), rtol=2e-5, atol=2e-5)
    for (name, a), (_, b) in zip(tree_flatten(full_grads), tree_flatten(part_grads), strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(full_sums[3]) > 0  # supervised tokens were counted


@pytest.mark.parametrize("shape", [16, 40])
def test_loader_positions_are_exactly_the_supervised_positions(shape):
    rng = np.random.default_rng(0)
    examples = []
    for i in range(11):
        n, prompt = int(rng.integers(4, 45)), int(rng.integers(1, 4))
        completion = n - prompt
        examples.append(Example(f"e{i}", rng.integers(0, VOCAB, n).astype(np.int32), prompt,
                                np.zeros(completion, np.float32), train_on_end=bool(i % 2)))
    loader = BatchLoader(examples, shapes=[shape, 48], batch_size=4, seed=1)
    for _ in range(loader.batches_per_epoch + 2):
        batch = {k: np.array(v) for k, v in next(loader).items()}
        width = batch["inputs"].shape[1]
        assert batch["loss_positions"].shape[1] == loader.slots[width]
        assert loader.slots[width] % 8 == 0 or loader.slots[width] == width
        for row in range(4):
            slots = batch["loss_slots"][row] > 0
            chosen = batch["loss_positions"][row][slots]
            assert len(set(chosen.tolist())) == len(chosen)  # no position twice
            # Every position with a loss is chosen; chosen positions hold the rest of the run.
            assert set(np.flatnonzero(batch["loss_mask"][row])) <= set(chosen.tolist())
            assert np.all(chosen < width)
