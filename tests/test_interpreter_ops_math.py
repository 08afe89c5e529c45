"""Interpreter math ops (elementwise, activation, reduction, normalization) against formulas
written here in numpy (float64), on small programs saved as .mlpackage and loaded back.

Conversions are the slow part (~0.2 s each), so most programs are built once per module and
hypothesis varies the input values; the reduction test also varies shapes and axes.
"""

from __future__ import annotations

import math

import coremltools as ct
import numpy as np
import pytest
from coreml_helpers import save_program
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from converters.interpreter import load_mlpackage

OPSET = ct.target.iOS18
FEW = settings(max_examples=12, deadline=None)


def _load(prog, tmp_path_factory, name: str, fp32: bool = True, **save_kwargs):
    path = save_program(prog, tmp_path_factory.mktemp(name) / f"{name}.mlpackage", fp32=fp32,
                        **save_kwargs)
    return load_mlpackage(path, fp32=fp32)


def _floats(shape, low, high):
    return hnp.arrays(np.float32, shape, elements=st.floats(low, high, width=32))


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    """Compare with the float64 formula's value as a float32 output holds it (overflow: inf)."""
    with np.errstate(over="ignore"):
        expected = np.asarray(expected, np.float64).astype(np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ---- binary ops ----

BINARY_FLOAT_OPS = ("add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum",
                    "minimum", "equal", "not_equal", "less", "less_equal", "greater",
                    "greater_equal")
BROADCAST_SHAPES = [((2, 3), (3,)), ((4, 1, 3), (1, 5, 1)), ((1,), (2, 2))]


@pytest.fixture(scope="module", params=BROADCAST_SHAPES, ids=str)
def binary_model(request, tmp_path_factory):
    x_shape, y_shape = request.param

    @mb.program(input_specs=[mb.TensorSpec(x_shape), mb.TensorSpec(y_shape)], opset_version=OPSET)
    def prog(x, y):
        return tuple(getattr(mb, name)(x=x, y=y, name=name) for name in BINARY_FLOAT_OPS)

    return _load(prog, tmp_path_factory, "binary"), x_shape, y_shape


def _expected_binary(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(all="ignore"):
        return {
            "add": x + y, "sub": x - y, "mul": x * y, "real_div": x / y,
            # Division results are float32 on the device: floor the float32 quotient.
            "floor_div": np.floor((x / y).astype(np.float32)),
            "mod": x - np.trunc(x / y) * y,  # C remainder: sign of the dividend
            "pow": x**y, "maximum": np.where(x > y, x, y), "minimum": np.where(x < y, x, y),
            "equal": x == y, "not_equal": x != y, "less": x < y, "less_equal": x <= y,
            "greater": x > y, "greater_equal": x >= y,
        }


@FEW
@given(data=st.data())
def test_binary_float_ops_broadcast(binary_model, data):
    model, x_shape, y_shape = binary_model
    x = data.draw(_floats(x_shape, -4, 4))
    # Divisors away from zero: the quotient's float32 rounding is then well conditioned.
    y = data.draw(_floats(y_shape, 0.25, 4)) * data.draw(st.sampled_from([-1, 1]))
    y = y.astype(np.float32)
    out = model.predict({"x": x, "y": y})
    for name, expected in _expected_binary(x, y).items():
        actual = out[name]
        assert actual.shape == expected.shape, name
        if expected.dtype == bool:
            np.testing.assert_array_equal(actual.astype(bool), expected, err_msg=name)
        else:
            _close(actual, expected, rtol=2e-6, atol=3e-6)


@pytest.fixture(scope="module")
def int_binary_model(tmp_path_factory):
    names = ("add", "sub", "mul", "floor_div", "mod", "real_div", "maximum", "minimum")
    spec = [mb.TensorSpec((3, 4), dtype=types.int32), mb.TensorSpec((4,), dtype=types.int32)]

    @mb.program(input_specs=spec, opset_version=OPSET)
    def prog(x, y):
        return tuple(getattr(mb, name)(x=x, y=y, name=name) for name in names)

    return _load(prog, tmp_path_factory, "int_binary")


@FEW
@given(
    x=hnp.arrays(np.int32, (3, 4), elements=st.integers(-50, 50)),
    y=hnp.arrays(np.int32, (4,), elements=st.integers(1, 9)),
    y_sign=st.sampled_from([-1, 1]),
)
def test_int32_binary_ops_stay_integer(int_binary_model, x, y, y_sign):
    y = (y * y_sign).astype(np.int32)
    out = int_binary_model.predict({"x": x, "y": y})
    xs, ys = x.astype(object), np.broadcast_to(y, x.shape).astype(object)
    trunc_div = np.vectorize(lambda a, b: int(a / b))(xs, ys)
    expected = {
        "add": xs + ys, "sub": xs - ys, "mul": xs * ys,
        "floor_div": np.vectorize(lambda a, b: math.floor(a / b))(xs, ys),
        "mod": xs - trunc_div * ys, "real_div": trunc_div,
        "maximum": np.maximum(xs, ys), "minimum": np.minimum(xs, ys),
    }
    for name, want in expected.items():
        assert out[name].dtype == np.int32, name
        np.testing.assert_array_equal(out[name], want.astype(np.int64), err_msg=name)


# ---- unary ops and cast ----

@pytest.fixture(scope="module")
def unary_model(tmp_path_factory):
    shape = (2, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape) for _ in range(3)], opset_version=OPSET)
    def prog(x, unit, positive):
        outs = [getattr(mb, name)(x=x, name=name) for name in (
            "abs", "atan", "ceil", "cos", "cosh", "erf", "exp", "exp2", "floor", "round", "sign",
            "sin", "sinh", "square", "tan", "tanh")]
        outs += [getattr(mb, name)(x=unit, name=name) for name in ("acos", "asin", "atanh")]
        outs += [getattr(mb, name)(x=positive, name=name) for name in ("log", "sqrt", "rsqrt")]
        outs += [
            mb.inverse(x=positive, epsilon=0.5, name="inverse"),
            mb.clip(x=x, alpha=-1.5, beta=2.0, name="clip"),
            mb.threshold(x=x, alpha=0.25, name="threshold"),
            mb.logical_not(x=mb.less(x=x, y=0.0), name="logical_not"),
        ]
        x_negative, unit_negative = mb.less(x=x, y=0.0), mb.less(x=unit, y=0.0)
        outs += [getattr(mb, name)(x=x_negative, y=unit_negative, name=name)
                 for name in ("logical_and", "logical_or", "logical_xor")]
        return tuple(outs)

    return _load(prog, tmp_path_factory, "unary"), shape


