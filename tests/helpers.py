"""Small builders shared by tests."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_distill.config import ModelConfig
from mlx_distill.model import Model


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=97,
                  max_seq_len=256)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, seed: int = 0) -> Model:
    """A model whose every parameter (norm weights and biases too) is random, so no term is
    trivially zero or one in a comparison."""
    model = Model(config)
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(p.shape)
        else:
            value = 0.15 * rng.standard_normal(p.shape)
        params.append((name, mx.array(value.astype(np.float32))))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def numpy_weights(model: Model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}
