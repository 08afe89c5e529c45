"""Compressed weights through the interpreter: packages made by coremltools' own optimizers
(linear quantization int8/int4, palettization), checked against coremltools' decompression
(``materialized_val_inference``, a second opinion independent of our op code) and against numpy
products with the decompressed weights. Also multifunction and stateful INT8 packages, and the
iOS17 activation ``quantize``/``dequantize`` ops."""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
from coreml_helpers import save_program
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.optimize import coreml as cto

from converters.interpreter import OPS, load_mlpackage
from converters.interpreter.dtypes import compute_view
from converters.interpreter.registry import OpContext

IN, OUT = 64, 96  # 6144 weights: above the optimizers' default 2048-element threshold
RNG = np.random.default_rng(7)
WEIGHT = (0.1 * RNG.standard_normal((OUT, IN))).astype(np.float32)
BIAS = (0.1 * RNG.standard_normal(OUT)).astype(np.float32)
X = RNG.standard_normal((3, IN)).astype(np.float32)


def _linear_model(target):
    """An fp16 program ``x @ W.T + b`` (as ct.convert returns it, before compression)."""

    @mb.program(input_specs=[mb.TensorSpec((3, IN))], opset_version=target)
    def prog(x):
        return mb.linear(x=x, weight=WEIGHT, bias=BIAS, name="y")

    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target)


def _int8_per_channel():
    return cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"
        )
    )


def _only_op(model, op_type):
    ops = [o for o in model.function.operations if o.op_type == op_type]
    assert len(ops) == 1, model.op_histogram()
    return ops[0]


def _compressed_weight(model, op_type):
    """(the interpreter's value, coremltools' materialized value) of the one ``op_type`` op."""
    operation = _only_op(model, op_type)

    def read(var):
        return compute_view(var.val)

    ours = OPS[op_type](OpContext(operation, model.function_name, read, {}, fp32=False))
    ours = np.asarray(ours).astype(np.float16)
    reference = np.asarray(operation.materialized_val_inference()).astype(np.float16)
    return ours, reference


def _check_weight_and_predict(path, op_type, max_weight_error):
    model = load_mlpackage(path)
    assert model.op_histogram()[op_type] == 1
    ours, reference = _compressed_weight(model, op_type)
    np.testing.assert_array_equal(ours, reference)
    assert np.abs(reference.astype(np.float32) - WEIGHT).max() <= max_weight_error
    y = model.predict({"x": X})["y"]
    expected = X.astype(np.float16).astype(np.float32) @ reference.astype(np.float32).T + BIAS
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=2e-2, rtol=1e-2)
    return model


def _int8_bound():
    return float(np.abs(WEIGHT).max(axis=1).max()) / 127 / 2 + 1e-3


def test_int8_per_channel_ios16_affine_dequantize(tmp_path):
    model = cto.linear_quantize_weights(_linear_model(ct.target.iOS16), _int8_per_channel())
    model.save(str(tmp_path / "int8.mlpackage"))
    _check_weight_and_predict(
        tmp_path / "int8.mlpackage", "constexpr_affine_dequantize", _int8_bound()
    )


def test_int8_per_channel_ios18_blockwise_shift_scale(tmp_path):
    model = cto.linear_quantize_weights(_linear_model(ct.target.iOS18), _int8_per_channel())
    model.save(str(tmp_path / "int8.mlpackage"))
    loaded = _check_weight_and_predict(
        tmp_path / "int8.mlpackage", "constexpr_blockwise_shift_scale", _int8_bound()
    )
    op = _only_op(loaded, "constexpr_blockwise_shift_scale")
    assert op.data.dtype == types.int8 and op.scale.shape == (OUT, 1)


def test_int4_per_block_32(tmp_path):
    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
    )
    model = cto.linear_quantize_weights(_linear_model(ct.target.iOS18), config)
    model.save(str(tmp_path / "int4.mlpackage"))
    bound = float(np.abs(WEIGHT).max()) / 7 / 2 + 1e-3
    loaded = _check_weight_and_predict(
        tmp_path / "int4.mlpackage", "constexpr_blockwise_shift_scale", bound
    )
    op = _only_op(loaded, "constexpr_blockwise_shift_scale")
    assert op.data.dtype == types.int4 and op.scale.shape == (OUT, IN // 32)


@pytest.mark.parametrize(
    "target, granularity",
    [(ct.target.iOS16, "per_tensor"), (ct.target.iOS18, "per_grouped_channel")],
)
def test_palettized_lut_to_dense(tmp_path, target, granularity):
    extra = {"group_size": 16} if granularity == "per_grouped_channel" else {}
    config = cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(
            mode="uniform", nbits=4, granularity=granularity, **extra
        )
    )
    model = cto.palettize_weights(_linear_model(target), config)
    model.save(str(tmp_path / "lut.mlpackage"))
    # 16 evenly spaced levels over the weights' range: error at most half a step.
    step = float(WEIGHT.max() - WEIGHT.min()) / 15
    _check_weight_and_predict(tmp_path / "lut.mlpackage", "constexpr_lut_to_dense", step / 2 + 1e-3)


