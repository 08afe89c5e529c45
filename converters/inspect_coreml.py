"""``mlx-distill inspect-coreml PKG``: what a saved Core ML package contains.

Functions; inputs, outputs and states with shapes (enumerated and ranged too); an op histogram;
weight bytes by dtype (a weight shared by several functions counted once); int64 tensors flagged
(the Neural Engine has no int64)."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from converters.interpreter.package import TensorDescription

_BLOB_HEADER = struct.Struct("<IIQQ")


def _shape_text(desc: TensorDescription) -> str:
    if desc.enumerated:
        return "enumerated " + " | ".join("x".join(map(str, s)) for s in desc.enumerated)
    if desc.ranges:
        return "range " + " x ".join(f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in desc.ranges)
    return "x".join(map(str, desc.shape)) or "scalar"


def _walk_ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk_ops(inner)


def weight_bytes_by_dtype(spec, weights_dir: Path | None) -> Counter:
    """Bytes of constant data per MIL dtype, from the spec; blob weights deduplicated by
    (file, offset), so weights shared across functions are counted once."""
    from coremltools.proto import MIL_pb2

    names = MIL_pb2.DataType.Name
    seen: set = set()
    totals: Counter = Counter()

    def count(value):
        if not value.type.HasField("tensorType"):
            return
        dtype = names(value.type.tensorType.dataType).lower()
        if value.HasField("blobFileValue"):
            blob = value.blobFileValue
            key = (blob.fileName, blob.offset)
            if key in seen or weights_dir is None:
                return
            seen.add(key)
            with open(weights_dir / blob.fileName.split("/")[-1], "rb") as f:
                f.seek(blob.offset)
                _, _, n_bytes, _ = _BLOB_HEADER.unpack(f.read(_BLOB_HEADER.size))
            totals[dtype] += n_bytes
        elif value.HasField("immediateValue"):
            totals[dtype] += value.immediateValue.ByteSize()

    def visit(block):
        for op in block.operations:
            # Constants appear as const ops and as values bound directly to op inputs.
            if op.type == "const" and "val" in op.attributes:
                count(op.attributes["val"])
            for argument in op.inputs.values():
                for binding in argument.arguments:
                    if binding.HasField("value"):
                        count(binding.value)
            for inner in op.blocks:
                visit(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            visit(block)
    return totals


def int64_tensors(model) -> list[str]:
    from coremltools.converters.mil.mil import types

    found = []
    for fname, function in model.program.functions.items():
        for name, var in function.inputs.items():
            if var.dtype == types.int64:
                found.append(f"{fname}:{name}")
        for op in _walk_ops(function):
            for out in op.outputs:
                if getattr(out, "dtype", None) == types.int64:
                    found.append(f"{fname}:{out.name} ({op.op_type})")
    return found


def inspect_package(path) -> dict:
    from converters.interpreter import load_mlpackage
    from converters.interpreter.package import locate_model_files

    model = load_mlpackage(path)
    _, weights_dir = locate_model_files(path)
    functions = {}
    for name in model.function_names:
        fn_model = model.with_function(name)
        desc = fn_model.description

        def rows(items):
            return [
                {"name": d.name, "dtype": str(d.dtype) if d.dtype is not None else d.kind,
                 "shape": _shape_text(d)}
                for d in items
            ]

        functions[name] = {
            "inputs": rows(desc.inputs) if desc else [],
            "outputs": rows(desc.outputs) if desc else [],
            "states": rows(desc.states) if desc else [],
            "ops": dict(sorted(fn_model.op_histogram().items(), key=lambda kv: (-kv[1], kv[0]))),
        }
    return {
        "package": str(path),
        "specification_version": model.spec.specificationVersion,
        "default_function": model.function_name,
        "functions": functions,
        "weight_bytes": dict(weight_bytes_by_dtype(model.spec, weights_dir)),
        "int64_tensors": int64_tensors(model),
    }


def _print_report(info: dict) -> None:
    print(f"package  {info['package']}  (spec v{info['specification_version']}, "
          f"default function {info['default_function']!r})")
    for name, fn in info["functions"].items():
        print(f"\nfunction {name}")
        for kind in ("inputs", "outputs", "states"):
            for row in fn[kind]:
                print(f"  {kind[:-1]:<7} {row['name']:<28} {row['dtype']:<9} {row['shape']}")
        ops = ", ".join(f"{k} {v}" for k, v in fn["ops"].items())
        print(f"  ops     {sum(fn['ops'].values())}: {ops}")
    total = sum(info["weight_bytes"].values())
    print(f"\nweights  {total:,} bytes: "
          + (", ".join(f"{k} {v:,}" for k, v in sorted(info["weight_bytes"].items())) or "none"))
    if info["int64_tensors"]:
        print(f"int64    {len(info['int64_tensors'])} tensors (not Neural Engine friendly): "
              + ", ".join(info["int64_tensors"][:10]))
    else:
        print("int64    none")


def _main(args) -> int:
    from converters.interpreter import MILLoadError
    from mlx_distill.cli import UserError

    try:
        info = inspect_package(Path(args.package))
    except MILLoadError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_report(info)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect-coreml",
        help="show functions, I/O shapes, ops, weight bytes and int64 tensors of a .mlpackage",
        description=__doc__,
    )
    p.add_argument("package", help="path to a .mlpackage directory (or .mlmodel file)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)
