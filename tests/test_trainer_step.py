"""The distillation step: exact gradient accumulation, the LR schedule, NaN skip / stop, compile."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import numpy_weights, random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from trainer_helpers import ListSource, concat_batches, random_batch

from mlx_distill.losses import kd_loss, tool_span_weights
from mlx_distill.train import warmup_cosine_schedule
from mlx_distill.train_config import config_from_dict
from mlx_distill.train_state import read_pointer
from mlx_distill.trainer import Trainer, TrainingDiverged

VOCAB = 97


def make_config(tmp_path, **train):
    optim_section = train.pop("optim", {})
    loss = train.pop("loss", {})
    debug = train.pop("debug", {})
    return config_from_dict({
        "out": str(tmp_path / "run"),
        "student": {"size": "toy", "tokenizer": "unused"},
        "data": {"train": ["unused"]},
        "loss": {"kind": "forward_kl", "alpha": 0.3, "temperature": 2.0, "tool_weight": 3.0,
                 **loss},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.5, **optim_section},
        "train": {"steps": 4, "progress": False, "plot": False, "compile": False, **train},
        "debug": debug,
    })


def reference_run(model, batches, config, steps):
    """Plain MLX: mean kd_loss over the whole batch, clip, AdamW with the schedule (no trainer)."""
    o, loss_cfg = config.optim, config.loss
    opt = optim.AdamW(learning_rate=warmup_cosine_schedule(o.lr, o.end_lr, o.warmup_steps,
                                                           config.train.steps),
                      weight_decay=o.weight_decay)

    def loss_fn(m, b):
        return kd_loss(m(b["inputs"]), b["targets"], b["loss_mask"], alpha=loss_cfg.alpha,
                       kind=loss_cfg.kind, temperature=loss_cfg.temperature,
                       top_ids=b["top_ids"], top_logprobs=b["top_logprobs"], kd_mask=b["kd_mask"],
                       weights=tool_span_weights(b["tool_mask"], loss_cfg.tool_weight))["loss"]

    grad_fn = nn.value_and_grad(model, loss_fn)
    losses = []
    for step in range(steps):
        loss, grads = grad_fn(model, batches[step % len(batches)])
        grads, _ = optim.clip_grad_norm(grads, o.grad_clip)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    return losses


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    rng = np.random.default_rng(0)
    # Uneven rows and supervised-token counts per micro-batch: a mean of means would be wrong.
    micro = [random_batch(rng, rows, 24, VOCAB) for rows in (1, 3, 2)]
    micro2 = [random_batch(rng, rows, 24, VOCAB) for rows in (2, 1, 3)]
    config = make_config(tmp_path, optim={"grad_accum": 3})
    model = random_model(tiny_config(), seed=1)
    trainer = Trainer(config, model, ListSource(micro + micro2))
    records = [trainer.step() for _ in range(2)]

    reference = random_model(tiny_config(), seed=1)
    big = [concat_batches(micro), concat_batches(micro2)]
    ref_losses = reference_run(reference, big, config, 2)

    np.testing.assert_allclose([r["loss"] for r in records], ref_losses, rtol=1e-5)
    assert records[0]["n_tokens"] == int(np.array(big[0]["loss_mask"]).sum())
    ours, ref = numpy_weights(model), numpy_weights(reference)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-5, err_msg=name)
    moved = max(np.abs(ours[n] - numpy_weights(random_model(tiny_config(), seed=1))[n]).max()
                for n in ours)
    assert moved > 1e-3  # the updates did something


@settings(max_examples=12, deadline=None)
@given(lr=st.floats(1e-5, 1.0), ratio=st.floats(0.0, 1.0), warmup=st.integers(0, 20),
       extra=st.integers(1, 200))
def test_schedule_is_linear_warmup_then_cosine(lr, ratio, warmup, extra):
    total, min_lr = warmup + extra, lr * ratio
    schedule = warmup_cosine_schedule(lr, min_lr, warmup, total)
    for s in sorted({0, 1, warmup // 2, warmup, warmup + 1, (warmup + total) // 2, total - 1,
                     total, total + 5}):
        if s < warmup:
            expected = lr * s / warmup
        else:
            progress = min(s - warmup, total - warmup) / (total - warmup)
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        assert schedule(mx.array(s)).item() == pytest.approx(expected, rel=1e-5, abs=1e-6 * lr)


def test_trainer_reports_the_learning_rate_each_update_used(tmp_path):
    config = make_config(tmp_path, steps=6, optim={"warmup_steps": 2, "lr": 0.1, "min_lr": 0.01})
    trainer = Trainer(config, random_model(tiny_config()),
                      ListSource([random_batch(np.random.default_rng(1), 2, 16, VOCAB)]))
    lrs = [trainer.step()["lr"] for _ in range(6)]
    expected = [0.0, 0.05] + [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * i / 4))
                              for i in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


def test_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path):
    config = make_config(tmp_path, steps=5, debug={"poison_steps": [3]})
    model = random_model(tiny_config(), seed=2)
    batches = [random_batch(np.random.default_rng(i), 2, 16, VOCAB) for i in range(5)]
    trainer = Trainer(config, model, ListSource(batches))
    trainer.step(), trainer.step()
    before, opt_step = numpy_weights(model), trainer.optimizer.step.item()
    record = trainer.step()
    assert record["skipped"] and not math.isfinite(record["loss"])
    after = numpy_weights(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert trainer.optimizer.step.item() == opt_step  # no AdamW update, schedule not advanced
    assert trainer.loop.nan_streak == 1
    record = trainer.step()
    assert not record["skipped"] and math.isfinite(record["loss"])
    assert trainer.loop.nan_streak == 0
    assert all(np.isfinite(v).all() for v in numpy_weights(model).values())


def test_k_non_finite_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    config = make_config(tmp_path, steps=10, checkpoint_every=2, nan_limit=3,
                         debug={"poison_steps": [4, 5, 6]})
    model = random_model(tiny_config(), seed=3)
    batches = [random_batch(np.random.default_rng(i), 2, 16, VOCAB) for i in range(3)]
    trainer = Trainer(config, model, ListSource(batches))
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    message = str(err.value)
    assert "\n" not in message and "step 6" in message and "3 non-finite steps" in message
    latest = read_pointer(config.out)
    assert latest.name == "step-00000002" and str(latest) in message
    assert "step 4: loss or gradient is not finite" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["skipped"] for r in records] == [False] * 3 + [True] * 3
    assert records[3]["loss"] is None  # NaN is written as null (valid JSON)
    saved = mx.load(str(latest / "model.safetensors"))
    assert all(bool(mx.isfinite(v).all()) for v in saved.values())


def test_compiled_step_equals_eager(tmp_path):
    batches = [random_batch(np.random.default_rng(i), 2, 16, VOCAB) for i in range(2)]
    runs = []
    for compile_ in (True, False):
        config = make_config(tmp_path, optim={"grad_accum": 2})
        config.train.compile = compile_
        trainer = Trainer(config, random_model(tiny_config(), seed=4), ListSource(batches))
        runs.append([trainer.step()["loss"] for _ in range(3)])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
    assert runs[0][-1] < runs[0][0]


def test_early_stopping_keeps_the_best_checkpoint_and_draws_the_curve(tmp_path):
    # min_delta larger than any loss: only the first evaluation counts as an improvement.
    config = make_config(tmp_path, steps=10, eval_every=1, patience=2, min_delta=1e9,
                         eval_batches=2, plot=True)
    rng = np.random.default_rng(7)
    train, val = [random_batch(rng, 2, 16, VOCAB) for _ in range(2)], [
        random_batch(rng, 2, 16, VOCAB) for _ in range(3)]
    trainer = Trainer(config, random_model(tiny_config(), seed=8), ListSource(train),
                      val_batches=lambda: iter(val))
    result = trainer.run()
    assert result.stop_reason == "early_stopping" and result.steps == 3
    assert result.best.name == "step-00000001" and result.latest.name == "step-00000003"
    evals = [r for r in trainer.metrics.read() if r["kind"] == "eval"]
    assert [e["best"] for e in evals] == [True, False, False]
    # Token-weighted over the first eval_batches batches only: an independent recomputation.
    tokens = sum(int(np.array(b["loss_mask"]).sum()) for b in val[:2])
    assert evals[-1]["val_tokens"] == tokens
    both, loss = concat_batches(val[:2]), config.loss
    expected = kd_loss(trainer.model(both["inputs"]), both["targets"], both["loss_mask"],
                       alpha=loss.alpha, temperature=loss.temperature, top_ids=both["top_ids"],
                       top_logprobs=both["top_logprobs"], kd_mask=both["kd_mask"],
                       weights=tool_span_weights(both["tool_mask"], loss.tool_weight))["loss"]
    assert evals[-1]["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_parameters_stay_bfloat16(tmp_path):
    model = random_model(tiny_config(), seed=9)
    model.set_dtype(mx.bfloat16)
    trainer = Trainer(make_config(tmp_path), model,
                      ListSource([random_batch(np.random.default_rng(2), 2, 16, VOCAB)]))
    records = [trainer.step() for _ in range(3)]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records)
    assert {str(p.dtype) for _, p in tree_flatten(model.parameters())} == {"mlx.core.bfloat16"}
