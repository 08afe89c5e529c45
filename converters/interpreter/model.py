"""Execute one function of a saved ML Program in numpy, like ``MLModel.predict`` does on a Mac.

What it emulates: op semantics, each op's output rounded to its declared dtype (fp16 programs keep
fp16 storage between ops), state buffers that persist across ``predict`` calls (``MLState``), input
validation against the model description (names, dtypes, enumerated shapes).

What it cannot emulate: the accumulation order and internal precision of the Neural Engine or GPU
kernels (an op here computes in float32 and rounds once), fused kernels, and compute-unit choice. So
fp16 results resemble the device's error profile but do not match it bit for bit.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from converters.interpreter import ops as _ops  # noqa: F401  (registers the op table)
from converters.interpreter.dtypes import compute_view, numpy_dtype, storage_dtype
from converters.interpreter.package import (
    FunctionDescription,
    MILLoadError,
    check_weight_blobs,
    describe_functions,
    locate_model_files,
    read_spec,
)
from converters.interpreter.registry import OPS, MILExecutionError, OpContext


class MILState:
    """State buffers of one function (what ``MLModel.make_state()`` returns on a Mac)."""

    def __init__(self, buffers: dict[str, np.ndarray]):
        self.buffers = buffers

    def read(self, name: str) -> np.ndarray:
        return self.buffers[name].copy()

    def write(self, name: str, value: np.ndarray) -> None:
        self.buffers[name] = np.array(value, dtype=self.buffers[name].dtype)


def _load_program(spec, weights_dir: Path | None, spec_file: Path):
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    try:
        return load_milproto(
            spec, spec.specificationVersion, file_weights_dir=str(weights_dir or "")
        )
    except Exception as exc:  # the proto loader raises many kinds; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MILLoadError(f"{spec_file}: cannot load the ML Program ({first})") from None


class MILModel:
    """A loaded function of an ML Program, executable with :meth:`predict`."""

    def __init__(self, path, spec, program, function_name: str, fp32: bool = False):
        self.path = Path(path)
        self.spec = spec
        self.program = program
        self.fp32 = fp32
        self.descriptions = describe_functions(spec)
        self._const_cache: dict[str, tuple] = {}
        if function_name not in program.functions:
            raise MILLoadError(
                f"{path}: no function {function_name!r}; functions: {sorted(program.functions)}"
            )
        self.function_name = function_name
        self.function = program.functions[function_name]
        self.description: FunctionDescription | None = self.descriptions.get(function_name)

    @property
    def function_names(self) -> list[str]:
        return sorted(self.program.functions)

    def with_function(self, name: str) -> MILModel:
        """The same package, another function (weights are shared, nothing is reloaded)."""
        return MILModel(self.path, self.spec, self.program, name, self.fp32)

    # ---- state ----
    def _state_vars(self):
        from coremltools.converters.mil.mil import types

        return {n: v for n, v in self.function.inputs.items() if types.is_state(v.sym_type)}

    def is_stateful(self) -> bool:
        return bool(self._state_vars())

    def make_state(self) -> MILState:
        buffers = {}
        for name, var in self._state_vars().items():
            tensor = var.sym_type.wrapped_type()
            dtype = storage_dtype(tensor.get_primitive(), self.fp32)
            buffers[name] = np.zeros(tensor.get_shape(), dtype=dtype)
        return MILState(buffers)

    # ---- inputs ----
    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coremltools.converters.mil.mil import types

        declared = {
            n: v for n, v in self.function.inputs.items() if not types.is_state(v.sym_type)
        }
        where = f"{self.path.name}, function {self.function_name!r}"
        missing = sorted(set(declared) - set(inputs))
        if missing:
            raise ValueError(f"{where}: missing input {missing[0]!r}; expects {sorted(declared)}")
        unknown = sorted(set(inputs) - set(declared))
        if unknown:
            raise ValueError(f"{where}: unknown input {unknown[0]!r}; expects {sorted(declared)}")
        described = {d.name: d for d in (self.description.inputs if self.description else ())}
        checked = {}
        for name, var in declared.items():
            value = np.asarray(inputs[name])
            want = storage_dtype(var.dtype, self.fp32)
            if np.issubdtype(want, np.integer) and not (
                np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_
            ):
                raise ValueError(
                    f"{where}: input {name!r} must be an integer array ({want}), got {value.dtype}"
                )
            desc = described.get(name)
            if desc is not None and desc.dtype is not None and not desc.accepts_shape(value.shape):
                raise ValueError(
                    f"{where}: input {name!r} has shape {tuple(value.shape)}; "
                    f"allowed: {desc.allowed_shapes_text()}"
                )
            checked[name] = value.astype(want)
        return checked

    # ---- execution ----
    def predict(self, inputs: dict[str, np.ndarray], state: MILState | None = None):
        values: dict[str, object] = self._check_inputs(inputs)
        if self.is_stateful():
            if state is None:
                raise ValueError(
                    f"{self.path.name}, function {self.function_name!r} is stateful: pass "
                    "state=model.make_state()"
                )
            values.update({n: n for n in self._state_vars()})  # a state var evaluates to its name
        self._run_block(self.function, values, state)
        outputs = {}
        described = {d.name: d for d in (self.description.outputs if self.description else ())}
        for var in self.function.outputs:
            value = values[var.name]
            desc = described.get(var.name)
            if desc is not None and desc.dtype is not None and not self.fp32:
                value = np.asarray(value).astype(desc.dtype)
            outputs[var.name] = value
        return outputs

    def _run_block(self, block, values: dict, state: MILState | None) -> None:
        # Constants are coerced and widened once per model, not on every call.
        consts = self._const_cache
        widened: dict[str, object] = {}

        def read(var):
            if isinstance(var, (list, tuple)):
                return [read(v) for v in var]
            if var.name in widened:
                return widened[var.name]
            if var.name in values:
                return compute_view(values[var.name])
            raise MILExecutionError(
                f"function {self.function_name!r}: value {var.name!r} used before it is computed"
            )

        buffers = state.buffers if state is not None else {}
        for operation in block.operations:
            if operation.op_type == "const":
                out = operation.outputs[0]
                if out.name not in consts:
                    stored = self._coerce(out, out.val, operation)
                    wide = compute_view(stored)
                    for arr in (stored, wide):
                        if isinstance(arr, np.ndarray):
                            arr.flags.writeable = False  # shared across calls: no in-place ops
                    consts[out.name] = (stored, wide)
                values[out.name], widened[out.name] = consts[out.name]
                continue
            impl = OPS.get(operation.op_type)
            ctx = OpContext(operation, self.function_name, read, buffers, self.fp32)
            if impl is None:
                raise ctx.error("op type is not supported by the interpreter")
            result = impl(ctx)
            if len(operation.outputs) == 1:
                result = (result,)
            if len(result) != len(operation.outputs):
                raise ctx.error(
                    f"produced {len(result)} outputs, declared {len(operation.outputs)}"
                )
            for var, value in zip(operation.outputs, result, strict=True):
                values[var.name] = self._coerce(var, value, operation)

    def _coerce(self, var, value, operation):
        """Round to the declared dtype and check the declared (static) shape."""
        dtype = storage_dtype(var.dtype, self.fp32) if _is_tensor_like(var) else None
        if dtype is None:
            return value  # strings, lists: passed through
        arr = np.asarray(value)
        if arr.dtype != dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = arr.astype(dtype)
        shape = var.shape
        if shape and all(isinstance(d, (int, np.integer)) for d in shape):
            if tuple(arr.shape) != tuple(int(d) for d in shape):
                raise MILExecutionError(
                    f"function {self.function_name!r}, op {operation.name!r} "
                    f"({operation.op_type}): output {var.name!r} has shape {arr.shape}, "
                    f"declared {tuple(shape)}"
                )
        elif not shape and arr.ndim:
            arr = arr.reshape(())
        return arr

    # ---- introspection ----
    def op_histogram(self) -> Counter:
        counts: Counter = Counter()

        def walk(block):
            for operation in block.operations:
                counts[operation.op_type] += 1
                for inner in operation.blocks:
                    walk(inner)

        walk(self.function)
        return counts


def _is_tensor_like(var) -> bool:
    from coremltools.converters.mil.mil import types

    sym = var.sym_type
    if types.is_tensor(sym) or types.is_scalar(sym):
        return numpy_dtype(var.dtype) is not None
    return False


def load_mlpackage(
    path: str | os.PathLike, function_name: str | None = None, fp32: bool = False
) -> MILModel:
    """Load a saved ``.mlpackage`` (or ``.mlmodel``) for execution with the numpy interpreter.

    ``function_name`` picks a function of a multifunction package (default: the package's default
    function). ``fp32=True`` keeps fp16 values in float32 between ops: a high-precision reference.
    """
    spec_file, weights_dir = locate_model_files(path)
    spec = read_spec(spec_file)
    check_weight_blobs(spec, weights_dir, spec_file)
    program = _load_program(spec, weights_dir, spec_file)
    if function_name is None:
        function_name = spec.description.defaultFunctionName or (
            "main" if "main" in program.functions else sorted(program.functions)[0]
        )
    return MILModel(path, spec, program, function_name, fp32)
