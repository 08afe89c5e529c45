"""Independent float64 numpy forward pass of a Llama-style decoder, written from the formulas
(explicit softmax, explicit causal mask, repeated KV heads), used as the reference in tests."""

from __future__ import annotations

import numpy as np

from mlx_distill.config import ModelConfig


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, cfg: ModelConfig):
    # x: (H, L, D), half-split rotation as in HF Llama
    d = cfg.d_head
    rs = cfg.rope_scaling
    scale = 1.0 / rs.factor if rs is not None and rs.type == "linear" else 1.0
    inv_freq = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = (positions * scale)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def reference_logits(weights: dict[str, np.ndarray], cfg: ModelConfig, tokens: np.ndarray):
    """``tokens``: (L,) ints -> logits (L, vocab), float64."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    L = tokens.shape[0]
    H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    positions = np.arange(L, dtype=np.float64)
    causal = np.tril(np.ones((L, L), dtype=bool))
    h = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], cfg.norm_eps)

        def proj(name, x=x, p=p):
            y = x @ w[p + f"self_attn.{name}.weight"].T
            bias = w.get(p + f"self_attn.{name}.bias")
            return y + bias if bias is not None else y

        q = proj("q_proj").reshape(L, H, D).transpose(1, 0, 2)
        k = proj("k_proj").reshape(L, KV, D).transpose(1, 0, 2)
        v = proj("v_proj").reshape(L, KV, D).transpose(1, 0, 2)
        q, k = _rope(q, positions, cfg), _rope(k, positions, cfg)
        k = np.repeat(k, H // KV, axis=0)
        v = np.repeat(v, H // KV, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(D)
        scores = np.where(causal, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        out = (attn @ v).transpose(1, 0, 2).reshape(L, H * D)
        out = out @ w[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in w:
            out = out + w[p + "self_attn.o_proj.bias"]
        h = h + out
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.norm_eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    h = _rms_norm(h, w["model.norm.weight"], cfg.norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    return h @ head.T
