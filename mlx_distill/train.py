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
from mlx.utils import tree_flatten, tree_map


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


# ---- the distillation step: exact gradient accumulation over micro-batches and ranks ----
#
# Every micro-batch contributes the gradient of its loss SUM over supervised tokens (the numerator
# of ``losses.kd_loss``'s masked mean). Sums are added over micro-batches and, under
# ``mx.distributed``, over ranks, and divided once by the total supervised-token count at the
# update. The update therefore equals one step on the concatenated batch, however the tokens are
# split (uneven token counts included), up to float summation order.

SUM_FIELDS = ("loss", "ce", "kd", "n_tokens", "n_kd_tokens")


def warmup_cosine_schedule(
    lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[mx.array], mx.array]:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps`` updates, then cosine to ``min_lr``.

    ``lr(s) = lr * s / warmup`` for ``s < warmup``; afterwards
    ``min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2``, constant
    at ``min_lr`` past ``total_steps``. ``s`` is the number of updates applied so far.
    """
    decay = optim.cosine_decay(lr, max(total_steps - warmup_steps, 1), end=min_lr)
    if warmup_steps <= 0:
        return decay
    warmup = optim.linear_schedule(0.0, lr, warmup_steps)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def make_grad_fn(
    model: nn.Module, objective: Callable[[nn.Module, dict], tuple[mx.array, mx.array]],
    compile: bool = True,
) -> Callable[[dict, dict | None], tuple[mx.array, dict]]:
    """Return ``grad_fn(batch, acc) -> (sums, grads)``.

    ``objective(model, batch)`` returns ``(loss_sum, sums)`` where ``sums`` is a vector laid out as
    ``SUM_FIELDS``. ``grads`` is the gradient of ``loss_sum`` plus ``acc`` (None: nothing yet).
    The random state is captured too, so dropout (LoRA) draws reproducibly after a resume.
    """
    loss_and_grad = nn.value_and_grad(model, objective)

    def grad_fn(batch, acc):
        (_, sums), grads = loss_and_grad(model, batch)
        if acc is not None:
            grads = tree_map(mx.add, grads, acc)
        return sums, grads

    if compile:
        # The model state must be an output too, although unchanged: with inputs only, MLX 0.32
        # leaves tracer arrays in the model after a retrace ("eval an array without a primitive").
        state = [model.state, mx.random.state]
        grad_fn = mx.compile(grad_fn, inputs=state, outputs=state)
    return grad_fn


def make_update_fn(
    model: nn.Module, optimizer: optim.Optimizer, grad_clip: float | None, compile: bool = True
) -> Callable[[dict, mx.array, mx.array], mx.array]:
    """Return ``update(grad_sums, n_tokens, sum_norm) -> norm``: one AdamW step.

    ``grad_sums`` are gradients of loss sums, ``sum_norm`` their :func:`global_norm`. The averaged
    gradient is ``grad_sums / n_tokens`` with norm ``norm = sum_norm / n_tokens``; when it exceeds
    ``grad_clip`` it is scaled to ``grad_clip`` (as ``optim.clip_grad_norm``), all in one multiply.
    Call it only with finite gradients.
    """

    def update(grad_sums, n_tokens, sum_norm):
        n = mx.maximum(n_tokens, 1.0)
        norm = sum_norm / n
        scale = 1.0 / n
        if grad_clip:
            scale = mx.where(norm < grad_clip, scale, scale * grad_clip / (norm + 1e-6))
        grads = tree_map(lambda g: (g * scale).astype(g.dtype), grad_sums)
        optimizer.update(model, grads)
        return norm

    if compile:
        state = [model.state, optimizer.state]
        update = mx.compile(update, inputs=state, outputs=state)
    return update


def make_fused_step(
    model: nn.Module, optimizer: optim.Optimizer,
    objective: Callable[[nn.Module, dict], tuple[mx.array, mx.array]],
    grad_clip: float | None, compile: bool = True,
) -> Callable[[dict], tuple[mx.array, mx.array, mx.array]]:
    """Return ``step(batch) -> (sums, norm, finite)``: gradient and update in one function.

    The single-batch, single-process equivalent of :func:`make_grad_fn` followed by
    :func:`make_update_fn`, so one compiled graph and one evaluation per step. The update is
    always computed; where ``finite`` (loss sum and gradient norm both finite) is false, the
    trainable parameters and the whole optimizer state (its step counter, so the learning-rate
    schedule, included) are put back as they were, which equals skipping the update.
    """
    loss_and_grad = nn.value_and_grad(model, objective)
    n_index = SUM_FIELDS.index("n_tokens")
    update = make_update_fn(model, optimizer, grad_clip, compile=False)

    def step(batch):
        (loss_sum, sums), grad_sums = loss_and_grad(model, batch)
        sum_norm = global_norm(grad_sums)
        finite = mx.isfinite(loss_sum) & mx.isfinite(sum_norm)
        old_params = model.trainable_parameters()
        old_state = tree_map(lambda x: x, optimizer.state)  # the leaves, before update replaces
        norm = update(grad_sums, sums[n_index], sum_norm)
        keep = partial(_select, finite)
        model.update(tree_map(keep, model.trainable_parameters(), old_params))
        _assign(optimizer.state, tree_map(keep, optimizer.state, old_state))
        return sums, norm, finite

    if compile:
        # The random state is captured for LoRA dropout, as in make_grad_fn.
        state = [model.state, optimizer.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)
    return step


def _select(finite: mx.array, new: mx.array, old: mx.array) -> mx.array:
    return mx.where(finite, new, old)


def _assign(target: dict | list, source: dict | list) -> None:
    """Copy ``source``'s leaves into ``target`` in place (compile tracks the captured objects)."""
    keys = target.keys() if isinstance(target, dict) else range(len(target))
    for key in keys:
        if isinstance(target[key], dict | list):
            _assign(target[key], source[key])
        else:
            target[key] = source[key]