def _round_half_even(x):
    floor = np.floor(x)
    frac = x - floor
    tie_up = (frac == 0.5) & (np.mod(floor, 2) == 1)
    return np.where((frac > 0.5) | tie_up, floor + 1, floor)


@FEW
@given(data=st.data())
def test_unary_ops(unary_model, data):
    model, shape = unary_model
    x = data.draw(_floats(shape, -6, 6))
    unit = data.draw(_floats(shape, -0.9375, 0.9375))
    positive = data.draw(_floats(shape, 0.0625, 50))
    out = model.predict({"x": x, "unit": unit, "positive": positive})
    x64, u64, p64 = (v.astype(np.float64) for v in (x, unit, positive))
    expected = {
        "abs": np.abs(x64), "atan": np.arctan(x64), "ceil": np.ceil(x64), "cos": np.cos(x64),
        "cosh": np.cosh(x64), "erf": np.vectorize(math.erf)(x64), "exp": np.exp(x64),
        "exp2": 2.0**x64, "floor": np.floor(x64), "round": _round_half_even(x64),
        "sign": np.sign(x64), "sin": np.sin(x64), "sinh": np.sinh(x64), "square": x64 * x64,
        "tan": np.tan(x64), "tanh": np.tanh(x64),
        "acos": np.arccos(u64), "asin": np.arcsin(u64), "atanh": np.arctanh(u64),
        "log": np.log(p64), "sqrt": np.sqrt(p64), "rsqrt": 1 / np.sqrt(p64),
        "inverse": 1 / (p64 + 0.5), "clip": np.minimum(np.maximum(x64, -1.5), 2.0),
        "threshold": np.maximum(x64, 0.25), "logical_not": x64 >= 0,
        "logical_and": (x64 < 0) & (u64 < 0), "logical_or": (x64 < 0) | (u64 < 0),
        "logical_xor": (x64 < 0) != (u64 < 0),
    }
    for name, want in expected.items():
        # tan near its poles amplifies the float32 rounding of the result itself.
        _close(out[name], want, rtol=2e-5 if name == "tan" else 4e-6, atol=1e-6)


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory):
    narrow = ("int8", "uint8", "int16", "uint16", "int32", "fp16", "bool")

    specs = [mb.TensorSpec((8,)), mb.TensorSpec((8,), dtype=types.int32), mb.TensorSpec((7,)),
             mb.TensorSpec((2, 5))]

    @mb.program(input_specs=specs, opset_version=OPSET)
    def prog(x, i, ties, tied):
        outs = [mb.round(x=ties, name="round"), mb.log(x=mb.abs(x=ties), name="log"),
                mb.reduce_argmax(x=tied, axis=1, name="argmax"),
                mb.reduce_argmin(x=tied, axis=0, keep_dims=True, output_dtype="uint16",
                                 name="argmin")]
        outs += [mb.cast(x=mb.cast(x=x, dtype=d), dtype="fp32", name=f"f_{d}") for d in narrow]
        outs += [mb.cast(x=i, dtype=d, name=f"i_{d}") for d in ("fp16", "fp32")]
        outs.append(mb.cast(x=mb.cast(x=i, dtype="bool"), dtype="int32", name="i_bool"))
        outs.append(mb.cast(x=mb.cast(x=i, dtype="int8"), dtype="int32", name="i_int8"))
        return tuple(outs)

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::const_elimination", "common::cast_optimization"})
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=OPSET,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=pipeline)
    path = tmp_path_factory.mktemp("edge") / "edge.mlpackage"
    model.save(str(path))
    return load_mlpackage(path, fp32=True)


