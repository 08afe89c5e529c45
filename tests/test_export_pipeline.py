"""The exporter's shortcuts against the slower paths they replace: the lazy checkpoint reader
against ``load_checkpoint``, the reshape shape-inference shortcut against coremltools' sympy
solve, the two graph passes against ct.convert's 22, and the per-function weight size against a
saved single-function package."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from converters.checkpoint_weights import load_numpy_weights
from converters.mil_convert import (
    PASSES,
    blob_bytes,
    function_weight_bytes,
    reference_passes,
    run_passes,
    save_program,
)
from converters.mil_llama import LlamaGraph
from converters.shape_inference import solve_single_unknown
from mlx_distill.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mlx_distill.config import RopeScaling


def hf_dir(tmp_path, model, dtype, drop=(), extra=None):
    """An mlx-lm style directory (config.json + model.safetensors, no mlx_distill.json)."""
    out = tmp_path / f"hf-{dtype}"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters()) if k not in drop}
    weights.update(extra or {})
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_reader_matches_load_checkpoint(tmp_path, dtype):
    model = random_model(tiny_config(tie_embeddings=False, attention_bias=True,
                                     attention_out_bias=True), seed=1)
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": mx.ones(8)}
    ckpt = hf_dir(tmp_path, model, dtype, extra=inv_freq)
    config, weights = load_numpy_weights(ckpt)
    want = {k: np.array(v.astype(mx.float32))
            for k, v in tree_flatten(load_checkpoint(ckpt).parameters())}
    assert config == model.config and sorted(weights) == sorted(want)
    assert weights.shapes == {k: v.shape for k, v in want.items()}
    for key, value in want.items():
        got = weights[key]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, value, err_msg=key)


def test_reader_refuses_what_load_checkpoint_refuses(tmp_path):
    model = random_model(tiny_config(n_layers=1), seed=2)
    ckpt = save_checkpoint(model, tmp_path / "ours")
    config, weights = load_numpy_weights(ckpt)  # tied: lm_head is not expected
    assert "lm_head.weight" not in weights and len(weights) == len(dict(
        tree_flatten(model.parameters())))
    cases = {
        "missing": ({"drop": ("model.norm.weight",)}, "missing tensor model.norm.weight"),
        "shape": ({"drop": ("model.norm.weight",),
                   "extra": {"model.norm.weight": mx.ones(3)}}, "has shape (3,)"),
        "unexpected": ({"extra": {"model.extra.weight": mx.ones(3)}},
                       "unexpected tensor model.extra.weight"),
        "o_proj bias": ({"extra": {"model.layers.0.self_attn.o_proj.bias": mx.ones(64)}},
                        "non-zero o_proj bias"),
    }
    for name, (kwargs, message) in cases.items():
        (tmp_path / name).mkdir()
        bad = hf_dir(tmp_path / name, model, mx.float32, **kwargs)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_numpy_weights(bad)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="lies past the end"):
        load_numpy_weights(ckpt)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        load_numpy_weights(ckpt)


@settings(max_examples=150, deadline=None)
@given(dims=st.lists(st.integers(1, 64), min_size=1, max_size=4),
       n_symbols=st.integers(1, 2), out=st.lists(st.integers(1, 64), min_size=0, max_size=3),
       at=st.integers(0, 3))
def test_reshape_shortcut_equals_sympy_solve(dims, n_symbols, out, at):
    from coremltools.converters.mil.mil import get_new_symbol
    from coremltools.converters.mil.mil.ops.defs.iOS15.tensor_transformation import reshape

    left = int(np.prod(dims))
    for _ in range(n_symbols):
        left = left * get_new_symbol()
    shape = list(out)
    shape.insert(min(at, len(shape)), get_new_symbol())
    got = solve_single_unknown(left, list(shape))
    want = reshape.enforce_volumetric_constraint(left, list(shape))
    assert got is not None and [str(d) for d in got] == [str(d) for d in want]
    assert [type(d) is int for d in got] == [type(d) is int for d in want]


def signature(prog):
    """Every function's ops in order: type, inputs (by position of first appearance), output
    types, const values; symbol names renumbered by first appearance."""
    symbols: dict[str, str] = {}
    return {name: _function_signature(f, symbols) for name, f in prog.functions.items()}


def _function_signature(function, symbols):
    ids: dict[str, int] = {}

    def ref(var):
        return ids.setdefault(var.name, len(ids))

    def norm_type(t):
        return re.sub(r"\bis\d+\b", lambda m: symbols.setdefault(m[0], f"s{len(symbols)}"),
                      str(t))

    for var in function.inputs.values():
        ref(var)
    ops = []
    for op in function.operations:
        inputs = tuple((k, tuple(ref(x) for x in v) if isinstance(v, (list, tuple)) else ref(v))
                       for k, v in op.inputs.items())
        outputs = tuple((ref(o), norm_type(o.sym_type)) for o in op.outputs)
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray):
            value = (value.dtype.str, value.shape, value.tobytes())
        ops.append((op.op_type, inputs, outputs, repr(value)))
    return ops, tuple(ref(o) for o in function.outputs)


VARIANTS = [
    (tiny_config(n_layers=1), "linear", "fp16"),
    (tiny_config(n_layers=1), "ane", "int8"),
    (tiny_config(n_layers=1, d_ff=64), "linear", "int4"),
    (tiny_config(n_layers=1, attention_bias=True, attention_out_bias=True,
                 tie_embeddings=False, rope_scaling=RopeScaling("linear", 4.0)), "ane", "fp16"),
    (tiny_config(n_layers=1, n_kv_heads=4, rope_scaling=RopeScaling("dynamic", 2.0, 8)),
     "linear", "int8"),
]


@pytest.mark.parametrize(("config", "layout", "precision"), VARIANTS)
def test_two_passes_give_the_converter_output(tmp_path, config, layout, precision):
    ckpt = save_checkpoint(random_model(config, seed=3), tmp_path / "ckpt")
    _, weights = load_numpy_weights(ckpt)
    built = []
    for passes in (reference_passes(), PASSES):
        prog = LlamaGraph(config, weights, layout=layout, max_context=32,
                          precision=precision).program()
        run_passes(prog, passes)
        built.append(signature(prog))
    assert built[0] == built[1]
    assert len(PASSES) == 2 and len(reference_passes()) == 22


def test_reshape_shortcut_leaves_the_prefill_function_unchanged(tmp_path):
    config = tiny_config(n_layers=1)
    ckpt = save_checkpoint(random_model(config, seed=4), tmp_path / "ckpt")
    _, weights = load_numpy_weights(ckpt)
    from coremltools.converters.mil.mil import Program

    for layout in ("linear", "ane"):
        fast = LlamaGraph(config, weights, layout=layout, max_context=32).program(("prefill",))
        reference = Program()  # _prefill() directly: built without the shortcut installed
        reference.add_function("prefill", LlamaGraph(config, weights, layout=layout,
                                                     max_context=32)._prefill())
        assert signature(fast) == signature(reference)


def test_function_weight_bytes_is_the_single_function_blob(tmp_path):
    config = tiny_config(n_layers=2)
    ckpt = save_checkpoint(random_model(config, seed=5), tmp_path / "ckpt")
    _, weights = load_numpy_weights(ckpt)
    for precision in ("fp16", "int4"):
        graph = LlamaGraph(config, weights, layout="ane", max_context=32, precision=precision)
        single = graph.program(("decode",))
        run_passes(single)
        expected = function_weight_bytes(single.functions["decode"])
        path = save_program(single, tmp_path / f"decode-{precision}.mlpackage")
        assert blob_bytes(path) == expected
        both = graph.program()
        run_passes(both)
        path = save_program(both, tmp_path / f"both-{precision}.mlpackage")
        # The shared weights once; only the few per-function consts (the decode mask's slot
        # indices, casts) twice.
        assert expected <= blob_bytes(path) <= expected + 2048
