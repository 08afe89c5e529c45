"""Static Neural Engine checks of MIL programs, run by the exporter before it saves a package.

Apple does not publish which MIL ops the Neural Engine runs; Core ML decides per op when it
compiles the model on the device (``MLComputePlan`` reports the outcome, on macOS only). What can
be checked on any machine is whether a program stays inside what the ANE is known to handle:

- no int64 tensor anywhere (the ANE has no 64-bit integers; Core ML moves such ops to the CPU);
- every op in :data:`ANE_ELIGIBLE_OPS`, the one list of ops we treat as ANE-eligible, each with
  the reason and a source from :data:`SOURCES`;
- tensor rank <= 5 (ANE buffers are at most 5-D);
- fp16 compute: no fp32/fp64 float tensor (the ANE computes in fp16; an fp32 op runs elsewhere).

Passing these checks is eligibility, not placement: measured residency needs macOS
(``MLComputePlan``). Dimensions above :data:`LARGE_DIM` are reported as warnings only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

SOURCES = {
    "ane-transformers": "https://github.com/apple/ml-ane-transformers (reference Transformer for "
    "the ANE: (B, C, 1, S) layout, 1x1 conv projections, per-head split attention)",
    "ane-article": "https://machinelearning.apple.com/research/neural-engine-transformers "
    "(Apple, 'Deploying Transformers on the Apple Neural Engine', 2022)",
    "llama-coreml": "https://machinelearning.apple.com/research/core-ml-on-device-llama (Apple, "
    "'On Device Llama 3.1 with Core ML', 2024: stateful KV cache via read_state/slice_update/"
    "coreml_update_state, block-wise int4 weights)",
    "coremltools-stateful": "https://apple.github.io/coremltools/docs-guides/source/"
    "stateful-models.html (state ops, iOS18)",
    "coremltools-quant": "https://apple.github.io/coremltools/docs-guides/source/"
    "opt-quantization-overview.html (weight-only constexpr quantization, fp16 activations)",
    "hollance": "https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md"
    " (community notes: gather historically falls back to the CPU)",
}

_ELEMENTWISE = "elementwise fp16 op; the ANE's vector unit runs it (ane-transformers, ane-article)"
_LAYOUT = "data movement on a static or enumerated shape (ane-transformers)"
_INDEX = ("integer index/shape arithmetic on a handful of values; Core ML may place it on the CPU "
          "at no measurable cost")

# op type -> (why it is accepted, source keys). The one place the exporter's list is kept.
ANE_ELIGIBLE_OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "const": ("constant data", ()),
    "conv": ("1x1 conv on (B, C, 1, S): the ANE's native matmul form",
             ("ane-transformers", "ane-article")),
    "linear": ("matmul with constant weights", ("llama-coreml",)),
    "matmul": ("batched matmul; the ANE reference uses it for per-head attention (einsum)",
               ("ane-transformers",)),
    "softmax": ("attention softmax", ("ane-transformers",)),
    "layer_norm": ("normalization; RMSNorm is layer_norm over [x, -x] here", ("ane-article",)),
    "silu": ("activation", ("ane-article",)),
    "sigmoid": ("activation", ("ane-article",)),
    "gelu": ("activation", ("ane-article",)),
    "relu": ("activation", ("ane-article",)),
    "add": (_ELEMENTWISE, ("ane-transformers",)),
    "sub": (_ELEMENTWISE, ("ane-transformers",)),
    "mul": (_ELEMENTWISE, ("ane-transformers",)),
    "real_div": (_ELEMENTWISE, ("ane-transformers",)),
    "rsqrt": (_ELEMENTWISE, ("ane-transformers",)),
    "sqrt": (_ELEMENTWISE, ("ane-transformers",)),
    "reduce_mean": ("reduction over channels (LayerNormANE)", ("ane-transformers",)),
    "reduce_sum": ("reduction over channels", ("ane-transformers",)),
    "less_equal": ("comparison building the attention mask", ("llama-coreml",)),
    "select": ("mask application", ("llama-coreml",)),
    "reshape": (_LAYOUT, ("ane-transformers",)),
    "transpose": (_LAYOUT, ("ane-transformers",)),
    "squeeze": (_LAYOUT, ("ane-transformers",)),
    "expand_dims": (_LAYOUT, ("ane-transformers",)),
    "concat": (_LAYOUT, ("ane-transformers",)),
    "split": ("per-head split of q/k/v (ane-transformers' split attention)",
              ("ane-transformers",)),
    "slice_by_index": (_LAYOUT, ("ane-transformers",)),
    "tile": ("repeats the attention mask over a KV group", ("ane-transformers",)),
    "gather": ("embedding and RoPE-table lookup: O(S·C) data at the graph input; may run on the "
               "CPU (hollance), which costs one transfer, not a split of the network",
               ("hollance", "llama-coreml")),
    "cast": ("bool mask -> fp16, index casts; no int64 involved", ("llama-coreml",)),
    "shape": (_INDEX, ()),
    "range_1d": (_INDEX, ()),
    "read_state": ("KV cache state read", ("llama-coreml", "coremltools-stateful")),
    "coreml_update_state": ("KV cache state write", ("llama-coreml", "coremltools-stateful")),
    "slice_update": ("in-place KV cache update at a dynamic position", ("llama-coreml",)),
    "scaled_dot_product_attention": ("fused attention (iOS18)", ("llama-coreml",)),
    "constexpr_blockwise_shift_scale": ("weight-only int8/int4 dequantization (iOS18)",
                                        ("coremltools-quant", "llama-coreml")),
    "constexpr_affine_dequantize": ("weight-only int8 dequantization (iOS16)",
                                    ("coremltools-quant",)),
}

MAX_RANK = 5
LARGE_DIM = 16384  # reported per-axis limit of ANE buffers; a warning, not a failure


def _is_float(dtype) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_float(dtype)


def _var_problems(var) -> list[str]:
    from coremltools.converters.mil.mil import types

    sym = var.sym_type
    if types.is_state(sym):
        sym = sym.wrapped_type()
    if not (types.is_tensor(sym) or types.is_scalar(sym)):
        return []
    dtype = sym.get_primitive() if types.is_tensor(sym) else sym
    problems = []
    if dtype in (types.int64, types.uint64):
        problems.append(f"int64 tensor {var.name!r}: the ANE has no 64-bit integers")
    if _is_float(dtype) and dtype != types.fp16:
        problems.append(f"{types.builtin_to_string(dtype)} tensor {var.name!r}: not fp16 compute")
    rank = len(sym.get_shape()) if types.is_tensor(sym) else 0
    if rank > MAX_RANK:
        problems.append(f"tensor {var.name!r} has rank {rank} > {MAX_RANK}")
    return problems


def _large_dims(var) -> list[int]:
    from coremltools.converters.mil.mil import types

    if not types.is_tensor(var.sym_type):
        return []
    return [d for d in var.sym_type.get_shape() if isinstance(d, int) and d > LARGE_DIM]


def check_function(function, function_name: str) -> dict[str, Any]:
    """Violations and warnings of one pymil function (its inputs, every op and op output)."""
    violations: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    ops: Counter = Counter()

    def add(kind: list, op_name: str, op_type: str, reason: str) -> None:
        kind.append({"function": function_name, "op": op_name, "op_type": op_type,
                     "reason": reason})

    for name, var in function.inputs.items():
        for problem in _var_problems(var):
            add(violations, name, "input", problem)

    def walk(block):
        for operation in block.operations:
            ops[operation.op_type] += 1
            if operation.op_type not in ANE_ELIGIBLE_OPS:
                add(violations, operation.name, operation.op_type,
                    "op type is not in converters.ane_checks.ANE_ELIGIBLE_OPS")
            for out in operation.outputs:
                for problem in _var_problems(out):
                    add(violations, operation.name, operation.op_type, problem)
                large = _large_dims(out)
                if large and operation.op_type != "const":
                    add(warnings, operation.name, operation.op_type,
                        f"dimension {max(large)} > {LARGE_DIM}: may exceed ANE buffer limits "
                        "(consider splitting, e.g. the LM head over the vocabulary)")
            for inner in operation.blocks:
                walk(inner)

    walk(function)
    return {"ops": dict(sorted(ops.items())), "violations": violations, "warnings": warnings}


def check_programs(functions: dict[str, Any], allow_non_ane: bool = False) -> dict[str, Any]:
    """The JSON report for ``{function name: pymil Function}``; ``passed`` is False when any
    violation was found (``allow_non_ane`` only records that the caller accepts that)."""
    per_function = {name: check_function(fn, name) for name, fn in functions.items()}
    violations = [v for report in per_function.values() for v in report["violations"]]
    return {
        "passed": not violations,
        "allow_non_ane": allow_non_ane,
        "rules": {
            "no_int64": True,
            "max_rank": MAX_RANK,
            "fp16_compute": True,
            "eligible_ops": "converters.ane_checks.ANE_ELIGIBLE_OPS",
        },
        "functions": per_function,
        "sources": SOURCES,
        "note": "static eligibility only; measured ANE residency needs macOS (MLComputePlan)",
    }


def describe_violation(v: dict[str, str]) -> str:
    return f"function {v['function']!r}, op {v['op']!r} ({v['op_type']}): {v['reason']}"
