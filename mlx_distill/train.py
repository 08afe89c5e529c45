"""Training step for the student: next-token cross-entropy with AdamW.

This is the core the distillation trainer builds on: a loss over (inputs, targets, mask) and an
``mx.compile``d step whose captured state is the model and optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np


def lm_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Mean cross-entropy over positions where ``mask`` is 1."""
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    return ce.sum() / mx.maximum(mask.sum(), 1)


def make_train_step(
    model: nn.Module, optimizer: optim.Optimizer, compile: bool = True
) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """Return ``step(inputs, targets, mask) -> loss`` that updates ``model`` in place."""
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    state = [model.state, optimizer.state]

    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        return loss

    if compile:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    return step


def lm_batches(
    token_ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0
) -> Iterator[tuple[mx.array, mx.array, mx.array]]:
    """Endless random windows of ``seq_len + 1`` tokens from one long token stream."""
    if token_ids.size < seq_len + 2:
        raise ValueError(
            f"corpus has {token_ids.size} tokens; need at least {seq_len + 2} for seq_len {seq_len}"
        )
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, token_ids.size - seq_len - 1, size=batch_size)
        window = np.stack([token_ids[s : s + seq_len + 1] for s in starts]).astype(np.int32)
        yield (
            mx.array(window[:, :-1]),
            mx.array(window[:, 1:]),
            mx.ones((batch_size, seq_len), dtype=mx.float32),
        )
