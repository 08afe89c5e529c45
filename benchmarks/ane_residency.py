"""Neural Engine residency of an exported package, per function.

On macOS: compiles the package, loads Core ML's ``MLComputePlan`` and reports, per function, the
cost-weighted share of ops whose *preferred* device is the Neural Engine (each op's cost is
``MLComputePlan``'s estimated share of the function's work), plus the costliest ops placed
elsewhere.

Elsewhere (Linux): Core ML cannot load a compute plan, so nothing is measured. The script prints
the static ANE-eligibility report of ``converters.ane_checks`` for the package as saved (op list,
rank, int64, fp16 rules) and says that measured residency needs macOS. Eligibility is not
placement: no residency figure is estimated from it.

    .venv/bin/python benchmarks/ane_residency.py [PKG] [--layout ane|linear] [--precision fp16]
        [--compute-units ALL|CPU_AND_NE] [--json OUT]

Without PKG a toy checkpoint (random weights) is exported to a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import mlx_distill  # noqa: F401  (must precede mlx.core: interposes OpenBLAS on Linux)

# isort: split
from converters import ane_checks

# Eligible ops that ane_checks notes Core ML may still place on the CPU: gather (embedding / RoPE
# lookups) and integer shape arithmetic.
MAY_RUN_ON_CPU = ("gather", "shape", "range_1d")
NOT_MEASURED = ("measured ANE residency needs macOS (Core ML's MLComputePlan); it was not "
                "measured here, and no figure is estimated from the static checks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", help="an exported .mlpackage (default: export a "
                        "toy checkpoint with random weights to a temporary directory)")
    parser.add_argument("--layout", choices=("ane", "linear"), default="ane",
                        help="layout of the toy export (ignored with PKG)")
    parser.add_argument("--precision", choices=("fp16", "int8", "int4"), default="fp16",
                        help="precision of the toy export (ignored with PKG)")
    parser.add_argument("--compute-units", default="ALL", choices=("ALL", "CPU_AND_NE"),
                        help="compute units of the compute plan (macOS)")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    return parser.parse_args(argv)


def export_toy(root: Path, layout: str, precision: str) -> Path:
    from converters.export import export_coreml
    from mlx_distill.checkpoint import save_checkpoint
    from mlx_distill.config import load_size_config
    from mlx_distill.model import Model

    model = Model(load_size_config("toy").model)
    ckpt = save_checkpoint(model, root / "toy-ckpt")
    return export_coreml(ckpt, root / f"toy-{layout}-{precision}.mlpackage", precision=precision,
                         layout=layout)


# ---- static (any platform) ----

def static_report(pkg: Path) -> dict[str, Any]:
    """ane_checks on the package as saved (read back from disk, quantized weights included)."""
    from converters.interpreter import load_mlpackage

    model = load_mlpackage(pkg)
    report = ane_checks.check_programs(
        {name: model.program.functions[name] for name in model.function_names})
    functions = {}
    for name, checked in report["functions"].items():
        ops = {op: n for op, n in checked["ops"].items() if op != "const"}
        eligible = sum(n for op, n in ops.items() if op in ane_checks.ANE_ELIGIBLE_OPS)
        functions[name] = {
            "ops": ops, "op_count": sum(ops.values()), "eligible_op_count": eligible,
            "violations": checked["violations"], "warnings": checked["warnings"],
            "may_run_elsewhere": {op: n for op, n in ops.items() if op in MAY_RUN_ON_CPU},
        }
    return {"passed": report["passed"], "functions": functions, "rules": report["rules"]}


def print_static(pkg: Path, report: dict[str, Any]) -> None:
    print(f"static ANE-eligibility report of {pkg} (converters.ane_checks on the saved package)")
    rules = report["rules"]
    print(f"rules: no int64, rank <= {rules['max_rank']}, fp16 compute, ops in "
          f"{rules['eligible_ops']} (each with its source)")
    print(f"\n{'function':<9} {'ops':>5} {'eligible':>9} {'violations':>11} {'warnings':>9}  "
          "may run on the CPU")
    for name, f in report["functions"].items():
        elsewhere = ", ".join(f"{op} {n}" for op, n in f["may_run_elsewhere"].items()) or "-"
        print(f"{name:<9} {f['op_count']:>5} {f['eligible_op_count']:>9} "
              f"{len(f['violations']):>11} {len(f['warnings']):>9}  {elsewhere}")
        for v in f["violations"][:10]:
            print(f"  violation: {ane_checks.describe_violation(v)}")
        for w in f["warnings"][:5]:
            print(f"  warning: {ane_checks.describe_violation(w)}")
    print(f"\nstatic checks: {'passed' if report['passed'] else 'VIOLATIONS'}")


# ---- measured (macOS) ----

def _operations(block):  # pragma: macos
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def measured_residency(pkg: Path, compute_units: str) -> dict[str, Any]:  # pragma: macos
    """Per function: cost-weighted share of ops whose preferred device is the Neural Engine."""
    import coremltools as ct
    from coremltools.models.compute_device import (
        MLCPUComputeDevice,
        MLGPUComputeDevice,
        MLNeuralEngineComputeDevice,
    )
    from coremltools.models.compute_plan import MLComputePlan
    from coremltools.models.utils import compile_model

    kinds = ((MLNeuralEngineComputeDevice, "ANE"), (MLGPUComputeDevice, "GPU"),
             (MLCPUComputeDevice, "CPU"))

    def device_name(device) -> str:
        return next((label for cls, label in kinds if isinstance(device, cls)),
                    type(device).__name__)

    with tempfile.TemporaryDirectory(prefix="ane-residency-") as work:
        compiled = compile_model(str(pkg), str(Path(work) / "model.mlmodelc"))
        plan = MLComputePlan.load_from_path(path=compiled,
                                            compute_units=getattr(ct.ComputeUnit, compute_units))
        program = plan.model_structure.program
        if program is None:
            raise SystemExit(f"{pkg}: not an ML Program")
        functions = {}
        for name, function in program.functions.items():
            cost: dict[str, float] = defaultdict(float)
            count: Counter = Counter()
            elsewhere = []
            for op in _operations(function.block):
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                if usage is None:  # consts and other ops Core ML does not schedule
                    continue
                estimate = plan.get_estimated_cost_for_mlprogram_operation(op)
                device = device_name(usage.preferred_compute_device)
                weight = estimate.weight if estimate is not None else 0.0
                cost[device] += weight
                count[device] += 1
                if device != "ANE":
                    elsewhere.append((weight, op.operator_name, device))
            total = sum(cost.values())
            functions[name] = {
                "ane_cost_share": cost["ANE"] / total if total else None,
                "cost_by_device": dict(cost), "ops_by_device": dict(count),
                "costliest_elsewhere": [{"op": op, "device": dev, "cost": w}
                                        for w, op, dev in sorted(elsewhere, reverse=True)[:5]],
            }
    return {"compute_units": compute_units, "functions": functions}


def print_measured(report: dict[str, Any]) -> None:  # pragma: macos
    print(f"\nmeasured by MLComputePlan (compute units {report['compute_units']}): preferred "
          "device per op, weighted by Core ML's estimated cost")
    print(f"{'function':<9} {'ANE share':>10}  ops by device")
    for name, f in report["functions"].items():
        share = f"{f['ane_cost_share']:.1%}" if f["ane_cost_share"] is not None else "n/a"
        ops = ", ".join(f"{d} {n}" for d, n in sorted(f["ops_by_device"].items()))
        print(f"{name:<9} {share:>10}  {ops}")
        for row in f["costliest_elsewhere"]:
            print(f"  not on the ANE: {row['op']} on {row['device']} (cost {row['cost']:.2%})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ane-residency-") as work:
        if args.package:
            pkg = Path(args.package)
        else:
            print(f"exporting a toy checkpoint (random weights), layout {args.layout}, "
                  f"{args.precision} ...", file=sys.stderr)
            pkg = export_toy(Path(work), args.layout, args.precision)
        result: dict[str, Any] = {"package": str(pkg), "static": static_report(pkg)}
        print_static(pkg, result["static"])
        if sys.platform == "darwin":  # pragma: macos
            result["measured"] = measured_residency(pkg, args.compute_units)
            print_measured(result["measured"])
        else:
            result["measured"] = None
            result["not_measured"] = NOT_MEASURED
            print(f"\n{NOT_MEASURED}.")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
