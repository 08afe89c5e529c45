"""Student model properties: independent reference, causality, KV cache, GQA, RoPE scaling."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import numpy_weights, random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_logits

from mlx_distill.config import RopeScaling
from mlx_distill.model import Model, num_parameters


def _tokens(n, vocab, seed=0, batch=1):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (batch, n)), dtype=mx.int32)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_heads": 4},  # plain MHA
        {"n_kv_heads": 1},  # MQA
        {"attention_bias": True},
        {"attention_bias": True, "attention_out_bias": True},
        {"tie_embeddings": False},
        {"d_head": 32},  # d_head != d_model / n_heads
        {"rope_scaling": RopeScaling("linear", 4.0)},
        {"rope_theta": 500000.0, "norm_eps": 1e-6},
    ],
)
def test_matches_numpy_reference(overrides):
    cfg = tiny_config(**overrides)
    model = random_model(cfg, seed=1)
    tokens = _tokens(23, cfg.vocab_size, seed=2)
    ours = np.array(model(tokens)[0])
    ref = reference_logits(numpy_weights(model), cfg, np.array(tokens[0]))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


@settings(max_examples=12, deadline=None)
@given(
    length=st.integers(2, 24),
    cut=st.data(),
    kv=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_causality_future_tokens_never_change_earlier_logits(length, cut, kv, seed):
    cfg = tiny_config(n_kv_heads=kv)
    model = random_model(cfg, seed=3)
    t = cut.draw(st.integers(0, length - 2))
    tokens = np.array(_tokens(length, cfg.vocab_size, seed=seed))
    changed = tokens.copy()
    rng = np.random.default_rng(seed + 1)
    changed[0, t + 1 :] = rng.integers(0, cfg.vocab_size, length - t - 1)
    a = model(mx.array(tokens))[:, : t + 1]
    b = model(mx.array(changed))[:, : t + 1]
    assert mx.array_equal(a, b) or float(mx.abs(a - b).max()) < 1e-5


def _incremental(model, tokens, chunks):
    cache = model.make_cache()
    outs, start = [], 0
    for size in chunks:
        outs.append(model(tokens[:, start : start + size], cache))
        start += size
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "rope_scaling",
    [None, RopeScaling("linear", 2.0), RopeScaling("dynamic", 4.0, original_max_position=16)],
)
def test_prefill_equals_step_by_step_decode(rope_scaling):
    # 48 tokens: the dynamic case runs far past its original context of 16.
    cfg = tiny_config(rope_scaling=rope_scaling)
    model = random_model(cfg, seed=4)
    tokens = _tokens(48, cfg.vocab_size, seed=5, batch=2)
    full = model(tokens)
    steps = _incremental(model, tokens, [1] * 48)
    chunked = _incremental(model, tokens, [5, 11, 1, 20, 11])
    np.testing.assert_allclose(np.array(steps), np.array(full), atol=1e-4)
    np.testing.assert_allclose(np.array(chunked), np.array(full), atol=1e-4)


def test_dynamic_rope_is_plain_rope_within_original_context():
    base = random_model(tiny_config(), seed=6)
    dyn = Model(tiny_config(rope_scaling=RopeScaling("dynamic", 8.0, original_max_position=32)))
    dyn.update(base.parameters())
    tokens = _tokens(32, 97, seed=7)
    np.testing.assert_array_equal(np.array(base(tokens)), np.array(dyn(tokens)))
    longer = _tokens(40, 97, seed=7)
    assert not np.allclose(np.array(base(longer))[:, 32:], np.array(dyn(longer))[:, 32:])


def test_gqa_with_full_kv_heads_equals_mha_reference():
    # n_kv_heads == n_heads is plain multi-head attention: the reference repeats nothing.
    cfg = tiny_config(n_heads=4, n_kv_heads=4)
    model = random_model(cfg, seed=8)
    tokens = _tokens(17, cfg.vocab_size, seed=9)
    ref = reference_logits(numpy_weights(model), cfg, np.array(tokens[0]))
    np.testing.assert_allclose(np.array(model(tokens)[0]), ref, atol=2e-4, rtol=2e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_cfg = tiny_config(n_heads=4, n_kv_heads=2)
    mha_cfg = tiny_config(n_heads=4, n_kv_heads=4)
    gqa = random_model(gqa_cfg, seed=10)
    mha = Model(mha_cfg)
    mha.update(gqa.parameters())
    d = gqa_cfg.d_head
    for g_layer, m_layer in zip(gqa.layers, mha.layers, strict=True):
        for name in ("k_proj", "v_proj"):
            w = getattr(g_layer.self_attn, name).weight.reshape(2, d, -1)
            repeated = mx.repeat(w, 2, axis=0).reshape(4 * d, -1)
            getattr(m_layer.self_attn, name).weight = repeated
    tokens = _tokens(19, 97, seed=11, batch=2)
    np.testing.assert_allclose(np.array(gqa(tokens)), np.array(mha(tokens)), atol=1e-5)


def test_parameter_count_is_lazy_and_exact():
    cfg = tiny_config(tie_embeddings=False, attention_bias=True)
    d, f, v, hd = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.d_head
    per_layer = (
        d * cfg.n_heads * hd + cfg.n_heads * hd  # q + bias
        + 2 * (d * cfg.n_kv_heads * hd + cfg.n_kv_heads * hd)  # k, v + biases
        + cfg.n_heads * hd * d  # o
        + 3 * d * f + 2 * d  # mlp + norms
    )
    assert num_parameters(Model(cfg)) == 2 * v * d + cfg.n_layers * per_layer + d
