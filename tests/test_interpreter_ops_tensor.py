"""Interpreter ops for tensors, gather/scatter, matmul, conv, pooling and attention: small MIL
programs (hypothesis-drawn parameters) saved as .mlpackage, run with ``load_mlpackage(fp32=True)``
and compared with numpy formulas written out here, independently of the implementations."""

from __future__ import annotations

import itertools
import math

import coremltools as ct
import numpy as np
import pytest
from coreml_helpers import save_program
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.interpreter import MILExecutionError, load_mlpackage

# Each example converts and saves a package (~0.2 s): keep the example counts small.
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensor_ops")


def run(workdir, prog, inputs, target=ct.target.iOS18):
    path = save_program(prog, workdir / f"m{next(_counter)}.mlpackage", target=target)
    model = load_mlpackage(path, fp32=True)
    return model, model.predict(inputs)


def only_output(outputs):
    (value,) = outputs.values()
    return value


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- reshape / transpose ----
@FEW
@given(data=st.data())
def test_transpose_then_reshape_with_zero_and_minus_one(workdir, data):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple))
    perm = data.draw(st.permutations(range(len(shape))))
    transposed_shape = tuple(shape[p] for p in perm)
    # Result (1, rest, last): the 0 at the end copies x's last dim (zeros align to the right),
    # a leading 0 beyond x's rank means 1, and -1 takes what is left.
    last = transposed_shape[-1]
    final = [1, math.prod(shape) // last, last]
    spec = [0 if len(shape) == 2 else 1, -1, 0]

    @mb.program(input_specs=[mb.TensorSpec(shape)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.reshape(x=mb.transpose(x=x, perm=list(perm)), shape=spec)

    x = rand(shape)
    _, out = run(workdir, prog, {"x": x})
    # Row-major order of the transposed tensor, element by element.
    expected = np.array([x[tuple(idx[perm.index(i)] for i in range(len(shape)))]
                         for idx in np.ndindex(*transposed_shape)]).reshape(final)
    np.testing.assert_array_equal(only_output(out), expected)


# ---- many small ops, one program each (no graph passes, so every op runs as written) ----
def run_as_written(workdir, prog, inputs):
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    path = workdir / f"m{next(_counter)}.mlpackage"
    model.save(str(path))
    return load_mlpackage(path, fp32=True).predict(inputs)


def test_layout_ops(workdir):
    @mb.program(input_specs=[mb.TensorSpec((2, 3, 4)), mb.TensorSpec((1, 8, 2, 4))],
                opset_version=ct.target.iOS18)
    def prog(x, y):
        expanded = mb.expand_dims(x=x, axes=[0, -1], name="expanded")
        return (
            expanded, mb.squeeze(x=expanded, axes=[0, 2], name="squeezed"),
            mb.squeeze(x=expanded, name="squeezed_all"),
            mb.reverse(x=x, axes=[1, -1], name="reversed"),
            mb.reverse_sequence(x=x, lengths=np.array([2, 3], np.int32), seq_axis=1,
                                batch_axis=0, name="rev_seq"),
            mb.tile(x=x, reps=[1, 2, 1], name="tiled"),
            mb.flatten2d(x=x, axis=-1, name="flat"),
            mb.shape(x=x, name="shape"),
            mb.stack(values=[x, x], axis=2, name="stacked"),
            *mb.split(x=x, split_sizes=[1, 3], axis=-1, name="split"),
            mb.sliding_windows(x=x, axis=-1, size=2, stride=2, name="windows"),
            mb.depth_to_space(x=y, block_size=2, name="d2s"),
            mb.pixel_shuffle(x=y, upscale_factor=2, name="shuffled"),
            mb.space_to_depth(x=y, block_size=2, name="s2d"),
            mb.pixel_unshuffle(x=y, downscale_factor=np.uint32(2), name="unshuffled"),
            mb.crop(x=y, crop_height=[0, 1], crop_width=[1, 1], name="cropped"),
            mb.identity(x=x, name="same"),
            mb.space_to_batch(x=y, block_shape=[2, 2], paddings=[[0, 0], [1, 1]], name="s2b"),
            mb.batch_to_space(x=mb.space_to_batch(x=y, block_shape=[2, 2], paddings=[[0, 0],
                              [1, 1]]), block_shape=[2, 2], crops=[[0, 0], [1, 1]], name="b2s"),
        )

    x, y = rand((2, 3, 4)), rand((1, 8, 2, 4), seed=1)
    out = run_as_written(workdir, prog, {"x": x, "y": y})
    assert out["expanded"].shape == (1, 2, 3, 4, 1)
    np.testing.assert_array_equal(out["squeezed"], x.reshape(2, 3, 4, 1))  # size-2 axis kept
    np.testing.assert_array_equal(out["squeezed_all"], x)
    np.testing.assert_array_equal(out["reversed"], x[:, ::-1, ::-1])
    rev_seq = x.copy()
    rev_seq[0, :2], rev_seq[1, :3] = x[0, 1::-1], x[1, 2::-1]
    np.testing.assert_array_equal(out["rev_seq"], rev_seq)
    np.testing.assert_array_equal(out["tiled"], np.concatenate([x, x], axis=1))
    np.testing.assert_array_equal(out["flat"], x.reshape(6, 4))
    np.testing.assert_array_equal(out["shape"], [2, 3, 4])
    np.testing.assert_array_equal(out["stacked"][:, :, 1], x)
    np.testing.assert_array_equal(out["split_0"], x[..., :1])
    np.testing.assert_array_equal(out["split_1"], x[..., 1:])
    np.testing.assert_array_equal(out["windows"][:, :, 1], x[..., 2:4])
    d2s, shuffled = np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 2, 4, 8), np.float32)
    for c, h, w, i, j in np.ndindex(2, 2, 4, 2, 2):
        d2s[0, c, 2 * h + i, 2 * w + j] = y[0, (2 * i + j) * 2 + c, h, w]  # depth-column-row
        shuffled[0, c, 2 * h + i, 2 * w + j] = y[0, 4 * c + 2 * i + j, h, w]  # column-row-depth
    np.testing.assert_array_equal(out["d2s"], d2s)
    np.testing.assert_array_equal(out["shuffled"], shuffled)
    s2d, unshuffled = np.zeros((1, 32, 1, 2), np.float32), np.zeros((1, 32, 1, 2), np.float32)
    for c, h, w, i, j in np.ndindex(8, 1, 2, 2, 2):
        s2d[0, (2 * i + j) * 8 + c, h, w] = y[0, c, 2 * h + i, 2 * w + j]
        unshuffled[0, 4 * c + 2 * i + j, h, w] = y[0, c, 2 * h + i, 2 * w + j]
    np.testing.assert_array_equal(out["s2d"], s2d)
    np.testing.assert_array_equal(out["unshuffled"], unshuffled)
    np.testing.assert_array_equal(out["cropped"], y[:, :, :1, 1:3])
    np.testing.assert_array_equal(out["same"], x)
    padded = np.zeros((1, 8, 2, 6), np.float32)
    padded[..., 1:5] = y
    s2b = np.zeros((4, 8, 1, 3), np.float32)  # batch index (i * block_w + j) * n + b
    for c, h, w, i, j in np.ndindex(8, 1, 3, 2, 2):
        s2b[2 * i + j, c, h, w] = padded[0, c, 2 * h + i, 2 * w + j]
    np.testing.assert_array_equal(out["s2b"], s2b)
    np.testing.assert_array_equal(out["b2s"], y)


def test_value_ops(workdir):
    @mb.program(input_specs=[mb.TensorSpec((2, 3, 4)), mb.TensorSpec((3,), dtype=types.int32),
                             mb.TensorSpec((1, 8, 2, 4))],
                opset_version=ct.target.iOS18)
    def prog(x, ids, y):
        values, indices = mb.topk(x=x, k=2, axis=-1, name="topk")
        return (
            values, indices,
            mb.argsort(x=x, axis=1, ascending=True, name="argsort"),
            mb.cumsum(x=x, axis=1, exclusive=True, reverse=True, name="cumsum"),
            mb.one_hot(indices=ids, one_hot_vector_size=4, axis=0, on_value=2.0,
                       off_value=-1.0, name="one_hot"),
            mb.band_part(x=x, lower=1, upper=0, name="band"),
            mb.pad(x=x, pad=[1, 2], mode="reflect", name="reflect"),
            mb.pad(x=x, pad=[1, 1, 0, 2], mode="replicate", name="replicate"),
            mb.pad(x=x, pad=[0, 1, 1, 0, 0, 0], constant_val=5.0, name="constant"),
            mb.fill_like(ref_tensor=x, value=3.0, name="filled"),
            mb.range_1d(end=7.0, start=1.0, step=2.0, name="range"),
            mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=mb.mul(x=x, y=-1.0), name="selected"),
            mb.non_zero(x=mb.greater(x=x, y=0.5), name="nonzero"),
            mb.gather_nd(x=x, indices=np.array([[1, 2], [0, 1]], np.int32), name="gathered_nd"),
            mb.gather_along_axis(x=x, indices=np.array([[[2], [0], [1]]] * 2, np.int32), axis=2,
                                 name="along"),
            mb.einsum(values=(y, mb.transpose(x=y, perm=[0, 3, 2, 1])), equation="nchw,nwhu->nchu",
                      name="einsum"),
            mb.linear(x=x, weight=np.arange(20, dtype=np.float32).reshape(5, 4) / 10,
                      bias=np.ones(5, np.float32), name="linear"),
            mb.l2_pool(x=y, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid", name="l2"),
        )

    x, y = rand((2, 3, 4)), rand((1, 8, 2, 4), seed=1)
    ids = np.array([3, 0, 7], np.int32)  # 7 is out of range: an all-off column
    out = run_as_written(workdir, prog, {"x": x, "ids": ids, "y": y})
    for pos in np.ndindex(2, 3):
        ranked = sorted(range(4), key=lambda j, pos=pos: -x[pos][j])
        np.testing.assert_array_equal(out["topk_1"][pos], ranked[:2])
        np.testing.assert_array_equal(out["topk_0"][pos], x[pos][ranked[:2]])
    for a, c in np.ndindex(2, 4):
        np.testing.assert_array_equal(out["argsort"][a, :, c],
                                      sorted(range(3), key=lambda j, a=a, c=c: x[a, j, c]))
    cumsum = np.stack([x[:, i + 1:].sum(axis=1) for i in range(3)], axis=1)
    np.testing.assert_allclose(out["cumsum"], cumsum, atol=1e-6)
    one_hot = np.full((4, 3), -1.0)
    one_hot[3, 0], one_hot[0, 1] = 2.0, 2.0
    np.testing.assert_array_equal(out["one_hot"], one_hot)
    m, n = np.indices((3, 4))
    np.testing.assert_array_equal(out["band"], np.where((m - n >= 0) & (m - n <= 1), x, 0))
    reflect_cols = [1, 0, 1, 2, 3, 2, 1]  # reflect excludes the edge element
    np.testing.assert_array_equal(out["reflect"], x[..., reflect_cols])
    np.testing.assert_array_equal(out["replicate"],
                                  x[:, [0, 0, 1, 2, 2]][..., [0, 1, 2, 3, 3, 3]])
    constant = np.full((3, 4, 4), 5.0, np.float32)
    constant[:2, 1:] = x
    np.testing.assert_array_equal(out["constant"], constant)
    np.testing.assert_array_equal(out["filled"], np.full((2, 3, 4), 3.0))
    np.testing.assert_array_equal(out["range"], [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(out["selected"], np.abs(x))
    np.testing.assert_array_equal(out["nonzero"], np.argwhere(x > 0.5))
    np.testing.assert_array_equal(out["gathered_nd"], np.stack([x[1, 2], x[0, 1]]))
    np.testing.assert_array_equal(out["along"][:, :, 0], x[:, [0, 1, 2], [2, 0, 1]])
    einsum = np.zeros((1, 8, 2, 8))
    for c, h, u, w in np.ndindex(8, 2, 8, 4):
        einsum[0, c, h, u] += y[0, c, h, w] * y[0, u, h, w]
    np.testing.assert_allclose(out["einsum"], einsum, rtol=1e-5, atol=1e-5)
    weight = np.arange(20).reshape(5, 4) / 10
    np.testing.assert_allclose(out["linear"], x @ weight.T + 1, rtol=1e-5, atol=1e-6)
    l2 = np.sqrt((y ** 2).reshape(1, 8, 1, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
                 .reshape(1, 8, 1, 2, 4).sum(-1))
    np.testing.assert_allclose(out["l2"], l2, rtol=1e-5)


# ---- concat ----
@FEW
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
       count=st.integers(2, 3), data=st.data())
def test_concat_interleave(workdir, shape, count, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))

    @mb.program(input_specs=[mb.TensorSpec(shape) for _ in range(3)], opset_version=ct.target.iOS18)
    def prog(a, b, c):
        values = [a, b, c][:count]
        return (mb.concat(values=values, axis=axis, interleave=True, name="mixed"),
                mb.concat(values=values, axis=axis, name="plain"))

    values = [rand(shape, seed=i) for i in range(3)]
    _, out = run(workdir, prog, dict(zip("abc", values, strict=True)))
    values = values[:count]
    a = axis % len(shape)
    mixed = np.zeros(shape[:a] + (shape[a] * count,) + shape[a + 1:], np.float32)
    plain = np.zeros_like(mixed)
    for k, value in enumerate(values):
        for i in range(shape[a]):
            src = np.take(value, i, axis=a)
            index = [slice(None)] * len(shape)
            index[a] = i * count + k
            mixed[tuple(index)] = src
            index[a] = k * shape[a] + i
            plain[tuple(index)] = src
    np.testing.assert_array_equal(out["mixed"], mixed)
    np.testing.assert_array_equal(out["plain"], plain)


# ---- slice_by_index ----
@st.composite
def slicing(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple))
    dims = []
    for dim in shape:
        squeeze = draw(st.booleans()) and len(dims) + 1 < len(shape)
        begin = draw(st.integers(-dim, dim - 1))
        end = draw(st.integers(-dim, dim))
        stride = draw(st.sampled_from([1, 2, -1, -2]))
        begin_mask, end_mask = draw(st.booleans()), draw(st.booleans())
        dims.append((begin, end, stride, begin_mask, end_mask, squeeze))
    return shape, dims


def python_index(shape, dims):
    """The same selection written with Python's own slicing (agrees with MIL in this range)."""
    index = []
    for dim, (begin, end, stride, begin_mask, end_mask, squeeze) in zip(shape, dims, strict=True):
        if squeeze:
            index.append(begin % dim)
        else:
            index.append(slice(None if begin_mask else begin, None if end_mask else end, stride))
    return tuple(index)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=slicing())