def global_norm(tree: dict) -> mx.array:
    """L2 norm over every array in ``tree``, accumulated in float32."""
    return mx.sqrt(sum(g.astype(mx.float32).square().sum() for _, g in tree_flatten(tree)))


def all_sum_tree(tree: dict, group=None, bucket_bytes: int = 32 << 20) -> dict:
    """Sum every array of ``tree`` over the ranks of ``group`` (identity on a single process).

    ``average_gradients`` would return the mean; exact accumulation needs the sum.
    """
    group = group or mx.distributed.init()
    if group.size() == 1:
        return tree
    return map_bucketed(tree, lambda flat: mx.distributed.all_sum(flat, group=group),
                        bucket_bytes)


def map_bucketed(tree: dict, fn: Callable[[mx.array], mx.array],
                 bucket_bytes: int = 32 << 20) -> dict:
    """Apply an elementwise ``fn`` (a collective) to every array of ``tree`` through few calls.

    Arrays of one dtype are flattened and concatenated into buckets of about ``bucket_bytes``
    (arrays at least that large go alone), so a model with hundreds of parameter tensors costs a
    few collectives, not hundreds. Returns a tree of the same structure.
    """
    leaves = [v for _, v in tree_flatten(tree)]
    out: list[mx.array | None] = [None] * len(leaves)
    bucket: list[int] = []

    def flush():
        if not bucket:
            return
        joined = fn(mx.concatenate([leaves[i].reshape(-1) for i in bucket]))
        offsets = np.cumsum([leaves[i].size for i in bucket])[:-1].tolist()
        for i, part in zip(bucket, mx.split(joined, offsets), strict=True):
            out[i] = part.reshape(leaves[i].shape)
        bucket.clear()

    size = 0
    for i, value in enumerate(leaves):
        if value.nbytes >= bucket_bytes:
            out[i] = fn(value)
            continue
        mixed = bucket and value.dtype != leaves[bucket[0]].dtype
        if bucket and (size + value.nbytes > bucket_bytes or mixed):
            flush()
            size = 0
        bucket.append(i)
        size += value.nbytes
    flush()
    # tree_map visits leaves in tree_flatten's order, so the structure is kept exactly.
    it = iter(out)
    return tree_map(lambda _: next(it), tree)