def test_cast_round_log_and_argmax_on_edge_values(edge_model):
    # 20 casts built, none folded away, plus the uint16 argmin output widened to int32.
    assert edge_model.op_histogram()["cast"] == 21
    x = np.array([-3.6, 6.7, 4.5, -0.4, 300.5, -70000.0, np.nan, 65519.0], np.float32)
    i = np.array([0, 1, -1, 127, 128, -129, 70000, 2049], np.int32)
    ties = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.0, 3.49], np.float32)
    tied = np.array([[1, 7, 3, 7, 7], [2, 2, 2, 2, 2]], np.float32)
    out = edge_model.predict({"x": x, "i": i, "ties": ties, "tied": tied})
    np.testing.assert_array_equal(out["round"], [0, 2, 2, 0, -2, 0, 3])  # ties to even
    np.testing.assert_array_equal(out["argmax"], [1, 0])  # ties: the first index
    np.testing.assert_array_equal(out["argmin"], [[0, 1, 1, 1, 1]])
    # log's default epsilon (1e-45, a float32 subnormal) keeps log(0) finite.
    assert out["log"][5] == pytest.approx(math.log(1.401298464324817e-45), rel=1e-6)
    expected = {
        "int8": [-3, 6, 4, 0, 127, -128, 0, 127], "uint8": [0, 6, 4, 0, 255, 0, 0, 255],
        "int16": [-3, 6, 4, 0, 300, -32768, 0, 32767], "uint16": [0, 6, 4, 0, 300, 0, 0, 65519],
        "int32": [-3, 6, 4, 0, 300, -70000, 0, 65519],
        "bool": [1, 1, 1, 1, 1, 1, 1, 1],  # nan != 0
    }
    for dtype, want in expected.items():
        np.testing.assert_array_equal(out[f"f_{dtype}"], want, err_msg=dtype)
    # The fp32 reference keeps fp16 values in float32, explicit casts to fp16 included.
    np.testing.assert_array_equal(out["f_fp16"], x)
    np.testing.assert_array_equal(out["i_fp16"], i.astype(np.float32))
    np.testing.assert_array_equal(out["i_fp32"], i.astype(np.float32))
    np.testing.assert_array_equal(out["i_bool"], [0, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["i_int8"], [0, 1, -1, 127, -128, 127, 112, 1])


# ---- activations ----

@pytest.fixture(scope="module")
def activation_model(tmp_path_factory):
    alpha = np.array([0.1, 0.5, 2.0], np.float32)
    beta = np.array([1.0, 0.5, 3.0], np.float32)

    @mb.program(input_specs=[mb.TensorSpec((2, 3, 2, 2))], opset_version=OPSET)
    def prog(x):
        return (
            mb.relu(x=x, name="relu"), mb.relu6(x=x, name="relu6"),
            mb.leaky_relu(x=x, alpha=0.2, name="leaky_relu"), mb.elu(x=x, alpha=1.5, name="elu"),
            mb.prelu(x=x, alpha=alpha, name="prelu"),
            mb.gelu(x=x, name="gelu_exact"),
            mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_tanh"),
            mb.gelu(x=x, mode="SIGMOID_APPROXIMATION", name="gelu_sigmoid"),
            mb.silu(x=x, name="silu"), mb.sigmoid(x=x, name="sigmoid"),
            mb.sigmoid_hard(x=x, alpha=0.2, beta=0.5, name="sigmoid_hard"),
            mb.scaled_tanh(x=x, alpha=1.7, beta=0.6, name="scaled_tanh"),
            mb.softplus(x=x, name="softplus"),
            mb.softplus_parametric(x=x, alpha=alpha, beta=beta, name="softplus_parametric"),
            mb.softmax(x=x, axis=1, name="softmax"), mb.softsign(x=x, name="softsign"),
            mb.linear_activation(x=x, alpha=-2.0, beta=0.5, name="linear_activation"),
            mb.clamped_relu(x=x, alpha=0.3, beta=2.5, name="clamped_relu"),
            mb.thresholded_relu(x=x, alpha=0.75, name="thresholded_relu"),
        )

    return _load(prog, tmp_path_factory, "activation"), alpha, beta


@FEW
@given(x=_floats((2, 3, 2, 2), -30, 30))
def test_activations(activation_model, x):
    model, alpha, beta = activation_model
    out = model.predict({"x": x})
    v = x.astype(np.float64)
    a = alpha.astype(np.float64).reshape(1, 3, 1, 1)
    b = beta.astype(np.float64).reshape(1, 3, 1, 1)
    sigmoid = 1 / (1 + np.exp(-v))
    erf = np.vectorize(math.erf)
    exp = np.exp(v - v.max(axis=1, keepdims=True))
    expected = {
        "relu": np.maximum(v, 0), "relu6": np.minimum(np.maximum(v, 0), 6),
        "leaky_relu": np.where(v >= 0, v, 0.2 * v), "elu": np.where(v > 0, v, 1.5 * np.expm1(v)),
        "prelu": np.where(v > 0, v, a * v),
        "gelu_exact": 0.5 * v * (1 + erf(v / math.sqrt(2))),
        "gelu_tanh": 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
        "gelu_sigmoid": v / (1 + np.exp(-1.702 * v)),
        "silu": v * sigmoid, "sigmoid": sigmoid,
        "sigmoid_hard": np.clip(0.2 * v + 0.5, 0, 1), "scaled_tanh": 1.7 * np.tanh(0.6 * v),
        "softplus": np.log1p(np.exp(v)), "softplus_parametric": a * np.log1p(np.exp(b * v)),
        "softmax": exp / exp.sum(axis=1, keepdims=True), "softsign": v / (1 + np.abs(v)),
        "linear_activation": -2 * v + 0.5,
        "clamped_relu": np.where(v >= 0, np.minimum(v, 2.5), np.minimum(0.3 * v, 2.5)),
        "thresholded_relu": np.where(v >= 0.75, v, 0),
    }
    for name, want in expected.items():
        _close(out[name], want, rtol=1e-5, atol=1e-6)


# ---- reductions ----

REDUCERS = {
    "reduce_sum": lambda v, ax, kd: v.sum(axis=ax, keepdims=kd),
    "reduce_prod": lambda v, ax, kd: v.prod(axis=ax, keepdims=kd),
    "reduce_max": lambda v, ax, kd: v.max(axis=ax, keepdims=kd),
    "reduce_min": lambda v, ax, kd: v.min(axis=ax, keepdims=kd),
    "reduce_mean": lambda v, ax, kd: v.mean(axis=ax, keepdims=kd),
    "reduce_l1_norm": lambda v, ax, kd: np.abs(v).sum(axis=ax, keepdims=kd),
    "reduce_l2_norm": lambda v, ax, kd: np.sqrt((v * v).sum(axis=ax, keepdims=kd)),
    "reduce_sum_square": lambda v, ax, kd: (v * v).sum(axis=ax, keepdims=kd),
    "reduce_log_sum": lambda v, ax, kd: np.log(np.abs(v).sum(axis=ax, keepdims=kd)),
    "reduce_log_sum_exp": lambda v, ax, kd: np.log(np.exp(v).sum(axis=ax, keepdims=kd)),
}


@settings(max_examples=5, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=3),
    data=st.data(),
)
def test_reductions(tmp_path_factory, shape, data):
    rank = len(shape)
    axes = data.draw(st.none() | st.lists(st.integers(-rank, rank - 1), min_size=1,
                                          max_size=rank, unique_by=lambda a: a % rank))
    keep_dims = data.draw(st.booleans())
    arg_axis = data.draw(st.integers(-rank, rank - 1))

    @mb.program(input_specs=[mb.TensorSpec(shape)], opset_version=OPSET)
    def prog(x):
        outs = []
        for name in REDUCERS:
            # reduce_log_sum gets |x| (log of a negative sum is nan on both sides, not a test).
            source = mb.abs(x=x) if name == "reduce_log_sum" else x
            outs.append(getattr(mb, name)(x=source, axes=axes, keep_dims=keep_dims, name=name))
        outs.append(mb.reduce_argmax(x=x, axis=arg_axis, keep_dims=keep_dims, name="argmax"))
        outs.append(mb.reduce_argmin(x=x, axis=arg_axis, keep_dims=keep_dims, name="argmin"))
        return tuple(outs)

    model = _load(prog, tmp_path_factory, "reduce")
    x = data.draw(_floats(shape, -2, 2))
    out = model.predict({"x": x})
    v = x.astype(np.float64)
    axis_tuple = None if axes is None else tuple(a % rank for a in axes)
    for name, formula in REDUCERS.items():
        with np.errstate(divide="ignore"):  # log of an all-zero slice is -inf on both sides
            want = formula(v, axis_tuple, keep_dims)
        if want.ndim == 0:
            want = want.reshape(())
        assert np.shape(out[name]) == want.shape, name
        _close(out[name], want, rtol=2e-5, atol=2e-6)
    for name, pick in (("argmax", np.argmax), ("argmin", np.argmin)):
        want = pick(v, axis=arg_axis, keepdims=keep_dims)
        np.testing.assert_array_equal(out[name], want, err_msg=name)
        assert out[name].dtype == np.int32


