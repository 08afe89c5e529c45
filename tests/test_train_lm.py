"""The plain LM training step (`make_train_step`, `lm_loss`, `lm_batches`) used by the export
tests and benchmarks/train_step.py; the end-to-end demo is tests/test_demo_e2e.py."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import random_model, tiny_config
from mlx.utils import tree_flatten

from mlx_distill.train import lm_batches, lm_loss, make_train_step


def test_lm_loss_matches_dense_cross_entropy():
    model = random_model(tiny_config(), seed=1)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 97, (2, 9))
    targets = rng.integers(0, 97, (2, 9))
    mask = (rng.random((2, 9)) > 0.3).astype(np.float32)
    logits = np.array(model(mx.array(inputs))).astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / mask.sum()
    got = lm_loss(model, mx.array(inputs), mx.array(targets), mx.array(mask))
    assert abs(got.item() - expected) < 1e-4


@pytest.mark.parametrize("compiled", [True, False])
def test_train_step_reduces_loss_and_compiled_equals_eager(compiled):
    models = [random_model(tiny_config(), seed=2) for _ in range(2)]
    batch = next(lm_batches(np.arange(400) % 97, batch_size=4, seq_len=16, seed=3))
    losses = []
    for model, compile_ in zip(models, (compiled, False), strict=True):
        opt = optim.AdamW(learning_rate=1e-2)
        step = make_train_step(model, opt, compile=compile_)
        run = []
        for _ in range(8):
            loss = step(*batch)
            mx.eval(loss, model.state, opt.state)
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0] * 0.8
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    for (_, a), (_, b) in zip(tree_flatten(models[0].parameters()),
                              tree_flatten(models[1].parameters()), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_lm_batches_windows_are_shifted_by_one_and_short_corpus_is_refused():
    tokens = np.arange(1000)
    inputs, targets, mask = next(lm_batches(tokens, batch_size=3, seq_len=10, seed=0))
    np.testing.assert_array_equal(np.array(inputs)[:, 1:], np.array(targets)[:, :-1])
    np.testing.assert_array_equal(np.array(targets) - np.array(inputs), 1)
    assert mask.shape == (3, 10)
    with pytest.raises(ValueError, match="need at least 12"):
        next(lm_batches(np.arange(5), batch_size=1, seq_len=10))
