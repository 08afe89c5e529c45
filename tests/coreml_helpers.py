"""Build and save small Core ML programs for interpreter tests (coremltools runs on Linux for
building and saving; only execution needs macOS, which our interpreter replaces)."""

from __future__ import annotations

from pathlib import Path

import coremltools as ct

NO_CONST_FOLDING = ct.PassPipeline.DEFAULT
NO_CONST_FOLDING.remove_passes({"common::const_elimination"})


def save_program(prog, path: Path, target=ct.target.iOS18, fp32: bool = True, inputs=None,
                 keep_consts: bool = True) -> Path:
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT32 if fp32 else ct.precision.FLOAT16,
        inputs=inputs,
        pass_pipeline=NO_CONST_FOLDING if keep_consts else None,
    )
    model.save(str(path))
    return path