def test_slice_by_index_masks_strides_negative(workdir, case):
    shape, dims = case
    x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) + 1
    expected = x[python_index(shape, dims)]
    if expected.size == 0 or expected.ndim == 0:
        return  # Core ML has no empty or rank-0 slices to compare
    begin, end, stride, begin_mask, end_mask, squeeze = (list(c) for c in zip(*dims, strict=True))

    @mb.program(input_specs=[mb.TensorSpec(shape)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.slice_by_index(x=x, begin=begin, end=end, stride=stride, begin_mask=begin_mask,
                                 end_mask=end_mask, squeeze_mask=squeeze)

    _, out = run(workdir, prog, {"x": x})
    np.testing.assert_array_equal(only_output(out), expected)


def test_slice_update_and_slice_by_size(workdir):
    @mb.program(input_specs=[mb.TensorSpec((4, 6)), mb.TensorSpec((2, 3))],
                opset_version=ct.target.iOS18)
    def prog(x, u):
        updated = mb.slice_update(x=x, update=u, begin=[1, 0], end=[4, 6], stride=[2, 2],
                                  name="updated")
        return (updated, mb.slice_by_size(x=x, begin=[-2, 1], size=[2, 3], name="sized"),
                mb.slice_by_size(x=x, begin=[1, 2], size=[-1, -1], name="rest"))

    x, u = rand((4, 6)), rand((2, 3), seed=1)
    _, out = run(workdir, prog, {"x": x, "u": u})
    expected = x.copy()
    for i, j in itertools.product(range(2), range(3)):
        expected[1 + 2 * i, 2 * j] = u[i, j]
    np.testing.assert_array_equal(out["updated"], expected)
    np.testing.assert_array_equal(out["sized"], x[2:4, 1:4])
    np.testing.assert_array_equal(out["rest"], x[1:, 2:])


# ---- gather / scatter ----
@FEW
@given(x_shape=st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple), data=st.data())
def test_gather_negative_indices_and_batch_dims(workdir, x_shape, data):
    batch_dims = data.draw(st.integers(0, 1))
    axis = data.draw(st.integers(batch_dims, len(x_shape) - 1))
    size = x_shape[axis]
    extra = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple))
    idx_shape = x_shape[:batch_dims] + extra
    indices = np.asarray(data.draw(st.lists(st.integers(-size, size - 1), min_size=math.prod(
        idx_shape), max_size=math.prod(idx_shape)))).astype(np.int32).reshape(idx_shape)

    # iOS16 gather: negative indices count from the end.
    @mb.program(input_specs=[mb.TensorSpec(x_shape), mb.TensorSpec(idx_shape, dtype=types.int32)],
                opset_version=ct.target.iOS16)
    def prog(x, indices):
        return mb.gather(x=x, indices=indices, axis=axis, batch_dims=batch_dims)

    x = rand(x_shape)
    _, out = run(workdir, prog, {"x": x, "indices": indices}, target=ct.target.iOS16)
    out_shape = x_shape[:axis] + idx_shape[batch_dims:] + x_shape[axis + 1:]
    expected = np.zeros(out_shape, np.float32)
    n_pre, n_idx = axis, len(idx_shape) - batch_dims
    for pos in np.ndindex(*out_shape):
        pre, ids, post = pos[:n_pre], pos[n_pre:n_pre + n_idx], pos[n_pre + n_idx:]
        i = indices[pre[:batch_dims] + ids]
        expected[pos] = x[pre + (i if i >= 0 else i + size,) + post]
    np.testing.assert_array_equal(only_output(out), expected)


