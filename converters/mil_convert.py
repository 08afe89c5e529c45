"""Converting the exporter's MIL programs: our pass pipeline, weight-only quantization inside the
same conversion (``ct.optimize.coreml``'s quantizer pass), the size floor, and quieting
coremltools' progress bars.

What is quantized: every projection matrix (q/k/v/o, gate/up/down) at the requested precision;
the embedding table / LM head (one tensor when tied) at int8 per-channel for int8 and int4 (a 4-bit
LM head costs disproportionate quality); norms, biases and RoPE tables stay fp16.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from converters.mil_llama import INPUT_IDS, const_name

INT4_BLOCK = 32
EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


class QuantizationError(ValueError):
    """The weights cannot be quantized as asked; the message says which and why."""


def quantization_config(shapes: dict[str, tuple[int, ...]], precision: str):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    int8 = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                   granularity="per_channel", weight_threshold=0)
    names = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            continue
        if precision == "int8" or key in EMBEDDING_KEYS:
            names[const_name(key)] = int8
        else:
            names[const_name(key)] = OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int4", granularity="per_block",
                block_size=int4_block(shape[1]), weight_threshold=0)
    return OptimizationConfig(global_config=None, op_name_configs=names), set(names)


def int4_block(width: int) -> int:
    """INT4_BLOCK input channels per scale, or the largest divisor of ``width`` below it when
    ``width`` is not a multiple (blocks must tile the row; the toy's d_ff 336 takes 28)."""
    for block in range(INT4_BLOCK, 7, -1):
        if width % block == 0:
            return block
    raise QuantizationError(f"int4: input width {width} has no divisor between 8 and "
                            f"{INT4_BLOCK} to use as a block size; use --precision int8")


def check_quantized(mlmodel, expected: set[str]) -> bool:
    """Whether every matrix named in the config became a constexpr (the quantizer skips, with
    only a warning, a tensor it cannot handle)."""
    program = mlmodel._mil_program.functions["main"]
    return sum(op.op_type.startswith("constexpr_") for op in program.operations) == len(expected)


def weight_floor_bytes(shapes: dict[str, tuple[int, ...]], precision: str) -> int:
    """params × bytes per weight + fp16 scales: the smallest package these weights allow."""
    total = 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        if len(shape) != 2 or precision == "fp16":
            total += size * 2
            continue
        rows, cols = shape
        if precision == "int8" or key in EMBEDDING_KEYS:
            total += size + rows * 2
        else:
            total += (size + 1) // 2 + rows * (cols // int4_block(cols)) * 2
    return total


# The programs are built already fused and in fp16, so most of coremltools' ~90 default passes
# have nothing to do, yet each re-validates the whole program (most of the conversion time). Kept:
# cleanup, int16 gather indices (preferred by the ANE), and the state passes that put every
# coreml_update_state right after its slice_update (Core ML's in-place pattern).
# Left out on purpose: common::guard_negative_gather_indices (token ids are non-negative by
# contract; it adds greater_equal/add/select per gather) and common::remove_redundant_ops (in
# coremltools 9.0 it merges a read_state that follows a coreml_update_state into the earlier
# read_state, which silently reads the stale value).
PASSES = (
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


QUANTIZE_PASS = "compression::linear_quantize_weights"


def _pass_pipeline(quantization=None):
    """Our passes; with a quantization config, ct.optimize.coreml's weight quantizer runs first,
    inside the same conversion (``linear_quantize_weights`` on a converted model would convert the
    program a second time, through the default pipeline)."""
    import coremltools as ct

    names = ([QUANTIZE_PASS] if quantization is not None else []) + list(PASSES)
    pipeline = ct.PassPipeline(pass_names=names, pipeline_name="mlx_distill_export")
    if quantization is not None:
        pipeline.set_options(QUANTIZE_PASS, {"config": quantization})
    return pipeline


def convert(program, shapes: Sequence[int] | None, quantization=None):
    import coremltools as ct

    inputs = None
    if shapes is not None:
        # EnumeratedShapes needs two or more; one length makes the symbolic dim a fixed one.
        shape = (ct.EnumeratedShapes(shapes=[[1, s] for s in shapes], default=[1, shapes[0]])
                 if len(shapes) > 1 else (1, shapes[0]))
        inputs = [ct.TensorType(name=INPUT_IDS, shape=shape, dtype=np.int32)]
    return ct.convert(program, convert_to="mlprogram",
                      minimum_deployment_target=ct.target.iOS18,
                      compute_precision=ct.precision.FLOAT16, inputs=inputs,
                      pass_pipeline=_pass_pipeline(quantization))


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools draws a tqdm bar per pass pipeline and per quantization sweep; our stages
    print one line each instead."""
    import importlib

    import tqdm as _tqdm

    names = ("coremltools.converters.mil.mil.passes.pass_pipeline",
             "coremltools.optimize.coreml._quantization_passes",
             "coremltools.optimize.coreml._post_training_quantization")
    saved = []
    for name in names:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            if getattr(module, "tqdm", None) is _tqdm.tqdm:
                saved.append((module, module.tqdm))
                module.tqdm = functools.partial(_tqdm.tqdm, disable=True)
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def quantization_summary(precision: str) -> dict[str, Any]:
    if precision == "fp16":
        return {"weights": "fp16", "activations": "fp16"}
    projections = ("int8 per output channel, symmetric" if precision == "int8"
                   else f"int4 per block of {INT4_BLOCK} input channels (or the largest divisor "
                   "of the input width below it), symmetric")
    return {
        "activations": "fp16",
        "projections": projections + " (constexpr_blockwise_shift_scale)",
        "embedding_and_lm_head": "int8 per row (vocabulary entry), symmetric",
        "fp16": "norm weights, biases, RoPE tables",
    }
