"""The Llama-family student as MIL programs, built directly with coremltools' builder (no torch).

One program with two functions that share every weight (``mil_weights``: one blob entry per
weight):

- ``prefill``: ``input_ids`` (1, S), S symbolic (exported as enumerated shapes); writes K/V of
  positions [0, S) into the cache state and returns ``logits`` (1, S, vocab).
- ``decode``: ``input_ids`` (1, 1) at position ``pos`` (1,); writes that position's K/V, attends
  over the whole cache with positions > pos masked, returns ``logits`` (1, 1, vocab).

Two layouts compute the same function:

- ``linear``: activations (1, S, C), ``linear`` projections, batched GQA attention (query heads of
  one KV group stacked along the sequence axis, so K/V are never repeated). Cache: (layers,
  kv_heads, max_context, d_head).
- ``ane``: channels-first (1, C, 1, S) with 1×1 ``conv`` projections and attention split per head,
  after apple/ml-ane-transformers ("Deploying Transformers on the Apple Neural Engine", 2022).
  Cache: (layers, kv_heads, d_head, max_context), i.e. each head's keys channels-first too.

Everything is fp16. RoPE uses precomputed cos/sin tables gathered by position, which also gives
linear scaling and our per-position dynamic NTK (``config.RopeScaling``) exactly. The attention
scale 1/sqrt(d_head) is folded into q_proj (RoPE is linear, so it commutes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from converters.mil_weights import WeightConsts, WeightRangeError, rope_tables, to_fp16
from converters.shape_inference import fast_reshape_inference
from mlx_distill.config import ModelConfig

LAYOUTS = ("linear", "ane")
INPUT_IDS, POSITION, LOGITS = "input_ids", "pos", "logits"
K_CACHE, V_CACHE = "k_cache", "v_cache"
# Named residual-stream values, in both programs: `verify-coreml --probe` exposes them as extra
# outputs of a probe copy of a saved package to find the first layer that diverges.
EMBEDDINGS = "embeddings"
# Added to attention scores of hidden positions. Finite (an fp16 -inf could turn a fully masked row
# into NaN) and far below any real score, so exp() of it is exactly 0 in fp16.
MASK_VALUE = -30000.0
FUNCTIONS = ("prefill", "decode")  # the first is the package's default function


def hidden_state_name(layer: int) -> str:
    """Name of the residual stream after decoder layer ``layer`` (0-based); see EMBEDDINGS."""
    return f"layer_{layer}_output"


class GraphError(ValueError):
    """The model cannot be expressed as requested; the message says what and why."""


class LlamaGraph:
    """Builds the prefill / decode MIL functions for one model, layout, cache size and weight
    precision (``fp16``, ``int8``, ``int4``; see ``converters.mil_weights``).

    ``weights``: HF Llama names -> float arrays (``model.embed_tokens.weight`` ...), read once
    per tensor (a lazy mapping such as ``checkpoint_weights.CheckpointWeights`` works).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray],
                 layout: str = "linear", max_context: int = 2048, precision: str = "fp16"):
        if layout not in LAYOUTS:
            raise GraphError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if not isinstance(max_context, int) or max_context < 1:
            raise GraphError(f"max_context: expected a positive integer, got {max_context!r}")
        self.config, self.weights = config, weights
        self.layout, self.max_context = layout, max_context
        cos, sin = rope_tables(config, max_context)
        if layout == "ane":  # channels-first: (d_head / 2, positions)
            cos, sin = cos.T, sin.T
        self._rope = (to_fp16("rope_cos", cos), to_fp16("rope_sin", sin))
        self._consts = WeightConsts(precision)

    # ---- shapes the contract and the runtime rely on ----
    def cache_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        if self.layout == "ane":
            return (c.n_layers, c.n_kv_heads, c.d_head, self.max_context)
        return (c.n_layers, c.n_kv_heads, self.max_context, c.d_head)

    # ---- programs ----
    def program(self, functions=FUNCTIONS):
        """One program holding ``functions`` (default function: the first), weights shared; with
        one function, a single-function program."""
        from coremltools.converters.mil.mil import Program

        prog = Program()
        for name in functions:
            prog.add_function(name, self.function(name))
        prog.default_function_name = functions[0]
        prog.export_as_multifunction = len(functions) > 1
        return prog

    def function(self, name: str):
        """The ``prefill`` or ``decode`` function (a ``mil.Function``)."""
        if name not in FUNCTIONS:
            raise GraphError(f"function: expected one of {FUNCTIONS}, got {name!r}")
        with fast_reshape_inference():
            return self._prefill() if name == "prefill" else self._decode()

    def _prefill(self):
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import get_new_symbol, types

        specs = [mb.TensorSpec((1, get_new_symbol()), dtype=types.int32), *self._state_specs()]

        @mb.function(input_specs=specs, opset_version=ct.target.iOS18)
        def prefill(input_ids, k_cache, v_cache):
            self._consts.begin_function()
            length = mb.slice_by_index(x=mb.shape(x=input_ids), begin=[1], end=[2])
            positions = mb.range_1d(start=0, end=mb.squeeze(x=length), step=1)
            return self._forward(input_ids, positions, length, None, k_cache, v_cache)

        self._check_input_names(prefill, (INPUT_IDS, K_CACHE, V_CACHE))
        return prefill

    def _decode(self):
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        specs = [
            mb.TensorSpec((1, 1), dtype=types.int32),
            mb.TensorSpec((1,), dtype=types.int32),
            *self._state_specs(),
        ]

        @mb.function(input_specs=specs, opset_version=ct.target.iOS18)
        def decode(input_ids, pos, k_cache, v_cache):
            self._consts.begin_function()
            return self._forward(input_ids, pos, None, pos, k_cache, v_cache)

        self._check_input_names(decode, (INPUT_IDS, POSITION, K_CACHE, V_CACHE))
        return decode

    def _state_specs(self):
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        return [mb.StateTensorSpec(self.cache_shape(), dtype=types.fp16) for _ in range(2)]

    @staticmethod
    def _check_input_names(function, names):
        # The builder names inputs after the Python parameters already; assert it stays so, since
        # the contract publishes these names.
        got = tuple(function.inputs)
        if got != names:
            raise GraphError(f"program inputs are {got}, expected {names}")

    # ---- constants ----
    def const(self, key: str, value_fn=None, conv: bool = False, model_weight: bool = True):
        """The function's const (or dequantizing constexpr) for weight ``key``; a tied weight used
        twice is one tensor. ``value_fn``: its float values (default: ``weights[key]``)."""
        try:
            return self._consts.get(key, value_fn or (lambda: self.weights[key]), conv=conv,
                                    model_weight=model_weight)
        except WeightRangeError as exc:
            raise GraphError(str(exc)) from None

    def _weight(self, key: str, scale: float = 1.0):
        return self.const(key, lambda: _scaled(self.weights[key], scale),
                          conv=self.layout == "ane")

    def _bias(self, key: str, scale: float = 1.0):
        if key not in self.weights:
            return None
        return self.const(key, lambda: _scaled(self.weights[key], scale))

    def _project(self, x, prefix: str, scale: float = 1.0):
        from coremltools.converters.mil import Builder as mb

        kwargs = {"weight": self._weight(f"{prefix}.weight", scale)}
        bias = self._bias(f"{prefix}.bias", scale)
        if bias is not None:
            kwargs["bias"] = bias
        if self.layout == "ane":
            return mb.conv(x=x, **kwargs)
        return mb.linear(x=x, **self._with_bias(kwargs))

    def _with_bias(self, kwargs):
        """``linear`` without a bias gets a zero-filled const of its own per op; one shared
        zero vector per width keeps the package at one copy (the blob stores every const)."""
        if "bias" not in kwargs:
            width = kwargs["weight"].shape[0]
            kwargs["bias"] = self.const(f"zeros#{width}", lambda: np.zeros(width, np.float16),
                                        model_weight=False)
        return kwargs

    # ---- the network ----
    def _forward(self, input_ids, positions, length, pos, k_cache, v_cache):
        """``length``: (1,) int32 prompt length (prefill) or None; ``pos``: (1,) (decode)."""
        from coremltools.converters.mil import Builder as mb

        cfg = self.config
        h = self._embed(input_ids, name=EMBEDDINGS)
        cos, sin = self._rope_at(positions)
        # Cache offsets: zeros except the time axis, which holds pos (decode) or S (prefill).
        time = [0, 0, 0, 0]
        time[self._time_axis] = pos if pos is not None else length
        offsets = mb.concat(values=[v if not isinstance(v, int) else np.zeros(1, np.int32)
                                    for v in time], axis=0)
        step = _Step(cos, sin, self._mask(positions, pos), pos is not None, offsets,
                     states={"k": k_cache, "v": v_cache},
                     values={"k": mb.read_state(input=k_cache),
                             "v": mb.read_state(input=v_cache)})
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}"
            x = self._rms_norm(h, f"{p}.input_layernorm.weight")
            h = mb.add(x=h, y=self._attention(x, p, i, step))
            x = self._rms_norm(h, f"{p}.post_attention_layernorm.weight")
            gate = self._project(x, f"{p}.mlp.gate_proj")
            up = self._project(x, f"{p}.mlp.up_proj")
            h = mb.add(x=h, y=self._project(mb.mul(x=mb.silu(x=gate), y=up),
                                            f"{p}.mlp.down_proj"), name=hidden_state_name(i))
        h = self._rms_norm(h, "model.norm.weight")
        return self._lm_head(h)

    def _embed(self, input_ids, name: str):
        """Token embeddings: (1, S, C) linear, (1, C, 1, S) ane."""
        from coremltools.converters.mil import Builder as mb

        table = self._weight("model.embed_tokens.weight")
        if self.layout == "linear":
            return mb.gather(x=table, indices=input_ids, axis=0, name=name)
        # The (V, C, 1, 1) table doubles as the tied LM head's conv weight, so it is stored once.
        rows = mb.gather(x=table, indices=mb.reshape(x=input_ids, shape=[-1]), axis=0)
        return mb.transpose(x=rows, perm=[2, 1, 3, 0], name=name)  # (S, C, 1, 1) -> (1, C, 1, S)

    def _lm_head(self, h):
        from coremltools.converters.mil import Builder as mb

        key = "model.embed_tokens.weight" if self.config.tie_embeddings else "lm_head.weight"
        kwargs = {"weight": self._weight(key), "name": LOGITS}
        if self.layout == "linear":
            return mb.linear(x=h, **self._with_bias(kwargs))
        del kwargs["name"]
        logits = mb.conv(x=h, **kwargs)  # (1, V, 1, S)
        logits = mb.squeeze(x=logits, axes=[2])
        return mb.transpose(x=logits, perm=[0, 2, 1], name=LOGITS)

    def _rms_norm(self, x, key: str):
        """RMSNorm as ``layer_norm`` over [x, -x]: that concatenation has mean 0 and variance
        mean(x²), so the fused op yields x / sqrt(mean(x²) + eps) without an fp16 x² tensor,
        which overflows once |x| > 256 (residual streams of trained models get there)."""
        from coremltools.converters.mil import Builder as mb

        axis = 1 if self.layout == "ane" else -1
        width = self.config.d_model
        both = mb.concat(values=[x, mb.mul(x=x, y=np.float16(-1.0))], axis=axis)
        gamma = self.const(f"{key}#doubled", lambda: np.concatenate([self.weights[key]] * 2))
        normed = mb.layer_norm(x=both, axes=[axis], gamma=gamma,
                               epsilon=np.float16(self.config.norm_eps))
        if self.layout == "ane":
            return mb.slice_by_index(x=normed, begin=[0, 0, 0, 0], end=[0, width, 0, 0],
                                     begin_mask=[True, True, True, True],
                                     end_mask=[True, False, True, True])
        return mb.slice_by_index(x=normed, begin=[0, 0, 0], end=[0, 0, width],
                                 begin_mask=[True, True, True], end_mask=[True, True, False])

    def _rope_at(self, positions):
        """cos/sin rows of the given positions: (S, d/2) linear, (d/2, S) ane."""
        from coremltools.converters.mil import Builder as mb

        axis = 1 if self.layout == "ane" else 0
        cos = self.const("rope_cos", lambda: self._rope[0], model_weight=False)
        sin = self.const("rope_sin", lambda: self._rope[1], model_weight=False)
        return (mb.gather(x=cos, indices=positions, axis=axis),
                mb.gather(x=sin, indices=positions, axis=axis))

    def _rotate(self, x, cos, sin):
        """Half-split RoPE along the head axis (-1 linear, 2 ane)."""
        from coremltools.converters.mil import Builder as mb

        axis = 2 if self.layout == "ane" else -1
        x1, x2 = mb.split(x=x, num_splits=2, axis=axis)
        return mb.concat(values=[mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin)),
                                 mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))],
                         axis=axis)

    def _mask(self, positions, pos):
        """Additive attention mask: 0 where a key is visible, MASK_VALUE where hidden.
        Linear layout: (queries, keys); ane layout: (keys, queries)."""
        from coremltools.converters.mil import Builder as mb

        if pos is None:  # prefill: causal over the chunk itself
            rows = mb.reshape(x=positions, shape=[-1, 1])
            cols = mb.reshape(x=positions, shape=[1, -1])
            key_pos, query_pos = (rows, cols) if self.layout == "ane" else (cols, rows)
        else:  # decode: every cache slot up to pos
            slots = np.arange(self.max_context, dtype=np.int32)
            key_pos = slots[:, None] if self.layout == "ane" else slots[None, :]
            query_pos = pos
        # (1 - visible) · MASK_VALUE; `select` with scalar branches mis-infers a scalar shape.
        visible = mb.cast(x=mb.less_equal(x=key_pos, y=query_pos), dtype="fp16")
        return mb.mul(x=mb.sub(x=np.float16(1.0), y=visible), y=np.float16(MASK_VALUE))

    @property
    def _time_axis(self) -> int:
        return 3 if self.layout == "ane" else 2

    def _update_cache(self, step: _Step, layer: int, k, v):
        """Write this layer's new K/V into the states (read_state -> slice_update ->
        coreml_update_state, the in-place pattern Core ML recognizes) and return what attention
        reads: the chunk's own K/V in prefill, the layer's whole cache in decode."""
        from coremltools.converters.mil import Builder as mb

        shape = list(self.cache_shape())
        layer_start = np.array([layer, 0, 0, 0], np.int32)
        if step.decode:  # slot [pos, pos + 1) of this layer
            extent = [layer + 1, *shape[1:]]
            extent[self._time_axis] = 1
            begin = mb.add(x=step.offsets, y=layer_start)
            end = mb.add(x=step.offsets, y=np.array(extent, np.int32))
        else:  # slots [0, S) of this layer
            extent = [layer + 1, *shape[1:]]
            extent[self._time_axis] = 0
            begin = layer_start
            end = mb.add(x=step.offsets, y=np.array(extent, np.int32))
        out = []
        for which, new in (("k", k), ("v", v)):
            # coreml_update_state returns the state's new value: the next layer updates that
            # (a second read_state would be merged with the first by common-op elimination).
            written = mb.coreml_update_state(
                state=step.states[which],
                value=mb.slice_update(x=step.values[which], update=new, begin=begin, end=end))
            step.values[which] = written
            if step.decode:
                out.append(mb.slice_by_index(x=written, begin=layer_start,
                                             end=[layer + 1, *shape[1:]]))
        return tuple(out) if step.decode else (k, v)

    def _attention(self, x, p: str, layer: int, step: _Step):
        scale = self.config.d_head ** -0.5
        q = self._project(x, f"{p}.self_attn.q_proj", scale)
        k = self._project(x, f"{p}.self_attn.k_proj")
        v = self._project(x, f"{p}.self_attn.v_proj")
        attend = self._attention_ane if self.layout == "ane" else self._attention_linear
        return self._project(attend(q, k, v, layer, step), f"{p}.self_attn.o_proj")

    def _attention_linear(self, q, k, v, layer: int, step: _Step):
        from coremltools.converters.mil import Builder as mb

        cfg = self.config
        heads, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        group = heads // kv

        def split_heads(t, n):  # (1, S, n·d) -> (1, n, S, d)
            return mb.transpose(x=mb.reshape(x=t, shape=[1, -1, n, d]), perm=[0, 2, 1, 3])

        q = self._rotate(split_heads(q, heads), step.cos, step.sin)
        k = self._rotate(split_heads(k, kv), step.cos, step.sin)
        k, v = self._update_cache(step, layer, k, split_heads(v, kv))
        # GQA without repeating K/V: the `group` query heads of a KV head stacked along the query
        # axis, (1, heads, S, d) -> (1, kv, group·S, d); prefill's mask is tiled to match.
        q = mb.reshape(x=q, shape=[1, kv, -1, d])
        mask = step.mask
        if group > 1 and not step.decode:  # decode's (1, T) mask broadcasts as it is
            mask = mb.tile(x=mask, reps=[group, 1])
        scores = mb.add(x=mb.matmul(x=q, y=k, transpose_y=True), y=mask)
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)  # (1, kv, group·S, d)
        out = mb.transpose(x=mb.reshape(x=out, shape=[1, heads, -1, d]), perm=[0, 2, 1, 3])
        return mb.reshape(x=out, shape=[1, -1, heads * d])

    def _attention_ane(self, q, k, v, layer: int, step: _Step):
        from coremltools.converters.mil import Builder as mb

        cfg = self.config
        heads, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        group = heads // kv
        # (1, n·d, 1, S) -> (1, n, d, S): each head's channels, then time (a pure reshape).
        q = self._rotate(mb.reshape(x=q, shape=[1, heads, d, -1]), step.cos, step.sin)
        k = self._rotate(mb.reshape(x=k, shape=[1, kv, d, -1]), step.cos, step.sin)
        k, v = self._update_cache(step, layer, k, mb.reshape(x=v, shape=[1, kv, d, -1]))
        q_heads = mb.split(x=q, num_splits=heads, axis=1) if heads > 1 else [q]
        k_heads = mb.split(x=k, num_splits=kv, axis=1) if kv > 1 else [k]
        v_heads = mb.split(x=v, num_splits=kv, axis=1) if kv > 1 else [v]
        outs = []
        for h, q_h in enumerate(q_heads):  # per-head attention, (1, 1, d, S) each
            k_h, v_h = k_heads[h // group], v_heads[h // group]
            scores = mb.add(x=mb.matmul(x=k_h, y=q_h, transpose_x=True), y=step.mask)  # (T, S)
            outs.append(mb.matmul(x=v_h, y=mb.softmax(x=scores, axis=2)))  # (1, 1, d, S)
        out = mb.concat(values=outs, axis=1) if heads > 1 else outs[0]  # (1, heads, d, S)
        return mb.reshape(x=out, shape=[1, heads * d, 1, -1])


@dataclass
class _Step:
    """What every layer of one program shares."""

    cos: Any
    sin: Any
    mask: Any
    decode: bool
    offsets: Any  # (4,) int32: the cache's time axis holds pos (decode) or S (prefill)
    states: dict  # "k"/"v" -> state input
    values: dict  # "k"/"v" -> the state's current value (after the last layer's update)


def _scaled(w: np.ndarray, scale: float) -> np.ndarray:
    return w if scale == 1.0 else w.astype(np.float32) * scale
