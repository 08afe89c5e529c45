"""converters.quantize against coremltools' own weight quantizer: the exporter quantizes each
weight as it reads it instead of running ``ct.optimize.coreml.linear_quantize_weights`` over the
finished program, so the int8/int4 data and fp16 scales must be bit-equal to what that API stores
for the same float16 weight."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from converters.quantize import _round_to_fp16_precision, quantize_symmetric


def ct_quantized(weight16: np.ndarray, nbits: int, block: int | None, conv: bool = False):
    """(data, scale) that ``ct.optimize.coreml.linear_quantize_weights`` stores for ``weight16``
    used as the weight of a ``linear`` (or a 1×1 ``conv``) in a converted model."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    out_dim, in_dim = weight16.shape
    shape = (1, in_dim, 1, 1) if conv else (1, in_dim)

    @mb.program(input_specs=[mb.TensorSpec(shape, dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        w = mb.const(val=weight16[:, :, None, None] if conv else weight16, name="w")
        return mb.conv(x=x, weight=w) if conv else mb.linear(x=x, weight=w)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    if block is None:
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{nbits}",
                                                granularity="per_channel", weight_threshold=0)
    else:
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{nbits}",
                                                granularity="per_block", block_size=block,
                                                weight_threshold=0)
    quantized = cto.linear_quantize_weights(
        model, config=cto.OptimizationConfig(global_config=op_config))
    (op,) = [op for op in quantized._mil_program.functions["main"].operations
             if op.op_type == "constexpr_blockwise_shift_scale"]
    assert op.offset is None  # symmetric: no zero point
    return op.data.val, op.scale.val


def ct_blockwise(weight16: np.ndarray, nbits: int, block: int | None):
    """The per-tensor routine that pass calls (checked against the pass itself below)."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    params = linear_quantize_weights.blockwise_compress_by_dtype(
        weight16, f"int{nbits}", "LINEAR_SYMMETRIC", [1, block or 0])
    return params.data, params.scale


def assert_same(ours, data, scale):
    assert ours.data.dtype == np.int8
    np.testing.assert_array_equal(ours.data, np.asarray(data).reshape(ours.data.shape))
    theirs = np.asarray(scale, np.float16).reshape(ours.scale.shape)
    np.testing.assert_array_equal(ours.scale.view(np.uint16), theirs.view(np.uint16))


def special_weight(rng, rows: int, cols: int) -> np.ndarray:
    """Rows that stress the arithmetic: all zeros, a zero block, tiny (fp16 subnormal scales),
    large values, and a row whose quotients land on .5 after fp16 rounding."""
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
    w[0] = 0
    w[1, :cols // 2] = 0
    w[2] *= np.float16(1e-4)
    w[3] = (w[3] * np.float16(2000)).astype(np.float16)
    w[4] = np.float16(0.5) * np.arange(cols, dtype=np.float16) / np.float16(cols)
    w[5, 0] = np.float16(127)
    w[5, 1:] = np.float16(2.5)
    return w


@pytest.mark.parametrize(("nbits", "block", "conv"), [
    (8, None, False), (4, 32, False), (4, 28, False), (8, None, True), (4, 32, True)])
def test_equal_to_linear_quantize_weights(nbits, block, conv):
    cols = 224 if block == 28 else 256
    weight = special_weight(np.random.default_rng(nbits + (block or 0)), 24, cols)
    data, scale = ct_quantized(weight, nbits, block, conv=conv)
    assert_same(quantize_symmetric(weight, nbits, block), data, scale)
    # ... and the routine used for the many cases below is what that API runs.
    assert_same(quantize_symmetric(weight, nbits, block), *ct_blockwise(weight, nbits, block))


fp16_values = st.floats(width=16, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weight=arrays(np.float16, st.tuples(st.integers(1, 12), st.sampled_from([32, 64, 96])),
                     elements=fp16_values),
       nbits=st.sampled_from([8, 4]), per_block=st.booleans())
def test_bit_equal_on_arbitrary_fp16_weights(weight, nbits, per_block):
    block = 32 if per_block else None
    with np.errstate(all="ignore"):  # ct's own arithmetic warns on 0/0 and overflow
        data, scale = ct_blockwise(weight, nbits, block)
    assert_same(quantize_symmetric(weight, nbits, block), data, scale)


@settings(max_examples=60, deadline=None)
@given(weight=arrays(np.float32, st.tuples(st.integers(1, 6), st.just(64)),
                     elements=st.floats(-60000, 60000, width=32)))
def test_float32_input_is_quantized_as_its_float16_rounding(weight):
    got = quantize_symmetric(weight, 8)
    want = quantize_symmetric(weight.astype(np.float16), 8)
    np.testing.assert_array_equal(got.data, want.data)
    np.testing.assert_array_equal(got.scale, want.scale)


def test_dequantized_weights_are_within_half_a_step():
    weight = (np.random.default_rng(3).standard_normal((64, 128)) * 0.02).astype(np.float16)
    for nbits, block in ((8, None), (4, 32)):
        q = quantize_symmetric(weight, nbits, block)
        step = np.repeat(q.scale.astype(np.float32), q.block, axis=1)
        # Half a step, plus the float16 rounding of w / scale (|w / scale| <= 127: < 2**-4).
        error = np.abs(q.dequantize() - weight.astype(np.float32))
        assert np.all(error <= (0.5 + 2**-4) * step)
        assert np.abs(q.data).max() <= (127 if nbits == 8 else 7)


def test_refusals():
    with pytest.raises(ValueError, match="float16 range"):
        quantize_symmetric(np.full((2, 32), 70000.0, np.float32), 8)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_symmetric(np.zeros((2, 48), np.float16), 4, 32)
    with pytest.raises(ValueError, match="nbits"):
        quantize_symmetric(np.zeros((2, 32), np.float16), 6)
    with pytest.raises(ValueError, match="2-D"):
        quantize_symmetric(np.zeros(32, np.float16), 8)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, 64, elements=st.floats(2.0**-14, 65000, width=32)
              | st.floats(-65000, -(2.0**-14), width=32)))
def test_fp16_precision_rounding_matches_a_float16_round_trip(x):
    """In float16's normal range, the bit trick is the round trip through float16."""
    want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_round_to_fp16_precision(x.copy()), want)