def test_gather_validate_indices_rejects_out_of_range(workdir):
    @mb.program(input_specs=[mb.TensorSpec((3, 4)), mb.TensorSpec((2,), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, indices):
        return mb.gather(x=x, indices=indices, axis=0, validate_indices=True)

    path = save_program(prog, workdir / "gather_validate.mlpackage")
    model = load_mlpackage(path, fp32=True)
    x = rand((3, 4))
    np.testing.assert_array_equal(
        only_output(model.predict({"x": x, "indices": np.array([2, 0], np.int32)})), x[[2, 0]])
    # (coremltools' pipeline makes negative indices non-negative before an iOS17+ gather.)
    with pytest.raises(MILExecutionError, match=r"out of bounds.*validate_indices"):
        model.predict({"x": x, "indices": np.array([3, 0], np.int32)})


def test_scatter_modes(workdir):
    """scatter_nd, scatter_along_axis and scatter (axis 1) in every mode, with repeated indices."""
    modes = {"update": lambda a, b: b, "add": np.add, "sub": np.subtract, "mul": np.multiply,
             "div": np.divide, "max": np.maximum, "min": np.minimum}
    nd_indices = np.array([[1, 0], [0, 2], [1, 0]], np.int32)
    axis_indices = np.array([2, 0, 2], np.int32)

    @mb.program(input_specs=[mb.TensorSpec((2, 3, 2)), mb.TensorSpec((3, 2)),
                             mb.TensorSpec((2, 2, 2)), mb.TensorSpec((2, 2, 2), dtype=types.int32),
                             mb.TensorSpec((2, 3, 2))],
                opset_version=ct.target.iOS18)
    def prog(data, updates, along_updates, along_indices, axis_updates):
        outputs = []
        for mode in modes:
            outputs += [
                mb.scatter_nd(data=data, indices=nd_indices, updates=updates, mode=mode,
                              name=f"nd_{mode}"),
                mb.scatter_along_axis(data=data, indices=along_indices, updates=along_updates,
                                      axis=1, mode=mode, name=f"along_{mode}"),
                mb.scatter(data=data, indices=axis_indices, updates=axis_updates, axis=1,
                           mode=mode, name=f"axis_{mode}"),
            ]
        return tuple(outputs)

    rng = np.random.default_rng(0)
    data = rng.uniform(-2, 2, (2, 3, 2)).astype(np.float32)
    updates, along, axis_updates = (rng.uniform(0.5, 2, s).astype(np.float32)
                                    for s in ((3, 2), (2, 2, 2), (2, 3, 2)))
    along_indices = np.array([[[0, 2], [1, 1]], [[2, 2], [0, 1]]], np.int32)
    _, out = run(workdir, prog, {"data": data, "updates": updates, "along_updates": along,
                                 "along_indices": along_indices, "axis_updates": axis_updates})
    for mode, combine in modes.items():
        nd, along_expected, axis_expected = data.copy(), data.copy(), data.copy()
        for k, (i, j) in enumerate(nd_indices):
            nd[i, j] = combine(nd[i, j], updates[k])
        for pos in np.ndindex(*along.shape):
            target = (pos[0], along_indices[pos], pos[2])
            along_expected[target] = combine(along_expected[target], along[pos])
        for a, k, c in np.ndindex(2, 3, 2):
            target = (a, axis_indices[k], c)
            axis_expected[target] = combine(axis_expected[target], axis_updates[a, k, c])
        np.testing.assert_allclose(out[f"nd_{mode}"], nd, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(out[f"along_{mode}"], along_expected, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(out[f"axis_{mode}"], axis_expected, rtol=1e-6, err_msg=mode)


# ---- non_maximum_suppression (Apple's smoke case; its TF-based stress test cannot run here) ----
@pytest.mark.parametrize("target", [ct.target.iOS16, ct.target.iOS18])
def test_non_maximum_suppression(workdir, target):
    # Batch 0 is Apple's case; in batch 1 box 1 overlaps box 0 (IoU 0.9) and is suppressed.
    boxes = np.array([[[0.0] * 4, [1.0] * 4, [2.0] * 4, [3.0] * 4],
                      [[0, 0, 2, 2], [0.1, 0, 2, 2], [10, 10, 2, 2], [20, 20, 1, 1]]],
                     np.float32)  # (cx, cy, w, h)
    scores = np.array([[[-3.5], [9.4], [2.3], [0.7]], [[0.9], [0.8], [0.5], [-1.0]]], np.float32)
    channels_last = target < ct.target.iOS17  # iOS17 moved the box axis last, dropped the count
    if not channels_last:
        boxes, scores = boxes.transpose(0, 2, 1), scores.transpose(0, 2, 1)

    @mb.program(input_specs=[mb.TensorSpec(boxes.shape), mb.TensorSpec(scores.shape)],
                opset_version=target)
    def prog(boxes, scores):
        extra = {"score_threshold": 0.4} if channels_last else {}
        return mb.non_maximum_suppression(boxes=boxes, scores=scores, iou_threshold=0.2,
                                          max_boxes=2, per_class_suppression=True, **extra)

    model, out = run(workdir, prog, {"boxes": boxes, "scores": scores}, target=target)
    outs = [out[v.name] for v in model.function.outputs]
    kept_boxes = np.array([[[1.0] * 4, [2.0] * 4], [[0, 0, 2, 2], [10, 10, 2, 2]]])
    kept_scores = np.array([[[9.4], [2.3]], [[0.9], [0.5]]])
    if not channels_last:
        kept_boxes, kept_scores = kept_boxes.transpose(0, 2, 1), kept_scores.transpose(0, 2, 1)
    np.testing.assert_allclose(outs[0], kept_boxes)
    np.testing.assert_allclose(outs[1], kept_scores, rtol=1e-6)
    np.testing.assert_array_equal(outs[2], [[1, 2], [0, 2]])
    if channels_last:
        np.testing.assert_array_equal(outs[3], [2, 2])


# ---- matmul ----
@FEW
@given(data=st.data())
def test_matmul_transposes_rank1_and_broadcast(workdir, data):
    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    # coremltools' type inference takes a rank-1 x only with an unbatched y, and no rank-1 y.
    x_rank1 = data.draw(st.booleans())
    tx = data.draw(st.booleans()) and not x_rank1
    ty = data.draw(st.booleans())
    batch_x = data.draw(st.sampled_from([(), (3,), (2, 1), (1, 1)]))
    batch_y = () if x_rank1 else data.draw(st.sampled_from([(), (3,), (1,), (2, 3)]))
    x_shape = (k,) if x_rank1 else batch_x + ((k, m) if tx else (m, k))
    y_shape = batch_y + ((n, k) if ty else (k, n))

    @mb.program(input_specs=[mb.TensorSpec(x_shape), mb.TensorSpec(y_shape)],
                opset_version=ct.target.iOS18)
    def prog(x, y):
        return mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty)

    x, y = rand(x_shape), rand(y_shape, seed=1)
    _, out = run(workdir, prog, {"x": x, "y": y})
    xm = x[None, :] if x_rank1 else (np.swapaxes(x, -1, -2) if tx else x)  # (..., m, k)
    ym = np.swapaxes(y, -1, -2) if ty else y  # (..., k, n)
    batch = np.broadcast_shapes(xm.shape[:-2], ym.shape[:-2])
    xb = np.broadcast_to(xm, batch + xm.shape[-2:])
    yb = np.broadcast_to(ym, batch + ym.shape[-2:])
    expected = np.zeros(batch + (xm.shape[-2], ym.shape[-1]), np.float64)
    for b in np.ndindex(*batch):
        for i, j in np.ndindex(xm.shape[-2], ym.shape[-1]):
            expected[b + (i, j)] = sum(float(xb[b + (i, t)]) * float(yb[b + (t, j)])
                                       for t in range(k))
    if x_rank1:
        expected = expected[..., 0, :]
    np.testing.assert_allclose(only_output(out), expected, rtol=1e-5, atol=1e-5)


# ---- conv ----
def conv_reference(x, w, bias, strides, dilations, pads, groups):
    """Direct definition, group g = o // (C_out / groups), C_g = C_in / groups:
    out[n, o, p] = bias[o] + sum_{c, q} xpad[n, g * C_g + c, p * s + q * d] * w[o, c, q]."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + pads)
    kernel = w.shape[2:]
    out_sizes = [(xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                 for i in range(len(kernel))]
    c_out, c_group = w.shape[:2]
    out = np.zeros((x.shape[0], c_out, *out_sizes))
    for o in range(c_out):
        g = o // (c_out // groups)
        for p in np.ndindex(*out_sizes):
            for c in range(c_group):
                for q in np.ndindex(*kernel):
                    pos = tuple(p[i] * strides[i] + q[i] * dilations[i] for i in range(len(p)))
                    out[(slice(None), o) + p] += xp[(slice(None), g * c_group + c) + pos] * w[
                        (o, c) + q]
        out[:, o] += 0 if bias is None else bias[o]
    return out


def test_conv_1x1_over_sequence(workdir):
    """The layout Core ML transformers use for linear layers: (B, C, 1, S) with a 1x1 kernel."""
    w, bias = rand((6, 5, 1, 1), seed=1), rand((6,), seed=2)

    @mb.program(input_specs=[mb.TensorSpec((2, 5, 1, 7))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.conv(x=x, weight=w, bias=bias, pad_type="valid")

    x = rand((2, 5, 1, 7))
    model, out = run(workdir, prog, {"x": x})
    assert model.op_histogram()["conv"] == 1
    expected = np.einsum("oc,ncs->nos", w[:, :, 0, 0], x[:, :, 0, :])[:, :, None, :]
    np.testing.assert_allclose(only_output(out), expected + bias[None, :, None, None], atol=1e-5)


@FEW
@given(groups=st.sampled_from([1, 2, 4]), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       pad_type=st.sampled_from(["valid", "same", "same_lower", "custom"]), rank=st.integers(1, 2))
def test_conv_3x3_groups_strides_padding(workdir, groups, stride, dilation, pad_type, rank):
    c_in, c_out, size = 4, 8, 7
    x_shape = (1, c_in) + (size,) * rank
    w = rand((c_out, c_in // groups) + (3,) * rank, seed=1)
    bias = rand((c_out,), seed=2)
    custom = [1, 2] * rank

    @mb.program(input_specs=[mb.TensorSpec(x_shape)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.conv(x=x, weight=w, bias=bias, strides=[stride] * rank,
                       dilations=[dilation] * rank, groups=groups, pad_type=pad_type,
                       pad=custom if pad_type == "custom" else [0] * 2 * rank)

    x = rand(x_shape)
    _, out = run(workdir, prog, {"x": x})
    effective = 2 * dilation + 1
    if pad_type == "valid":
        pads = [(0, 0)] * rank
    elif pad_type == "custom":
        pads = [(1, 2)] * rank
    else:  # out = ceil(size / stride); the odd pad element goes after (same) or before
        total = max(0, (math.ceil(size / stride) - 1) * stride + effective - size)
        pads = [(total // 2, total - total // 2) if pad_type == "same"
                else (total - total // 2, total // 2)] * rank
    expected = conv_reference(x, w, bias, [stride] * rank, [dilation] * rank, pads, groups)
    np.testing.assert_allclose(only_output(out), expected, rtol=1e-4, atol=1e-4)


def conv_transpose_reference(x, w, bias, strides, dilations, groups, crop_before, out_sizes):
    """Scatter definition: every x[n, i, p] adds x * w[i, o, q] at output p * s + q * d (minus the
    cropped leading padding) of channel g * C_out_g + o, g = the group of input channel i."""
    c_in, c_out_group = w.shape[:2]
    out = np.zeros((x.shape[0], c_out_group * groups, *out_sizes))
    for i in range(c_in):
        g = i // (c_in // groups)
        for p in np.ndindex(*x.shape[2:]):
            for o in range(c_out_group):
                for q in np.ndindex(*w.shape[2:]):
                    pos = tuple(p[a] * strides[a] + q[a] * dilations[a] - crop_before[a]
                                for a in range(len(p)))
                    if all(0 <= pos[a] < out_sizes[a] for a in range(len(p))):
                        out[(slice(None), g * c_out_group + o) + pos] += x[:, i][
                            (slice(None),) + p] * w[(i, o) + q]
    return out + (0 if bias is None else bias.reshape(1, -1, *([1] * len(out_sizes))))


@pytest.mark.parametrize("config", [
    # (x spatial, kernel, strides, dilations, groups, pad_type, pad, output_shape)
    ((4, 4), (3, 3), (2, 2), (1, 1), 2, "custom", [1, 1, 1, 1], (8, 8)),  # output_padding 1
    ((5,), (3,), (2,), (2,), 1, "valid", [0, 0], None),
    ((3, 4), (4, 3), (2, 1), (1, 1), 1, "same", [0, 0, 0, 0], None),
])
def test_conv_transpose_scatter_definition(workdir, config):
    spatial, kernel, strides, dilations, groups, pad_type, pad, output_shape = config
    c_in, c_out = 4, 6
    w = rand((c_in, c_out // groups) + kernel, seed=1)
    bias = rand((c_out,), seed=2)
    x_shape = (1, c_in) + spatial
    extra = {} if output_shape is None else {"output_shape": [1, c_out, *output_shape]}

    @mb.program(input_specs=[mb.TensorSpec(x_shape)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.conv_transpose(x=x, weight=w, bias=bias, strides=list(strides),
                                 dilations=list(dilations), groups=groups, pad_type=pad_type,
                                 pad=pad, **extra)

    x = rand(x_shape, seed=3)
    _, out = run(workdir, prog, {"x": x})
    full = [(d - 1) * s + (k - 1) * dl + 1
            for d, s, k, dl in zip(spatial, strides, kernel, dilations, strict=True)]
    if pad_type == "custom":
        before = pad[::2]
        sizes = output_shape or [f - a - b for f, a, b in zip(full, pad[::2], pad[1::2],
                                                               strict=True)]
    elif pad_type == "valid":
        before, sizes = [0] * len(spatial), full
    else:  # same: out = in * stride, the crop split like conv's same padding (extra after)
        sizes = [d * s for d, s in zip(spatial, strides, strict=True)]
        before = [(f - n) // 2 for f, n in zip(full, sizes, strict=True)]
    expected = conv_transpose_reference(x, w, bias, strides, dilations, groups, before, sizes)
    np.testing.assert_allclose(only_output(out), expected, rtol=1e-4, atol=1e-4)


# ---- pooling ----
@FEW
@given(kernel=st.integers(2, 3), stride=st.integers(1, 2), pad=st.integers(0, 1),
       ceil_mode=st.booleans(), exclude=st.booleans())
def test_avg_and_max_pool_padding_and_ceil_mode(workdir, kernel, stride, pad, ceil_mode, exclude):
    size = 6

    @mb.program(input_specs=[mb.TensorSpec((1, 2, size, size))], opset_version=ct.target.iOS18)
    def prog(x):
        common = dict(kernel_sizes=[kernel] * 2, strides=[stride] * 2, pad_type="custom",
                      pad=[pad] * 4, ceil_mode=ceil_mode)
        return (mb.avg_pool(x=x, exclude_padding_from_average=exclude, name="avg", **common),
                mb.max_pool(x=x, name="max", **common))

    x = rand((1, 2, size, size))
    _, out = run(workdir, prog, {"x": x})
    span = size + 2 * pad
    n_out = (span - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (n_out - 1) * stride >= size + pad and pad > 0:
        n_out -= 1
    avg, mx = np.zeros((1, 2, n_out, n_out)), np.zeros((1, 2, n_out, n_out))
    for i, j in np.ndindex(n_out, n_out):
        rows = [r for r in range(i * stride - pad, i * stride - pad + kernel) if r < size + pad]
        cols = [c for c in range(j * stride - pad, j * stride - pad + kernel) if c < size + pad]
        real = [(r, c) for r in rows for c in cols if 0 <= r < size and 0 <= c < size]
        total = sum(x[:, :, r, c] for r, c in real)
        avg[:, :, i, j] = total / (len(real) if exclude else len(rows) * len(cols))
        mx[:, :, i, j] = np.max([x[:, :, r, c] for r, c in real], axis=0)
    np.testing.assert_allclose(out["avg"], avg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["max"], mx)


# ---- scaled_dot_product_attention (cases of Apple's iOS18/test_transformers.py) ----
def attention_reference(q, k, v, mask=None):
    scores = np.einsum("...le,...se->...ls", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (np.where(mask, 0.0, -np.inf) if mask.dtype == bool else mask)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("...ls,...sv->...lv", weights, v)


@pytest.mark.parametrize("batches, mask_dtype", [
    ([3], None), ([3, 2], bool), ([3, 2, 4], np.float32), ([3], np.float16), ([3, 2], np.float32),
])
def test_sdpa_matches_softmax_formula(workdir, batches, mask_dtype):
    seq_q, seq_k, embed, embed_v = 7, 5, 16, 32
    rng = np.random.default_rng(0)
    q = rng.random(batches + [seq_q, embed], dtype=np.float32)
    k = rng.random(batches + [seq_k, embed], dtype=np.float32)
    v = rng.random(batches + [seq_k, embed_v], dtype=np.float32)
    specs = [mb.TensorSpec(a.shape) for a in (q, k, v)]
    inputs = {"query": q, "key": k, "value": v}
    mask = None
    if mask_dtype is None:

        @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
        def prog(query, key, value):
            return mb.scaled_dot_product_attention(query=query, key=key, value=value)

    else:
        # Apple's case: bool True attends (the last positions), float -inf masks out (the rest).
        mask = np.zeros((1, 1, seq_k), dtype=mask_dtype)
        mask[:, :, seq_k // 2:] = True if mask_dtype is bool else -np.inf
        dtype = {bool: types.bool, np.float16: types.fp16, np.float32: types.fp32}[mask_dtype]
        inputs["mask"] = mask

        @mb.program(input_specs=specs + [mb.TensorSpec(mask.shape, dtype=dtype)],
                    opset_version=ct.target.iOS18)
        def prog(query, key, value, mask):
            return mb.scaled_dot_product_attention(query=query, key=key, value=value,
                                                   attn_mask=mask)

    model, out = run(workdir, prog, inputs)
    assert model.op_histogram()["scaled_dot_product_attention"] == 1
    mask_value = None if mask is None else mask.astype(bool if mask_dtype is bool else np.float32)
    np.testing.assert_allclose(only_output(out), attention_reference(q, k, v, mask_value),
                               rtol=1e-5, atol=1e-6)


def test_sdpa_dynamic_lengths_and_causal_bool_mask(workdir):
    """Apple's dynamic case: symbolic batch and sequence lengths, a (L, S) mask broadcast."""
    batch, seq, embed = get_new_symbol(), get_new_symbol(), 4

    @mb.program(input_specs=[mb.TensorSpec((batch, 2, seq, embed)),
                             mb.TensorSpec((batch, 2, seq, embed)),
                             mb.TensorSpec((batch, 2, seq, 8)),
                             mb.TensorSpec((seq, seq), dtype=types.bool)],
                opset_version=ct.target.iOS18)
    def prog(query, key, value, mask):
        return mb.scaled_dot_product_attention(query=query, key=key, value=value, attn_mask=mask)

    def flexible(name, last):
        dims = (ct.RangeDim(1, 4), 2, ct.RangeDim(1, 16), last)
        return ct.TensorType(name=name, shape=ct.Shape(dims))

    inputs = [flexible("query", embed), flexible("key", embed), flexible("value", 8),
              ct.TensorType(name="mask", shape=ct.Shape((ct.RangeDim(1, 16),) * 2))]
    path = save_program(prog, workdir / "sdpa_dynamic.mlpackage", inputs=inputs)
    model = load_mlpackage(path, fp32=True)
    rng = np.random.default_rng(1)
    for b, n in ((1, 3), (2, 6)):
        q, k = rng.random((b, 2, n, embed), np.float32), rng.random((b, 2, n, embed), np.float32)
        v = rng.random((b, 2, n, 8), np.float32)
        causal = np.tril(np.ones((n, n), bool))
        out = model.predict({"query": q, "key": k, "value": v, "mask": causal})
        np.testing.assert_allclose(only_output(out), attention_reference(q, k, v, causal),
                                   rtol=1e-5, atol=1e-6)
