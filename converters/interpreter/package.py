"""Reading a saved ``.mlpackage`` / ``.mlmodel`` from disk: the spec protobuf, the weight blob and
the model description (inputs, outputs, states, enumerated shapes) of each function."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOB_SENTINEL = 0xDEADBEEF
BLOB_HEADER_BYTES = 64


class MILLoadError(ValueError):
    """A package cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorDescription:
    """One input, output or state of a function as the model description declares it."""

    name: str
    dtype: np.dtype | None  # None: not a multi-array (image, dictionary, ...)
    shape: tuple[int, ...]  # the default shape
    enumerated: tuple[tuple[int, ...], ...] = ()  # EnumeratedShapes, if any
    ranges: tuple[tuple[int, int], ...] = ()  # ShapeRange (lower, upper; -1 = unbounded)
    kind: str = "multiArray"

    def allowed_shapes_text(self) -> str:
        if self.enumerated:
            return ", ".join(str(s) for s in self.enumerated)
        if self.ranges:
            return " x ".join(f"[{lo}..{'inf' if hi < 0 else hi}]" for lo, hi in self.ranges)
        return str(self.shape)

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if self.enumerated:
            return tuple(shape) in self.enumerated
        if self.ranges:
            if len(shape) != len(self.ranges):
                return False
            return all(
                lo <= d and (hi < 0 or d <= hi)
                for d, (lo, hi) in zip(shape, self.ranges, strict=True)
            )
        return tuple(shape) == self.shape


@dataclass(frozen=True)
class FunctionDescription:
    name: str
    inputs: tuple[TensorDescription, ...]
    outputs: tuple[TensorDescription, ...]
    states: tuple[TensorDescription, ...]


def _array_description(feature, kind_field: str = "type") -> TensorDescription:
    from converters.interpreter.dtypes import SPEC_ARRAY_DTYPES

    ftype = getattr(feature, kind_field)
    which = ftype.WhichOneof("Type")
    if which == "stateType":
        array = ftype.stateType.arrayType
        kind = "state"
    elif which == "multiArrayType":
        array = ftype.multiArrayType
        kind = "multiArray"
    else:
        return TensorDescription(feature.name, None, (), kind=which or "unknown")
    from coremltools.proto import FeatureTypes_pb2

    dtype_name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    dtype = SPEC_ARRAY_DTYPES.get(dtype_name)
    enumerated, ranges = (), ()
    if kind == "multiArray":
        shape_kind = array.WhichOneof("ShapeFlexibility")
        if shape_kind == "enumeratedShapes":
            shapes = array.enumeratedShapes.shapes
            enumerated = tuple(tuple(int(d) for d in s.shape) for s in shapes)
        elif shape_kind == "shapeRange":
            ranges = tuple(
                (int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges
            )
    return TensorDescription(
        feature.name,
        np.dtype(dtype) if dtype is not None else None,
        tuple(int(d) for d in array.shape),
        enumerated,
        ranges,
        kind,
    )


def describe_functions(spec) -> dict[str, FunctionDescription]:
    desc = spec.description
    if len(desc.functions):
        sources = [(f.name, f) for f in desc.functions]
    else:
        sources = [("main", desc)]
    return {
        name: FunctionDescription(
            name,
            tuple(_array_description(f) for f in d.input),
            tuple(_array_description(f) for f in d.output),
            tuple(_array_description(f) for f in d.state),
        )
        for name, d in sources
    }


def locate_model_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(spec file, weights dir or None) of a ``.mlpackage`` directory or an ``.mlmodel`` file."""
    path = Path(path)
    if not path.exists():
        raise MILLoadError(f"{path}: no such file or directory")
    if path.is_file():
        return path, None
    manifest = path / "Manifest.json"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        root = info["itemInfoEntries"][info["rootModelIdentifier"]]["path"]
    except FileNotFoundError:
        raise MILLoadError(f"{manifest}: missing; not an .mlpackage directory") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise MILLoadError(f"{manifest}: malformed manifest ({exc!r})") from None
    spec_file = path / "Data" / root
    if not spec_file.is_file():
        raise MILLoadError(f"{spec_file}: model spec named by Manifest.json is missing")
    return spec_file, spec_file.parent / "weights"


def read_spec(spec_file: Path):
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_file.read_bytes())
    except DecodeError as exc:
        raise MILLoadError(f"{spec_file}: not a Core ML model spec ({exc})") from None
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise MILLoadError(
            f"{spec_file}: model type is {kind or 'empty (truncated?)'}; only ML Programs "
            "(mlprogram) can be interpreted"
        )
    if not spec.mlProgram.functions:
        raise MILLoadError(f"{spec_file}: ML Program has no functions (truncated file?)")
    return spec


def _blob_values(message, found: list) -> None:
    from coremltools.proto import MIL_pb2
    from google.protobuf.message import Message

    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if isinstance(value, Message):
            items = [value]
        else:  # repeated field, or a map (which has keys)
            items = value.values() if hasattr(value, "keys") else value
        for item in items:
            if isinstance(item, MIL_pb2.Value.BlobFileValue):
                found.append(item)
            else:
                _blob_values(item, found)


def check_weight_blobs(spec, weights_dir: Path | None, spec_file: Path) -> None:
    """Every weight the program references must lie inside its blob file, under a valid header,
    before coremltools' C++ reader touches it."""
    refs: list = []
    _blob_values(spec.mlProgram, refs)
    if not refs:
        return
    if weights_dir is None:
        raise MILLoadError(f"{spec_file}: references weight files but is not inside an .mlpackage")
    sizes: dict[Path, int] = {}
    for ref in refs:
        blob = weights_dir / ref.fileName.split("/")[-1]
        if blob not in sizes:
            if not blob.is_file():
                raise MILLoadError(f"{blob}: weight blob referenced by the program is missing")
            sizes[blob] = blob.stat().st_size
        size, offset = sizes[blob], int(ref.offset)
        if offset + BLOB_HEADER_BYTES > size:
            raise MILLoadError(f"{blob}: truncated (weight header at {offset} past end {size})")
        with open(blob, "rb") as f:
            f.seek(offset)
            sentinel, _dtype, n_bytes, data_offset = struct.unpack("<IIQQ", f.read(24))
        if sentinel != BLOB_SENTINEL:
            raise MILLoadError(f"{blob}: corrupt weight header at offset {offset}")
        if data_offset + n_bytes > size:
            raise MILLoadError(
                f"{blob}: truncated (weight data {data_offset}+{n_bytes} past end {size})"
            )
