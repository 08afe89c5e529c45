"""LoRA training: only adapters move, the fused checkpoint is a plain model mlx-lm loads with the
same logits, adapters load with mlx-lm too, and LoRA (dropout included) resumes exactly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model, tiny_config
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model
from trainer_helpers import ListSource, make_tokenizer, random_batch

from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.tokenizer import load_tokenizer
from mlx_distill.train_config import config_from_dict
from mlx_distill.train_run import build_student
from mlx_distill.train_state import read_pointer
from mlx_distill.trainer import Trainer

LORA = {"rank": 4, "scale": 8.0, "dropout": 0.0, "num_layers": 1,
        "keys": ["self_attn.q_proj", "mlp.down_proj"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer_dir = make_tokenizer(root)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer.get_vocab())
    model = random_model(tiny_config(vocab_size=vocab), seed=5)
    save_checkpoint(model, root / "base", tokenizer_dir=tokenizer_dir)
    return root, tokenizer, vocab


def make_config(root, out, lora=LORA, **train):
    return config_from_dict({
        "out": str(out),
        "student": {"init": str(root / "base")},
        "data": {"train": ["unused"]},
        "loss": {"kind": "forward_kl", "alpha": 0.5},
        "optim": {"lr": 2e-2, "grad_clip": 1.0},
        "train": {"steps": 4, "seed": 3, "lora": lora, "progress": False, "plot": False,
                  "compile": True, **train},
    })


def batches(vocab, n=4):
    return [random_batch(np.random.default_rng(i), 2, 16, vocab) for i in range(n)]


def test_lora_trains_only_adapters_and_fused_checkpoint_loads_in_mlx_lm(base, tmp_path):
    root, tokenizer, vocab = base
    config = make_config(root, tmp_path / "run")
    model = build_student(config, tokenizer)
    trainable = [name for name, _ in tree_flatten(model.trainable_parameters())]
    last = model.config.n_layers - 1
    assert sorted(trainable) == sorted(f"model.layers.{last}.{key}.{leaf}"
                                       for key in LORA["keys"] for leaf in ("lora_a", "lora_b"))
    frozen_before = {k: np.array(v) for k, v in tree_flatten(model.parameters())
                     if "lora_" not in k}

    trainer = Trainer(config, model, ListSource(batches(vocab)), tokenizer_dir=root / "base")
    result = trainer.run()
    params = dict(tree_flatten(model.parameters()))
    for name, value in frozen_before.items():
        assert np.array_equal(np.array(params[name]), value), name
    assert all(float(mx.abs(params[n]).max()) > 0 for n in trainable if n.endswith("lora_b"))

    model.eval()
    probe = mx.array(np.random.default_rng(9).integers(0, vocab, (2, 12)))
    expected = np.array(model(probe))
    fused, _ = load_model(result.latest)  # a plain model dir: no LoRA tensors, mlx-lm's loader
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    np.testing.assert_allclose(np.array(fused(probe)), expected, atol=1e-4)

    peer, _ = load_model(root / "base")
    load_adapters(peer, str(result.latest / "adapters"))
    peer.eval()
    np.testing.assert_allclose(np.array(peer(probe)), expected, atol=1e-4)


def test_lora_with_dropout_resumes_exactly(base, tmp_path):
    root, tokenizer, vocab = base
    lora = dict(LORA, dropout=0.2, num_layers=0, keys=None)
    data = batches(vocab, 6)

    straight = make_config(root, tmp_path / "straight", lora=lora, steps=6)
    trainer = Trainer(straight, build_student(straight, tokenizer), ListSource(data))
    expected = [trainer.step()["loss"] for _ in range(6)]

    config = make_config(root, tmp_path / "split", lora=lora, steps=6, checkpoint_every=3)
    first = Trainer(config, build_student(config, tokenizer), ListSource(data))
    config.train.steps = 3
    first.run()
    config.train.steps = 6
    second = Trainer(config, build_student(config, tokenizer), ListSource(data))
    assert second.resume() == read_pointer(config.out)
    assert second.loop.step == 3
    resumed = [second.step()["loss"] for _ in range(3)]
    np.testing.assert_allclose(resumed, expected[3:], rtol=1e-5)
    assert len(set(np.round(expected, 6))) == 6  # dropout draws differ per step


def test_grad_checkpoint_gives_the_same_steps_and_is_undone(base, tmp_path):
    root, tokenizer, vocab = base
    data = batches(vocab, 2)
    runs = []
    for flag in (False, True):
        config = make_config(root, tmp_path / f"gc{flag}", lora=None, steps=3,
                             grad_checkpoint=flag)
        model = build_student(config, tokenizer)
        call = type(model.layers[0]).__call__
        trainer = Trainer(config, model, ListSource(data))
        trainer.run()
        assert type(model.layers[0]).__call__ is call
        runs.append([r["loss"] for r in trainer.metrics.read()])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
