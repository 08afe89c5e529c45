"""From the exporter's MIL program to a saved ``.mlpackage``: the graph passes it needs, the
enumerated prefill shapes, and serialization, without going through ``ct.convert``.

``ct.convert`` on a MIL program runs its pass pipelines with a full ``Program.validate`` after
every pass (and two eager ``str(program)`` renderings per pipeline for debug logging), writes the
package to a temporary directory that ``save`` then copies, and converts one function; a
two-function package then took ``save_multifunction``: save both, read both back, deduplicate,
save again. Here the two-function program goes once through the passes below, then straight to
its path through the serializer coremltools itself uses (``backend.mil.load``, which validates the
program once).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converters.mil_llama import INPUT_IDS

# ct.convert runs 22 passes on a MIL program (its main pipeline with the pass list we gave it,
# then the mlprogram backend pipeline; ``reference_passes``). On the programs LlamaGraph builds,
# two of them change anything; the others walk ~2,000 ops per function for nothing (and
# ct.convert validates the whole program after each). ``test_two_passes_give_the_converter_output``
# (tests/test_export_pipeline.py) checks that these two alone yield the same program as all 22
# (both layouts, fp16 / int8 / int4, the config variants).
#   common::add_int16_cast                gather indices through int16 (preferred by the ANE)
#   common::canonicalize_inplace_pattern  every coreml_update_state right after its slice_update,
#                                         Core ML's in-place state update pattern
# Left out of the reference list on purpose, as before: common::guard_negative_gather_indices
# (token ids are non-negative by contract; it adds greater_equal/add/select per gather) and
# common::remove_redundant_ops (in coremltools 9.0 it merges a read_state that follows a
# coreml_update_state into the earlier read_state, which silently reads the stale value).
PASSES = (
    "common::add_int16_cast",
    "common::canonicalize_inplace_pattern",
)

# The pass list the exporter gave ct.convert before; only that test uses it, as the reference.
REFERENCE_MAIN_PASSES = (
    "common::dead_code_elimination",
    "common::const_elimination",
    "common::dedup_op_and_var_names",
    "common::add_int16_cast",
    "common::update_output_dtypes",
    "common::const_elimination",
    "common::cast_optimization",
    "common::dead_code_elimination",
    "common::canonicalize_inplace_pattern",
    "common::prefer_state_in_downstream",
    "common::dead_code_elimination",
)


def reference_passes() -> list[str]:
    """REFERENCE_MAIN_PASSES followed by the backend pipeline ct.convert derives from them."""
    import coremltools as ct
    from coremltools.converters.mil.converter import _construct_other_pipelines

    main = ct.PassPipeline(pass_names=list(REFERENCE_MAIN_PASSES), pipeline_name="reference")
    _, backend = _construct_other_pipelines(main, "milinternal", "mlprogram")
    return list(REFERENCE_MAIN_PASSES) + list(backend.passes)


def run_passes(prog, passes: Sequence[str] = PASSES) -> None:
    """Apply ``passes`` to every function of ``prog`` in place."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    for name in passes:
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options(None)
        graph_pass(prog)


def set_prefill_shapes(function, shapes: Sequence[int]) -> None:
    """Publish ``shapes`` as the prefill input's enumerated lengths (the input dim is symbolic,
    FIELD-NOTES); a single length becomes a fixed shape."""
    import coremltools as ct

    # EnumeratedShapes needs two or more; one length makes the symbolic dim a fixed one.
    shape = (ct.EnumeratedShapes(shapes=[[1, s] for s in shapes], default=[1, shapes[0]])
             if len(shapes) > 1 else (1, shapes[0]))
    function.set_input_types((ct.TensorType(name=INPUT_IDS, shape=shape, dtype=np.int32),))


def save_program(prog, package: str | os.PathLike) -> Path:
    """Serialize ``prog`` (after ``run_passes``) as a new ``.mlpackage`` at ``package``: the
    model spec plus one weight blob (``weight_id``-shared consts written once)."""
    import coremltools as ct
    from coremltools.converters.mil.backend.mil.load import load as to_proto
    from coremltools.models.utils import _create_mlpackage

    package = Path(package)
    prog._check_early_error_out_for_invalid_program()
    with tempfile.TemporaryDirectory(prefix=".weights-", dir=package.parent) as weights:
        spec = to_proto(prog, weights_dir=weights,
                        specification_version=ct.target.iOS18.value, convert_to="mlprogram")
        _create_mlpackage(spec, weights, str(package))
    return package


def blob_bytes(package: str | os.PathLike) -> int:
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.glob("*"))


def function_weight_bytes(function) -> int:
    """Blob bytes one function's weights take alone: each entry is its data padded to 64 bytes
    after a 64-byte header (``libmilstoragepython``'s layout), plus the file header."""
    import coremltools as ct
    from coremltools.converters.mil.backend.mil.load import should_use_weight_file
    from coremltools.converters.mil.mil import types

    total, seen = 64, set()
    for op in function.operations:
        if op.op_type != "const" or (op.weight_id is not None and op.weight_id in seen):
            continue
        seen.add(op.weight_id)
        val = op.outputs[0].val
        if not should_use_weight_file(val, ct.target.iOS18.value):
            continue
        bits = 4 if op.outputs[0].dtype == types.int4 else 8 * val.dtype.itemsize
        total += 64 + -(-(val.size * bits // 8) // 64) * 64
    return total


def check_quantized(function, expected: int) -> bool:
    """Whether the function has one dequantizing constexpr per quantized weight it uses."""
    return sum(op.op_type.startswith("constexpr_") for op in function.operations) == expected
