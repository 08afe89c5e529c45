"""The student: a Llama-style GQA decoder in MLX.

Module and parameter names follow Hugging Face Llama (``model.layers.N.self_attn.q_proj`` …) so a
checkpoint is ``tree_flatten(model.parameters())`` as is, and mlx-lm loads it unchanged.
The KV cache is mlx-lm's ``KVCache``: generation code from either project drives either model.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from mlx_distill.config import ModelConfig


class RoPE(nn.Module):
    """Rotary embedding (half-split layout, as HF Llama / ``traditional=False``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dims = config.d_head
        self.base = float(config.rope_theta)
        rs = config.rope_scaling
        self.scale = 1.0 / rs.factor if rs is not None and rs.type == "linear" else 1.0
        self.dynamic = rs if rs is not None and rs.type == "dynamic" else None

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        length = x.shape[-2]
        if self.dynamic is None or offset + length <= self.dynamic.original_max_position:
            return mx.fast.rope(
                x, self.dims, traditional=False, base=self.base, scale=self.scale, offset=offset
            )
        return self._dynamic_ntk(x, offset)

    def _dynamic_ntk(self, x: mx.array, offset: int) -> mx.array:
        # Per-position base: position p uses the NTK base for a sequence of length p + 1, so
        # cached keys keep their rotation as the sequence grows (see config.RopeScaling).
        factor, orig = self.dynamic.factor, self.dynamic.original_max_position
        half = self.dims // 2
        positions = mx.arange(offset, offset + x.shape[-2], dtype=mx.float32)
        seq_len = mx.maximum(positions + 1, orig)
        base = self.base * ((factor * seq_len / orig) - (factor - 1)) ** (
            self.dims / (self.dims - 2)
        )
        exponents = mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims
        inv_freq = mx.power(base[:, None], -exponents[None, :])
        angles = positions[:, None] * inv_freq
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = (
            config.n_heads, config.n_kv_heads, config.d_head
        )
        self.scale = config.d_head**-0.5
        d, qkv_bias = config.d_model, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.d_head, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, d, bias=config.attention_out_bias)
        self.rope = RoPE(config)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, H·D) -> (B, H, L, D)
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.d_head).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.d_head).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.d_head).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA: the fused kernel broadcasts each kv head over n_heads // n_kv_heads query heads.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.d_model, eps=config.norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [TransformerBlock(config) for _ in range(config.n_layers)]
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.embed_tokens(tokens)
        # "causal" is aligned to the last query, so it also masks a chunk appended to a cache.
        mask = "causal" if h.shape[1] > 1 else None
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache is not None else None)
        return self.norm(h)


class Model(nn.Module):
    """``Model(config)(tokens[B, L], cache) -> logits[B, L, vocab]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        return self.head(self.model(tokens, cache))

    def head(self, hidden: mx.array) -> mx.array:
        """Logits from final hidden states (the training objective calls it on a subset)."""
        if self.config.tie_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> list[TransformerBlock]:
        # mlx-lm's generate/cache helpers look for ``model.layers``.
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.config.n_layers)]


def num_parameters(model: nn.Module) -> int:
    """Exact count without evaluating (MLX arrays are lazy: nothing is allocated)."""
    from mlx.utils import tree_flatten

    return sum(p.size for _, p in tree_flatten(model.parameters()))