def test_multifunction_int8_package(tmp_path):
    """Two functions (different batch sizes) sharing one INT8 weight, saved with
    save_multifunction; each function runs on its own."""

    def function(batch):
        @mb.program(input_specs=[mb.TensorSpec((batch, IN))], opset_version=ct.target.iOS18)
        def prog(x):
            return mb.linear(x=x, weight=WEIGHT, bias=BIAS, name="y")

        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
        model = cto.linear_quantize_weights(model, _int8_per_channel())
        path = tmp_path / f"b{batch}.mlpackage"
        model.save(str(path))
        return path

    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(function(3)), src_function_name="main", target_function_name="prefill")
    desc.add_function(str(function(1)), src_function_name="main", target_function_name="decode")
    desc.default_function_name = "prefill"
    ct.utils.save_multifunction(desc, str(tmp_path / "multi.mlpackage"))

    prefill = load_mlpackage(tmp_path / "multi.mlpackage")
    decode = load_mlpackage(tmp_path / "multi.mlpackage", function_name="decode")
    assert prefill.function_names == ["decode", "prefill"] and prefill.function_name == "prefill"
    ours, reference = _compressed_weight(decode, "constexpr_blockwise_shift_scale")
    np.testing.assert_array_equal(ours, reference)
    weight = reference.astype(np.float32)
    x16 = X.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(
        prefill.predict({"x": X})["y"].astype(np.float32), x16 @ weight.T + BIAS, atol=2e-2
    )
    np.testing.assert_allclose(
        decode.predict({"x": X[:1]})["y"].astype(np.float32), x16[:1] @ weight.T + BIAS, atol=2e-2
    )


def test_stateful_int8_package_across_predict_calls(tmp_path):
    """A running sum kept in state feeds an INT8 linear layer: each call sees the previous calls."""

    @mb.program(
        input_specs=[mb.TensorSpec((1, IN), dtype=types.fp16),
                     mb.StateTensorSpec((1, IN), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, acc):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=total)
        return mb.linear(x=total, weight=WEIGHT.astype(np.float16), name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    model = cto.linear_quantize_weights(model, _int8_per_channel())
    model.save(str(tmp_path / "state.mlpackage"))

    loaded = load_mlpackage(tmp_path / "state.mlpackage")
    assert loaded.is_stateful()
    _, reference = _compressed_weight(loaded, "constexpr_blockwise_shift_scale")
    weight = reference.astype(np.float32)
    state = loaded.make_state()
    total = np.zeros((1, IN), np.float16)
    for x in RNG.standard_normal((4, 1, IN)).astype(np.float16):
        y = loaded.predict({"x": x}, state=state)["y"]
        total = (total.astype(np.float32) + x.astype(np.float32)).astype(np.float16)
        np.testing.assert_allclose(
            y.astype(np.float32), total.astype(np.float32) @ weight.T, atol=3e-2, rtol=1e-2
        )


def test_activation_quantize_dequantize(tmp_path):
    """iOS17 quantize (round half to even, clip) then dequantize, per channel along axis 1."""
    scale = np.array([0.5, 0.25, 2.0], np.float32)
    zero_point = np.array([0, 10, -3], np.int8)

    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=ct.target.iOS17)
    def prog(x):
        q = mb.quantize(input=x, scale=scale, zero_point=zero_point, axis=1,
                        output_dtype="int8", name="q")
        return q, mb.dequantize(input=q, scale=scale, zero_point=zero_point, axis=1, name="dq")

    path = save_program(prog, tmp_path / "q.mlpackage", target=ct.target.iOS17)
    x = np.array([[0.25, 0.375, 300.0], [-0.75, -40.0, -1.0]], np.float32)
    out = load_mlpackage(path).predict({"x": x})
    q = np.clip(np.rint(x / scale) + zero_point, -128, 127)
    np.testing.assert_array_equal(out["q"], q)  # 0.25/0.5 = 0.5 rounds to 0; 300/2 clips to 127
    np.testing.assert_allclose(out["dq"], (q - zero_point) * scale)
