"""The MIL interpreter's runtime: inputs, enumerated shapes, state, multifunction packages,
malformed packages and the inspect-coreml command."""

import coremltools as ct
import numpy as np
import pytest
from coreml_helpers import save_program
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types

from converters.interpreter import OPS, MILExecutionError, MILLoadError, load_mlpackage
from mlx_distill import cli


@pytest.fixture(scope="module")
def accumulate_pkg(tmp_path_factory):
    """acc += x on every call; returns the new accumulator and x·W (fp16 program)."""
    weight = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16)

    @mb.program(
        input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16),
                     mb.StateTensorSpec((1, 4), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, acc):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=total)
        return mb.identity(x=total, name="total"), mb.linear(x=x, weight=weight, name="proj")

    path = save_program(prog, tmp_path_factory.mktemp("acc") / "acc.mlpackage", fp32=False)
    return path, weight


def test_state_accumulates_across_predict_calls(accumulate_pkg):
    path, weight = accumulate_pkg
    model = load_mlpackage(path)
    assert model.is_stateful()
    state = model.make_state()
    xs = np.random.default_rng(1).standard_normal((5, 1, 4)).astype(np.float16)
    expected = np.zeros((1, 4), np.float16)
    for x in xs:
        out = model.predict({"x": x}, state=state)
        expected = (expected.astype(np.float32) + x.astype(np.float32)).astype(np.float16)
        np.testing.assert_array_equal(out["total"], expected)
        proj = (x.astype(np.float32) @ weight.astype(np.float32).T).astype(np.float16)
        np.testing.assert_allclose(out["proj"].astype(np.float32), proj, atol=2e-3)
    fresh = model.make_state()  # a new state starts from zeros again
    np.testing.assert_array_equal(model.predict({"x": xs[0]}, state=fresh)["total"], xs[0])
    with pytest.raises(ValueError, match="is stateful: pass state="):
        model.predict({"x": xs[0]})


def test_input_validation_messages(accumulate_pkg):
    model = load_mlpackage(accumulate_pkg[0])
    state = model.make_state()
    with pytest.raises(ValueError, match="missing input 'x'"):
        model.predict({}, state=state)
    with pytest.raises(ValueError, match="unknown input 'y'"):
        model.predict({"x": np.zeros((1, 4)), "y": np.zeros(1)}, state=state)
    with pytest.raises(ValueError, match=r"shape \(2, 4\); allowed: \(1, 4\)"):
        model.predict({"x": np.zeros((2, 4))}, state=state)


@pytest.fixture(scope="module")
def enumerated_pkg(tmp_path_factory):
    seq = get_new_symbol()

    @mb.program(input_specs=[mb.TensorSpec((1, seq), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(ids):
        return mb.mul(x=ids, y=np.int32(3), name="tripled")

    shapes = ct.EnumeratedShapes(shapes=[(1, 4), (1, 8), (1, 16)], default=(1, 4))
    return save_program(prog, tmp_path_factory.mktemp("enum") / "enum.mlpackage",
                        inputs=[ct.TensorType(name="ids", shape=shapes, dtype=np.int32)])


def test_enumerated_shapes_are_enforced(enumerated_pkg):
    model = load_mlpackage(enumerated_pkg)
    assert model.description.inputs[0].enumerated == ((1, 4), (1, 8), (1, 16))
    for n in (4, 8, 16):
        ids = np.arange(n, dtype=np.int32)[None]
        np.testing.assert_array_equal(model.predict({"ids": ids})["tripled"], ids * 3)
    with pytest.raises(ValueError, match=r"allowed: \(1, 4\), \(1, 8\), \(1, 16\)"):
        model.predict({"ids": np.zeros((1, 5), np.int32)})
    with pytest.raises(ValueError, match="must be an integer array"):
        model.predict({"ids": np.zeros((1, 4), np.float32)})


def test_unsupported_op_is_named(enumerated_pkg, monkeypatch):
    monkeypatch.delitem(OPS, "mul")
    model = load_mlpackage(enumerated_pkg)
    with pytest.raises(MILExecutionError, match=r"function 'main', op .*\(mul\): op type is not"):
        model.predict({"ids": np.zeros((1, 4), np.int32)})


def test_multifunction_package_shares_weights(accumulate_pkg, tmp_path, capsys):
    path, _ = accumulate_pkg
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(path), src_function_name="main", target_function_name="prefill")
    desc.add_function(str(path), src_function_name="main", target_function_name="decode")
    desc.default_function_name = "decode"
    multi = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(multi))
    model = load_mlpackage(multi)
    assert model.function_name == "decode" and model.function_names == ["decode", "prefill"]
    prefill = load_mlpackage(multi, function_name="prefill")
    x = np.ones((1, 4), np.float16)
    a = model.predict({"x": x}, state=model.make_state())
    b = prefill.predict({"x": x}, state=prefill.make_state())
    np.testing.assert_array_equal(a["proj"], b["proj"])
    with pytest.raises(MILLoadError, match="no function 'nope'"):
        load_mlpackage(multi, function_name="nope")
    assert cli.main(["inspect-coreml", str(multi)]) == 0
    out = capsys.readouterr().out
    assert "function prefill" in out and "function decode" in out and "state   acc" in out
    assert "int64    none" in out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_malformed_packages_give_one_clear_line(accumulate_pkg, tmp_path, capsys):
    path, _ = accumulate_pkg
    cases = {}
    cases["missing"] = (tmp_path / "nope.mlpackage", "no such file")
    bare = tmp_path / "bare.mlpackage"
    bare.mkdir()
    cases["no manifest"] = (bare, "Manifest.json: missing")
    spec_trunc = _copy(path, tmp_path / "spec_trunc.mlpackage")
    spec_file = spec_trunc / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec_file.write_bytes(spec_file.read_bytes()[:40])
    cases["truncated spec"] = (spec_trunc, "model.mlmodel")
    no_blob = _copy(path, tmp_path / "no_blob.mlpackage")
    (no_blob / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    cases["missing blob"] = (no_blob, "weight blob referenced by the program is missing")
    blob_trunc = _copy(path, tmp_path / "blob_trunc.mlpackage")
    blob = blob_trunc / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    blob.write_bytes(blob.read_bytes()[:100])
    cases["truncated blob"] = (blob_trunc, "weight.bin: truncated")
    for name, (pkg, message) in cases.items():
        with pytest.raises(MILLoadError, match=message):
            load_mlpackage(pkg)
        assert cli.main(["inspect-coreml", str(pkg)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(pkg.name) in err, (name, err)
