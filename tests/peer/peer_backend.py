"""Route Apple's MIL op tests through our numpy interpreter instead of Core ML.

Apple's tests build a program, convert it with ``ct_convert`` and hand the ``MLModel`` to
``compare_backend``, which on macOS predicts with Core ML and compares with the test's numpy
expectation, and on Linux silently returns. :func:`install` replaces those pieces (module globals of
Apple's testing utilities and a few ``MLModel`` methods) so the comparison runs on Linux, against
``load_mlpackage(mlmodel.package_path).predict(...)``.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np

CONST_ELIMINATION = "common::const_elimination"
# The Core ML generation the interpreter stands for (iOS18 opset = macOS 15). Apple's tests ask
# coremltools' _macos_version() to skip cases for old runtimes; on Linux it returns ().
EMULATED_MACOS = (15, 5)
FP16_EXPECTATION_TOL = 1e-3  # about one float16 ulp (2**-10) relative
PRECISION_TAG = "_peer_backend_precision"  # set on MLModels that Apple's ct_convert made


class PeerHarnessError(RuntimeError):
    """The harness cannot run what a test asked for (the message says what)."""


# ---- the interpreter behind an MLModel ----
def interpreter_for(mlmodel):
    """The numpy interpreter for an ML Program ``MLModel``, loaded once per model object.

    A model converted for one of Apple's fp32 backends runs in the interpreter's high-precision
    mode (fp16-typed values stay float32 between ops): those tests compare op semantics with
    float32/64 numpy expectations at atol 1e-4, which per-op fp16 rounding would not meet. Models
    of the fp16 backends (and any other conversion) keep fp16 storage, like a device, and Apple
    loosens their tolerances."""
    from converters.interpreter import load_mlpackage

    cached = mlmodel.__dict__.get("_peer_interpreter")
    if cached is not None:
        return cached
    if not _is_mlprogram(mlmodel):
        raise PeerHarnessError("only ML Program models run on the interpreter (not neuralnetwork)")
    package_path = getattr(mlmodel, "package_path", None)
    if not package_path:
        raise PeerHarnessError("the MLModel has no package path to load")
    function_name = mlmodel.function_name if mlmodel._is_multifunction() else None
    high_precision = mlmodel.__dict__.get(PRECISION_TAG) == "fp32"
    model = load_mlpackage(package_path, function_name=function_name, fp32=high_precision)
    mlmodel.__dict__["_peer_interpreter"] = model
    return model


def _is_mlprogram(mlmodel) -> bool:
    return mlmodel.get_spec().WhichOneof("Type") == "mlProgram"


def cast_inputs(model, inputs: dict) -> dict:
    """Each input as a numpy array of the dtype (and static shape) the function declares.

    Core ML converts whatever the caller passes (Apple's helper sends everything as float32 and a
    scalar as shape (1,)); the interpreter is strict, so the cast happens here."""
    from coremltools.converters.mil.mil import types

    from converters.interpreter.dtypes import storage_dtype

    declared = {n: v for n, v in model.function.inputs.items() if not types.is_state(v.sym_type)}
    cast = {}
    for name, value in inputs.items():
        var = declared.get(name)
        if var is None:
            cast[name] = value  # the interpreter reports the unknown name
            continue
        if not isinstance(value, (np.ndarray, np.generic, int, float, bool, list, tuple)):
            raise PeerHarnessError(f"input {name!r}: {type(value).__name__} inputs are unsupported")
        array = np.asarray(value).astype(storage_dtype(var.dtype, model.fp32))
        shape = var.shape
        static = all(isinstance(d, (int, np.integer)) for d in shape)
        if static and array.shape != tuple(shape) and array.size == int(np.prod(shape)):
            array = array.reshape(shape)
        cast[name] = array
    return cast


def predict(mlmodel, inputs: dict, state=None) -> dict:
    """``MLModel.predict`` through the interpreter. An op that fails at run time raises
    RuntimeError with Core ML's wording, as ``MLModel.predict`` does on macOS (a few Apple tests
    check that invalid inputs fail this way)."""
    from converters.interpreter import MILExecutionError

    model = interpreter_for(mlmodel)
    try:
        return model.predict(cast_inputs(model, dict(inputs)), state=state)
    except MILExecutionError as exc:
        raise RuntimeError(f"Unable to compute the prediction using ML Program: {exc}") from exc


# ---- compare_backend, as Apple's macOS branch does it ----
def _output(pred: dict, name: str):
    from coremltools.converters.mil.mil.passes.defs.preprocess import NameSanitizer

    if name in pred:
        return pred[name]
    sanitized = NameSanitizer._replace_invalid_char_with_underscore(name)
    if sanitized in pred:
        return pred[sanitized]
    raise KeyError(f"{name} output not found in the interpreter's outputs {sorted(pred)}")


def _proto_output_shape(mlmodel, name: str) -> list[int]:
    from coremltools.converters.mil.mil.passes.defs.preprocess import NameSanitizer

    desc = mlmodel.get_spec().description
    if mlmodel._is_multifunction():
        desc = mlmodel._get_function_description(mlmodel.function_name)
    if desc.predictedFeatureName != "":
        return []  # classifiers: the proto output differs from the runtime output
    sanitized = NameSanitizer._replace_invalid_char_with_underscore(name)
    for feature in desc.output:
        if feature.name == sanitized:
            return list(feature.type.multiArrayType.shape)
    raise KeyError(f"{name} output not found in the model description")


def compare_shapes(mlmodel, expected_outputs: dict, pred: dict) -> None:
    for name, expected in expected_outputs.items():
        out = _output(pred, name)
        if isinstance(out, dict) and isinstance(expected, dict):
            assert len(out) == len(expected)
            continue
        np_types = (np.generic, np.ndarray)
        if isinstance(out, np_types) and isinstance(expected, np_types):
            # Core ML has no rank-0 outputs: a scalar comes back as shape (1,).
            if expected.shape == () and out.shape in ((), (1,)):
                continue
            assert out.shape == expected.shape, (
                f"Output: {name}. expected shape {expected.shape} != actual shape {out.shape}"
            )
            proto_shape = _proto_output_shape(mlmodel, name)
            if proto_shape:
                assert proto_shape == list(out.shape), (
                    f"output {name}: shape {out.shape} differs from the proto's {proto_shape}"
                )
            continue
        assert type(out) is type(expected)


def compare_backend(
    mlmodel,
    input_key_values,
    expected_outputs,
    dtype="fp32",
    atol=1e-04,
    rtol=1e-05,
    also_compare_shapes=True,
    state=None,
    allow_mismatch_ratio=0.0,
):
    """Apple's ``testing_utils.compare_backend`` (macOS branch), predicting with the interpreter."""
    import coremltools as ct

    if dtype not in ("fp32", "fp16"):
        raise ValueError("Unsupported dtype config")
    pred = predict(mlmodel, input_key_values or {}, state)
    if expected_outputs is None:
        return pred
    if also_compare_shapes:
        compare_shapes(mlmodel, expected_outputs, pred)
    if mlmodel.compute_unit != ct.ComputeUnit.CPU_ONLY or dtype == "fp16":
        atol = max(atol * 100.0, 5e-1)
        rtol = max(rtol * 100.0, 5e-2)
    for name, expected in expected_outputs.items():
        out = _output(pred, name)
        if isinstance(out, np.ndarray):
            if out.shape == (1,) and np.shape(expected) == ():
                out = out.reshape(())
            tol = dict(atol=atol, rtol=rtol)
            if getattr(expected, "dtype", None) == np.float16:
                # The test computed its expectation in numpy float16 arithmetic (one rounding per
                # numpy op): it holds about 3 significant digits, whatever the backend.
                loose = FP16_EXPECTATION_TOL
                tol = dict(atol=max(atol, loose), rtol=max(rtol, loose))
            try:
                np.testing.assert_allclose(out, expected, **tol)
            except AssertionError:
                mismatched = np.sum(~np.isclose(out, expected, **tol))
                if mismatched / np.prod(np.shape(expected)) > allow_mismatch_ratio:
                    raise
        elif isinstance(out, dict):
            for key, value in out.items():
                assert key in expected
                assert expected[key] == value
        else:
            assert out == expected
    return pred