# ---- normalization ----

@pytest.fixture(scope="module")
def norm_model(tmp_path_factory):
    rng = np.random.default_rng(3)
    params = {name: rng.uniform(0.5, 1.5, size).astype(np.float32)
              for name, size in (("ln_gamma", (3, 4)), ("ln_beta", (3, 4)), ("mean", 3),
                                 ("var", 3), ("gamma", 3), ("beta", 3))}
    p = params

    @mb.program(input_specs=[mb.TensorSpec((2, 3, 3, 4))], opset_version=OPSET)
    def prog(x):
        return (
            mb.layer_norm(x=x, axes=[-1, 2], gamma=p["ln_gamma"], beta=p["ln_beta"],
                          epsilon=1e-3, name="layer_norm"),
            mb.layer_norm(x=x, axes=[0, 1, 2, 3], name="layer_norm_all"),
            mb.batch_norm(x=x, mean=p["mean"], variance=p["var"], gamma=p["gamma"],
                          beta=p["beta"], epsilon=1e-4, name="batch_norm"),
            mb.instance_norm(x=x, gamma=p["gamma"], beta=p["beta"], name="instance_norm"),
            mb.l2_norm(x=x, epsilon=1e-6, name="l2_norm"),
            mb.local_response_norm(x=x, size=3, alpha=0.05, beta=0.75, k=1.5, name="lrn3"),
            mb.local_response_norm(x=x, size=2, name="lrn2"),
        )

    return _load(prog, tmp_path_factory, "norm"), params


