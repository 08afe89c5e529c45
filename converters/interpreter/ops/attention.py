"""scaled_dot_product_attention (iOS18, coremltools ``mil/ops/defs/iOS18/transformers.py``):

    softmax(Q @ K^T / sqrt(E) + mask) @ V

query (B, *, L, E), key (B, *, S, E), value (B, *, S, EV). ``attn_mask`` broadcasts to
(B, *, L, S): a bool mask keeps positions where it is True (False becomes -inf), a float mask is
added to the scores. A row whose every position is masked out gives NaN, as in PyTorch.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op


@op("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx):
    query = np.asarray(ctx["query"], dtype=np.float32)
    key = np.asarray(ctx["key"], dtype=np.float32)
    value = np.asarray(ctx["value"], dtype=np.float32)
    if not query.ndim == key.ndim == value.ndim >= 3:
        shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
        raise ctx.error(f"{shapes}: need one rank, at least 3")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ctx.error(f"query {query.shape}, key {key.shape}, value {value.shape} do not fit")
    # Scaling the (L, E) query rather than the (L, S) scores: fewer multiplies, same result.
    scale = np.float32(1.0 / np.sqrt(query.shape[-1]))
    scores = np.matmul(query * scale, np.swapaxes(key, -1, -2))
    if ctx.has("attn_mask"):
        mask = np.asarray(ctx["attn_mask"])
        try:
            if mask.dtype == np.bool_:
                scores = np.where(mask, scores, np.float32(-np.inf))
            else:
                scores = scores + mask.astype(np.float32)
        except ValueError:
            message = f"attn_mask {mask.shape} does not broadcast to {scores.shape}"
            raise ctx.error(message) from None
    with np.errstate(invalid="ignore"):  # fully masked rows: -inf - -inf = NaN, as in PyTorch
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
    return np.matmul(weights, value)
