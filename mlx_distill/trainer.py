"""The distillation training loop.

One step = ``grad_accum`` micro-batches. Each micro-batch's gradient is that of its loss SUM over
supervised tokens (:func:`mlx_distill.train.make_grad_fn`); the sums are added over micro-batches
and data-parallel ranks and divided by the total token count once, at the update
(:func:`mlx_distill.train.make_update_fn`) — the step equals one step on the whole batch. A step
whose loss or gradient is not finite is skipped (no update, a warning); ``train.nan_limit`` of them
in a row stop the run, leaving the last checkpoint as it was.

Validation every ``train.eval_every`` steps gives the token-weighted mean loss over the held-out
batches; an improvement saves a checkpoint and moves the ``best`` pointer, and ``train.patience``
evaluations without one stop the run. Checkpoints (:mod:`mlx_distill.train_state`) are saved every
``train.checkpoint_every`` steps and at the end; only rank 0 writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_distill.cli import UserError
from mlx_distill.losses import kd_loss, tool_span_weights
from mlx_distill.train import (
    SUM_FIELDS,
    all_sum_tree,
    global_norm,
    make_fused_step,
    make_grad_fn,
    make_update_fn,
    warmup_cosine_schedule,
)
from mlx_distill.train_config import TrainConfig
from mlx_distill.train_metrics import METRICS_FILE, PLOT_FILE, MetricsLog, Progress, plot_loss_curve
from mlx_distill.train_state import (
    LATEST,
    LoopState,
    read_pointer,
    restore_training_checkpoint,
    rng_key,
    save_training_checkpoint,
)

_LOSS, _CE, _KD, _N, _NKD = range(len(SUM_FIELDS))


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


_PER_POSITION = ("targets", "loss_mask", "kd_mask", "tool_mask", "top_ids", "top_logprobs",
                 "teacher_logits")


def supervised_logits(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
    """``(logits, batch)`` at the batch's supervised positions only, when it says where they are
    (``loss_positions``/``loss_slots`` from :class:`~mlx_distill.data.BatchLoader`): the LM head
    and every loss then run over ``C`` positions per row instead of ``S``, with the per-position
    arrays gathered to match. Otherwise (or for a model without ``head``) all positions."""
    positions = batch.get("loss_positions")
    if positions is None or not hasattr(model, "head"):
        return model(batch["inputs"]), batch
    hidden = model.model(batch["inputs"])
    logits = model.head(mx.take_along_axis(hidden, positions[..., None], axis=1))
    slots = batch["loss_slots"]
    gathered = dict(batch)
    for key in _PER_POSITION:
        if key in batch:
            value = batch[key]
            index = positions if value.ndim == 2 else positions[..., None]
            gathered[key] = mx.take_along_axis(value, index, axis=1)
    for key in ("loss_mask", "kd_mask", "tool_mask"):
        if key in gathered:
            gathered[key] = gathered[key] * slots
    return logits, gathered


def make_objective(config: TrainConfig) -> Callable[[nn.Module, dict], tuple[mx.array, mx.array]]:
    """``objective(model, batch) -> (loss_sum, sums)`` with the reduction of ``losses.kd_loss``.

    ``loss_sum`` is the numerator of kd_loss's masked mean (``loss * n_tokens``); ``sums`` holds
    ``SUM_FIELDS`` (loss, CE and KD numerators, supervised and teacher token counts). A
    ``poison`` entry (the ``debug.poison_steps`` hook) multiplies the logits, making them NaN.
    """
    loss = config.loss

    def objective(model, batch):
        logits, batch = supervised_logits(model, batch)
        if "poison" in batch:
            logits = logits * batch["poison"]
        teacher = {}
        if loss.kind != "ce":
            for key in ("top_ids", "top_logprobs", "teacher_logits", "kd_mask"):
                if key in batch:
                    teacher[key] = batch[key]
        weights = None
        if loss.tool_weight != 1.0 and "tool_mask" in batch:
            weights = tool_span_weights(batch["tool_mask"], loss.tool_weight)
        parts = kd_loss(
            logits, batch["targets"], batch["loss_mask"],
            alpha=1.0 if loss.kind == "ce" else loss.alpha,
            kind="forward_kl" if loss.kind == "ce" else loss.kind,
            temperature=loss.temperature, weights=weights, beta=loss.beta, tail=loss.tail,
            **teacher,
        )
        n, n_kd = parts["n_tokens"], parts["n_kd_tokens"]
        loss_sum = parts["loss"] * mx.maximum(n, 1.0)
        sums = mx.stack([loss_sum, parts["ce"] * mx.maximum(n, 1.0),
                         parts["kd"] * mx.maximum(n_kd, 1.0), n, n_kd])
        return loss_sum, sums

    return objective


def make_optimizer(config: TrainConfig) -> optim.AdamW:
    o = config.optim
    schedule = warmup_cosine_schedule(o.lr, o.end_lr, o.warmup_steps, config.train.steps)
    return optim.AdamW(learning_rate=schedule, betas=list(o.betas), eps=o.eps,
                       weight_decay=o.weight_decay)


@dataclass
class TrainResult:
    steps: int
    stop_reason: str  # "steps" | "early_stopping"
    latest: Path | None
    best: Path | None
    best_val: float | None
    last: dict[str, Any]


class Trainer:
    """Owns the model, optimizer and counters; ``run()`` trains to ``train.steps``.

    ``batches`` yields this rank's micro-batches (dicts of arrays, see
    :class:`mlx_distill.data.batches.BatchLoader`) and has ``state_dict``/``load_state_dict``
    (None: position not saved); ``val_batches()`` returns a fresh iterable of held-out batches.
    ``prepare(batch, step, micro)`` may rewrite a micro-batch (teacher annotation, on-policy);
    validation batches come with ``step == -1``. ``fused_step``: with one micro-batch per step on
    one process, compute gradient, norm, finiteness check and update in one compiled function
    (:func:`mlx_distill.train.make_fused_step`); False keeps the separate gradient and update
    functions there too (the path accumulation and data parallelism always take).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        batches: Iterator[dict],
        *,
        val_batches: Callable[[], Iterable[dict]] | None = None,
        prepare: Callable[[dict, int, int], dict] | None = None,
        tokenizer_dir: str | Path | None = None,
        group: Any = None,
        fused_step: bool = True,
    ):
        self.config, self.model, self.batches = config, model, batches
        self.val_batches, self.prepare = val_batches, prepare
        self.tokenizer_dir = tokenizer_dir
        self.group = group or mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.fused_step = fused_step and config.optim.grad_accum == 1 and self.world == 1
        self.out = Path(config.out)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.loop = LoopState()
        self.metrics = MetricsLog(self.out / METRICS_FILE)
        self._built = False

    # ---- setup ----

    def resume(self) -> Path:
        """Restore the latest checkpoint of ``config.out``; returns its directory."""
        ckpt = read_pointer(self.out, LATEST)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {self.out / 'checkpoints'} "
                            "(nothing to resume; start without --resume)")
        self.loop = restore_training_checkpoint(ckpt, self.model, self.optimizer,
                                                lora=self.config.train.lora is not None)
        if self.loop.data and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(self.loop.data)
        if self.rank == 0:
            self.metrics.truncate_after(self.loop.step)
        return ckpt

    def _build(self) -> None:
        # Built after a resume: compiled functions capture the state objects restored into.
        compile = self.config.train.compile
        objective = make_objective(self.config)
        clip = self.config.optim.grad_clip or None
        if self.fused_step:
            self._fused = make_fused_step(self.model, self.optimizer, objective, clip,
                                          compile=compile)
        else:
            self._grad = make_grad_fn(self.model, objective, compile=compile)
            self._update = make_update_fn(self.model, self.optimizer, clip, compile=compile)

        def evaluate(batch):
            return objective(self.model, batch)[1]

        state = [self.model.state]
        self._eval = mx.compile(evaluate, inputs=state, outputs=state) if compile else evaluate
        self._built = True

    # ---- one step ----

    def _micro_batch(self, micro: int) -> dict:
        batch = next(self.batches)
        if self.prepare is not None:
            batch = self.prepare(batch, self.loop.step, micro)
        if self.loop.step + 1 in self.config.debug.poison_steps:
            batch = {**batch, "poison": mx.array(math.nan, mx.float32)}
        return batch

    def step(self) -> dict[str, Any]:
        """Run one training step; returns its metrics record (and updates ``self.loop``)."""
        if not self._built:
            self._build()
        started = time.perf_counter()
        if self.fused_step:
            batch = self._micro_batch(0)
            sums, norm, finite = self._fused(batch)
            mx.eval(self.model.state, self.optimizer.state, sums, norm, finite)
            return self._record(sums, norm, finite.item(), batch["inputs"].size, started)
        grads, sums, positions = None, mx.zeros(len(SUM_FIELDS)), 0
        for micro in range(self.config.optim.grad_accum):
            batch = self._micro_batch(micro)
            positions += batch["inputs"].size
            micro_sums, grads = self._grad(batch, grads)
            sums = sums + micro_sums
            if micro + 1 < self.config.optim.grad_accum:
                mx.eval(sums, grads)  # bound memory: one micro-batch's graph at a time
        if self.world > 1:
            sums = mx.distributed.all_sum(sums, group=self.group)
            grads = all_sum_tree(grads, self.group)
        grad_sum_norm = global_norm(grads)
        mx.eval(sums, grad_sum_norm, grads)
        finite = math.isfinite(sums[_LOSS].item()) and math.isfinite(grad_sum_norm.item())
        if finite:
            norm = self._update(grads, sums[_N], grad_sum_norm)
            mx.eval(self.model.state, self.optimizer.state, norm)
        else:
            norm = grad_sum_norm / mx.maximum(sums[_N], 1.0)
        return self._record(sums, norm, finite, positions, started)

    def _record(self, sums: mx.array, norm: mx.array, finite: bool, positions: int,
                started: float) -> dict[str, Any]:
        """Advance the counters after an update (or a skip) and build its metrics record."""
        values = sums.tolist()
        n = max(values[_N], 1.0)
        self.loop.step += 1
        if finite:
            self.loop.nan_streak = 0
            self.loop.tokens_seen += int(values[_N])
        else:
            self.loop.nan_streak += 1
        elapsed = time.perf_counter() - started
        return {
            "kind": "train", "step": self.loop.step,
            "loss": values[_LOSS] / n, "ce": values[_CE] / n,
            "kd": values[_KD] / max(values[_NKD], 1.0),
            "n_tokens": int(values[_N]), "n_kd_tokens": int(values[_NKD]),
            "lr": self.optimizer.learning_rate.item(), "grad_norm": float(norm.item()),
            "tok_per_s": positions * self.world / elapsed, "skipped": not finite,
            "time": elapsed,
        }

    def evaluate(self) -> dict[str, float] | None:
        """Token-weighted validation loss over ``train.eval_batches`` held-out batches."""
        if self.val_batches is None:
            return None
        if not self._built:
            self._build()
        self.model.eval()
        total = mx.zeros(len(SUM_FIELDS))
        try:
            for i, batch in enumerate(self.val_batches()):
                if i >= self.config.train.eval_batches:
                    break
                if self.prepare is not None:
                    batch = self.prepare(batch, -1, i)
                total = total + self._eval(batch)
                mx.eval(total)
        finally:
            self.model.train()
        if self.world > 1:
            total = mx.distributed.all_sum(total, group=self.group)
        values = total.tolist()
        n = max(values[_N], 1.0)
        return {"val_loss": values[_LOSS] / n, "val_ce": values[_CE] / n,
                "val_kd": values[_KD] / max(values[_NKD], 1.0), "val_tokens": int(values[_N])}

    # ---- the loop ----

    def save(self, best: bool = False) -> Path | None:
        if self.rank != 0:
            return None
        if hasattr(self.batches, "state_dict"):
            self.loop.data = self.batches.state_dict()
        self.loop.rng_key = rng_key()
        self.loop.world_size = self.world
        return save_training_checkpoint(
            self.out, self.model, self.optimizer, self.loop, self.config.to_dict(),
            self.tokenizer_dir, self.config.train.keep_last, lora=self.config.train.lora,
            best=best)

    def _plot(self) -> None:
        if self.rank == 0 and self.config.train.plot:
            plot_loss_curve(self.metrics.read(), self.out / PLOT_FILE, title=str(self.out))

    def run(self) -> TrainResult:
        from mlx_lm.tuner.trainer import grad_checkpoint

        t = self.config.train
        progress = Progress(t.steps, self.loop.step, enabled=t.progress and self.rank == 0)
        record: dict[str, Any] = {}
        stop_reason = "steps"
        saved_at = self.loop.step if self.loop.step else None  # a resumed step is saved already
        block = type(self.model.layers[0])
        original_call = block.__call__
        if t.grad_checkpoint:
            grad_checkpoint(self.model.layers[0])  # patches the block class; undone below
        try:
            while self.loop.step < t.steps:
                record = self.step()
                step = self.loop.step
                if self.rank == 0:
                    self.metrics.append(record)
                progress.update(record)
                if record["skipped"]:
                    self._non_finite(progress, step)
                    continue
                if self.config.debug.hang_after_step == step:
                    progress.write(f"debug.hang_after_step: step {step} done; waiting to be "
                                   "killed")
                    while True:
                        time.sleep(3600)
                improved = False
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    improved, stop = self._eval_and_track(progress)
                    if stop:
                        stop_reason = "early_stopping"
                if improved or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    self.save(best=improved)
                    saved_at = step
                if stop_reason != "steps":
                    break
            if saved_at != self.loop.step:
                self.save()
        finally:
            block.__call__ = original_call
            progress.close()
            self._plot()
        return TrainResult(self.loop.step, stop_reason, read_pointer(self.out, "latest"),
                           read_pointer(self.out, "best"), self.loop.best_val, record)

    def _non_finite(self, progress: Progress, step: int) -> None:
        limit = self.config.train.nan_limit
        progress.write(f"warning: step {step}: loss or gradient is not finite; update skipped "
                       f"({self.loop.nan_streak} in a row, stopping at {limit})")
        if self.loop.nan_streak >= limit:
            latest = read_pointer(self.out, "latest")
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved"
            raise TrainingDiverged(f"stopped at step {step}: {limit} non-finite steps in a row "
                                   f"(train.nan_limit); {kept}")

    def _eval_and_track(self, progress: Progress) -> tuple[bool, bool]:
        result = self.evaluate()
        if result is None:
            return False, False
        loop, t = self.loop, self.config.train
        improved = loop.best_val is None or result["val_loss"] < loop.best_val - t.min_delta
        if improved:
            loop.best_val, loop.best_step, loop.evals_without_improvement = (
                result["val_loss"], loop.step, 0)
        else:
            loop.evals_without_improvement += 1
        if self.rank == 0:
            self.metrics.append({"kind": "eval", "step": loop.step, **result, "best": improved})
            self._plot()
        progress.write(f"step {loop.step}: val loss {result['val_loss']:.4f}"
                       f"{' (best)' if improved else ''}")
        stop = bool(t.patience) and loop.evals_without_improvement >= t.patience
        if stop:
            progress.write(f"early stopping: {t.patience} evaluations without improvement; best "
                           f"val loss {loop.best_val:.4f} at step {loop.best_step}")
        return improved, stop