def _standardize(v, axes, epsilon):
    mean = v.mean(axis=axes, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
    return (v - mean) / np.sqrt(var + epsilon)


def _lrn(v, size, alpha, beta, k):
    """Across channels (axis 1 of NCHW), window c - size//2 .. c + (size-1)//2."""
    out = np.empty_like(v)
    channels = v.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + (size - 1) // 2 + 1)
        square_sum = (v[:, lo:hi] ** 2).sum(axis=1)
        out[:, c] = v[:, c] / (k + alpha / size * square_sum) ** beta
    return out


@FEW
@given(x=_floats((2, 3, 3, 4), -3, 3))
def test_normalization(norm_model, x):
    model, p = norm_model
    out = model.predict({"x": x})
    v = x.astype(np.float64)
    ch = {k: p[k].astype(np.float64).reshape(1, 3, 1, 1) for k in ("mean", "var", "gamma", "beta")}
    expected = {
        "layer_norm": _standardize(v, (2, 3), 1e-3) * p["ln_gamma"] + p["ln_beta"],
        "layer_norm_all": _standardize(v, (0, 1, 2, 3), 1e-5),
        "batch_norm": (v - ch["mean"]) / np.sqrt(ch["var"] + 1e-4) * ch["gamma"] + ch["beta"],
        "instance_norm": _standardize(v, (2, 3), 1e-5) * ch["gamma"] + ch["beta"],
        "l2_norm": v / np.sqrt((v**2).sum(axis=(1, 2, 3), keepdims=True) + 1e-6),
        "lrn3": _lrn(v, 3, 0.05, 0.75, 1.5),
        "lrn2": _lrn(v, 2, 1e-4, 0.75, 1.0),
    }
    for name, want in expected.items():
        # Standardizing near-constant slices divides float32 rounding by a small deviation.
        _close(out[name], want, rtol=1e-4, atol=2e-4)


# ---- fp16 programs: every op's output is rounded to fp16 ----

@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    spec = [mb.TensorSpec((4, 6), dtype=types.fp16), mb.TensorSpec((6,), dtype=types.fp16)]

    @mb.program(input_specs=spec, opset_version=OPSET)
    def prog(x, y):
        quotient = mb.real_div(x=x, y=y)
        total = mb.add(x=quotient, y=x)
        product = mb.mul(x=total, y=y, name="product")
        probs = mb.softmax(x=product, axis=-1, name="probs")
        return product, probs, mb.reduce_sum(x=mb.exp(x=probs), axes=[1], name="exp_sum")

    return _load(prog, tmp_path_factory, "fp16", fp32=False)


def _fp16(values):
    return np.asarray(values, np.float32).astype(np.float16).astype(np.float32)


@FEW
@given(x=hnp.arrays(np.float16, (4, 6), elements=st.floats(-4, 4, width=16)),
       y=hnp.arrays(np.float16, (6,), elements=st.floats(0.5, 3, width=16)))
def test_fp16_program_rounds_after_every_op(fp16_model, x, y):
    out = fp16_model.predict({"x": x, "y": y})
    assert all(v.dtype == np.float16 for v in out.values())
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    # add/mul/div of fp16 values are correctly rounded through float32: the chain is exact.
    product = _fp16(_fp16(_fp16(x32 / y32) + x32) * y32)
    np.testing.assert_array_equal(out["product"].astype(np.float32), product)
    shifted = np.exp(product.astype(np.float64) - product.max(axis=-1, keepdims=True))
    probs = _fp16(shifted / shifted.sum(axis=-1, keepdims=True))
    # Transcendental ops may land one fp16 step away from the float64 formula.
    np.testing.assert_allclose(out["probs"].astype(np.float32), probs, rtol=2**-10, atol=2**-24)
    exp_sum = _fp16(np.exp(out["probs"].astype(np.float64)).astype(np.float32)).sum(axis=1)
    np.testing.assert_allclose(out["exp_sum"].astype(np.float32), exp_sum, rtol=2**-10)