# ---- conversion without const folding ----
CONSTEXPR_INPUT_CASTS = "peer::fold_constexpr_input_casts"


def _register_constexpr_cast_folding() -> None:
    """Register the pass that stands in for ``common::const_elimination``: it folds only a cast of
    a constant that feeds a ``constexpr_*`` op (the fp16 backends insert those casts, and a
    constexpr op's inputs must be serialized as constants)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if CONSTEXPR_INPUT_CASTS in PASS_REGISTRY:
        return

    class fold_constexpr_input_casts(AbstractGraphPass):  # noqa: N801 (pass names are snake_case)
        def apply(self, prog):
            for function in prog.functions.values():
                self._fold(function)

        @block_context_manager
        def _fold(self, block):
            for operation in list(block.operations):
                for inner in operation.blocks:
                    self._fold(inner)
                if operation.op_type != "cast" or operation.outputs[0].val is None:
                    continue
                out = operation.outputs[0]
                if not any(c.op_type.startswith("constexpr_") for c in out.child_ops):
                    continue
                folded = mb.const(val=out.val, before_op=operation, name=out.name)
                if block.try_replace_uses_of_var_after_op(
                    anchor_op=operation, old_var=out, new_var=folded
                ):
                    out.set_name(out.name + "_ignored")
                    block.remove_ops([operation])

    register_pass(namespace="peer")(fold_constexpr_input_casts)


def without_const_elimination(pipeline):
    """The pipeline with ``common::const_elimination`` replaced by the constexpr-input cast
    folding: with const elimination, an op whose inputs are all constants is folded by
    coremltools' own value inference and the interpreter never sees it."""
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT if pipeline is None else copy.deepcopy(pipeline)
    pipeline.passes = [
        CONSTEXPR_INPUT_CASTS if name == CONST_ELIMINATION else name for name in pipeline.passes
    ]
    return pipeline


def _wrap_ct_convert(original):
    signature = inspect.signature(original)

    def ct_convert(program, *args, **kwargs):
        kwargs["pass_pipeline"] = without_const_elimination(kwargs.get("pass_pipeline"))
        mlmodel = original(program, *args, **kwargs)
        convert_to = signature.bind(program, *args, **kwargs).arguments.get("convert_to")
        if isinstance(convert_to, tuple) and hasattr(mlmodel, "__dict__"):
            mlmodel.__dict__[PRECISION_TAG] = convert_to[1]
        return mlmodel

    ct_convert.__wrapped__ = original
    return ct_convert


# ---- MLModel methods that need Core ML ----
def _wrap_predict(original):
    def predict_with_interpreter(self, data, state=None):
        if not _is_mlprogram(self):
            return original(self, data, state=state)
        if isinstance(data, list):
            return [predict(self, item, state) for item in data]
        return predict(self, data, state)

    return predict_with_interpreter


def _wrap_is_stateful(original):
    def is_stateful(self):
        if not _is_mlprogram(self):
            return original(self)
        return interpreter_for(self).is_stateful()

    return is_stateful


def _make_state(self):
    return interpreter_for(self).make_state()


_installed = False


def install() -> None:
    """Patch Apple's testing utilities and ``MLModel`` (idempotent)."""
    global _installed
    if _installed:
        return
    from coremltools.converters.mil import testing_utils as base_utils
    from coremltools.converters.mil.mil.ops.tests import testing_utils as op_utils
    from coremltools.models import utils as model_utils
    from coremltools.models.model import MLModel

    # Read through the module by Apple's skip conditions only: coremltools' own callers imported
    # the function by name, or check _is_macos() first.
    model_utils._macos_version = lambda: EMULATED_MACOS

    _register_constexpr_cast_folding()
    wrapped_convert = _wrap_ct_convert(base_utils.ct_convert)
    for module in (base_utils, op_utils):
        module.compare_backend = compare_backend
        module.ct_convert = wrapped_convert
    base_utils.compare_shapes = lambda mlmodel, inputs, expected, pred=None: compare_shapes(
        mlmodel, expected, pred if pred is not None else predict(mlmodel, inputs)
    )
    MLModel.predict = _wrap_predict(MLModel.predict)
    MLModel._is_stateful = _wrap_is_stateful(MLModel._is_stateful)
    MLModel.make_state = _make_state
    _installed = True
