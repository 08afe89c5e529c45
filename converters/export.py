"""``mlx-distill export-coreml``: a student checkpoint -> one stateful multifunction ``.mlpackage``.

The MIL program is built with coremltools' builder (``converters.mil_llama``), never through
torch. Stages: build (one program with the prefill and decode functions; weights are read one
tensor at a time from the checkpoint, ``converters.checkpoint_weights``, and converted to fp16 or
quantized as they are read, ``converters.mil_weights``), convert (the graph passes,
``converters.mil_convert``), check (static ANE checks, ``converters.ane_checks``; violations stop
the export), save (one package, shared weights stored once, plus ``<name>.contract.json`` and
``<name>.checks.json`` beside it). The checkpoint's sha256 is computed on a second thread
meanwhile (hashing is the slowest single step at 0.5B parameters on a machine without SHA
instructions), and checked before the package is moved into place.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from converters import ane_checks
from converters.checkpoint_weights import CheckpointWeights, load_numpy_weights
from converters.mil_convert import (
    blob_bytes,
    check_quantized,
    function_weight_bytes,
    run_passes,
    save_program,
    set_prefill_shapes,
)
from converters.mil_llama import (
    FUNCTIONS,
    INPUT_IDS,
    K_CACHE,
    LAYOUTS,
    LOGITS,
    POSITION,
    V_CACHE,
    GraphError,
    LlamaGraph,
)
from converters.mil_weights import (
    QuantizationError,
    check_quantizable,
    quantization_summary,
    weight_floor_bytes,
    weight_format,
)

__all__ = ["CheckpointWeights", "ExportError", "export_coreml", "load_numpy_weights"]

PRECISIONS = ("fp16", "int8", "int4")
TARGETS = ("ios16", "ios17", "ios18")
DEFAULT_SHAPES = (64, 128, 256)
CONTRACT_SCHEMA = 1
# A multifunction blob much larger than one function's means weights were stored twice.
SHARED_BLOB_SLACK = 1.10


class ExportError(ValueError):
    """The export cannot proceed; the message says which input or check and why."""


def contract_path(pkg: str | os.PathLike) -> Path:
    """``dir/name.mlpackage`` -> ``dir/name.contract.json`` (the runtime reads this)."""
    pkg = Path(pkg)
    return pkg.with_name(f"{pkg.stem}.contract.json")


def checks_path(pkg: str | os.PathLike) -> Path:
    pkg = Path(pkg)
    return pkg.with_name(f"{pkg.stem}.checks.json")


# ---- inputs ----

def _resolve_shapes(config, shapes, max_context, role) -> tuple[tuple[int, ...], int]:
    if role is not None:
        from mlx_distill.roles import load_roles

        roles = load_roles()
        if role not in roles:
            raise ExportError(f"--role: no role {role!r}; roles: {sorted(roles)}")
        coreml = roles[role].coreml
        shapes = shapes if shapes is not None else coreml.prefill_shapes
        max_context = max_context if max_context is not None else coreml.max_context
    if max_context is None:
        max_context = config.max_seq_len
    if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 1:
        raise ExportError(f"max_context: expected a positive integer, got {max_context!r}")
    if shapes is None:
        shapes = tuple(s for s in DEFAULT_SHAPES if s <= max_context) or (max_context,)
    shapes = tuple(shapes)
    if not shapes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shapes):
        raise ExportError(f"shapes: expected positive integers, got {list(shapes)}")
    if len(set(shapes)) != len(shapes):
        raise ExportError(f"shapes: duplicates in {list(shapes)}")
    too_long = [s for s in shapes if s > max_context]
    if too_long:
        raise ExportError(f"shapes: {too_long[0]} exceeds max_context {max_context} (the KV "
                          "cache cannot hold a prefill chunk that long)")
    return tuple(sorted(shapes)), max_context


def _check_options(precision: str, layout: str, target: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if layout not in LAYOUTS:
        raise ExportError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if target not in TARGETS:
        raise ExportError(f"target: expected one of {TARGETS}, got {target!r}")
    if target != "ios18":
        raise ExportError(
            f"target {target}: the package needs iOS18/macOS15 features: the stateful KV cache "
            "(read_state/coreml_update_state), multifunction packages (prefill + decode) and "
            "constexpr_blockwise_shift_scale weights; use --target ios18"
        )


def source_hashes(ckpt_dir: Path) -> dict[str, Any]:
    from mlx_distill.checkpoint import META_FILE, sha256_file

    meta_path = ckpt_dir / META_FILE
    recorded = None
    if meta_path.exists():
        with contextlib.suppress(ValueError, OSError):
            recorded = json.loads(meta_path.read_text()).get("weights_sha256")
    files = sorted(ckpt_dir.glob("model*.safetensors"))
    weights = {f.name: sha256_file(f) for f in files}
    if recorded and len(files) == 1 and weights[files[0].name] != recorded:
        raise ExportError(f"{files[0]}: sha256 does not match {META_FILE} (file changed?)")
    tokenizer = ckpt_dir / "tokenizer.json"
    return {
        "weights_sha256": weights,
        "tokenizer_sha256": sha256_file(tokenizer) if tokenizer.exists() else None,
    }


class _Stages:
    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str):
        if self.progress:
            self.progress(f"[{name}] {what} ...")
        start = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        if self.progress:
            self.progress(f"[{name}] done in {time.perf_counter() - start:.1f} s")


def _describe(pkg: Path) -> dict[str, Any]:
    from converters.interpreter.package import describe_functions, locate_model_files, read_spec

    spec = read_spec(locate_model_files(pkg)[0])

    def tensor(d):
        out = {"name": d.name, "dtype": str(d.dtype), "shape": list(d.shape)}
        if d.enumerated:
            out["enumerated_shapes"] = [list(s) for s in d.enumerated]
        return out

    return {
        name: {"inputs": [tensor(d) for d in f.inputs], "outputs": [tensor(d) for d in f.outputs],
               "states": [tensor(d) for d in f.states]}
        for name, f in describe_functions(spec).items()
    }


def export_coreml(
    ckpt_dir: str | os.PathLike,
    out_pkg: str | os.PathLike,
    precision: str = "fp16",
    shapes: Sequence[int] | None = None,
    max_context: int | None = None,
    layout: str = "linear",
    target: str = "ios18",
    allow_non_ane: bool = False,
    role: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export ``ckpt_dir`` to ``out_pkg`` (a ``.mlpackage``) and write its contract and check
    report beside it. ``shapes``: prefill lengths (default: the role's, else 64/128/256 up to
    ``max_context``); ``max_context``: KV cache length (default: the role's, else the model's
    ``max_seq_len``). Raises ExportError (static check violations included, unless
    ``allow_non_ane``). The package is moved into place whole, after any old contract is removed,
    and the new contract is written last: a contract beside a package always describes it."""
    import coremltools as ct

    ckpt_dir, out_pkg = Path(ckpt_dir), Path(out_pkg)
    if out_pkg.suffix != ".mlpackage":
        raise ExportError(f"{out_pkg}: the output must be a .mlpackage path")
    _check_options(precision, layout, target)
    out_pkg.parent.mkdir(parents=True, exist_ok=True)
    stage = _Stages(progress)
    started = time.perf_counter()

    from mlx_distill.checkpoint import load_config

    shapes, max_context = _resolve_shapes(load_config(ckpt_dir), shapes, max_context, role)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hashing = pool.submit(source_hashes, ckpt_dir)
        try:
            what = "read weights, build the prefill and decode functions" + (
                f", quantize weights to {precision}" if precision != "fp16" else "")
            with stage("build", what):
                config, weights = load_numpy_weights(ckpt_dir)
                check_quantizable(weights.shapes, precision)
                graph = LlamaGraph(config, weights, layout=layout, max_context=max_context,
                                   precision=precision)
                program = graph.program(FUNCTIONS)
                set_prefill_shapes(program.functions["prefill"], shapes)
                weight_shapes, cache_shape = weights.shapes, graph.cache_shape()
                del weights, graph  # the program holds the only copy of the weights now
        except (QuantizationError, GraphError) as exc:
            raise ExportError(str(exc)) from None
        # Both functions use every weight; each quantized one through one constexpr.
        quantized = sum(weight_format(k, v, precision) is not None
                        for k, v in weight_shapes.items())

        with stage("convert", "graph passes"):
            run_passes(program)
            for name, function in program.functions.items():
                if not check_quantized(function, quantized):
                    raise ExportError(f"{name}: not every weight matrix was quantized to "
                                      f"{precision}")

        with stage("check", "static ANE checks"):
            report = ane_checks.check_programs(dict(program.functions),
                                               allow_non_ane=allow_non_ane)
            violations = [v for f in report["functions"].values() for v in f["violations"]]
            if violations and not allow_non_ane:
                listed = "; ".join(ane_checks.describe_violation(v) for v in violations[:5])
                more = f" (+{len(violations) - 5} more)" if len(violations) > 5 else ""
                raise ExportError(f"static ANE checks failed: {listed}{more}; pass "
                                  "--allow-non-ane to export anyway")

        with stage("save", f"multifunction package {out_pkg.name}"), \
                tempfile.TemporaryDirectory(prefix=".export-", dir=out_pkg.parent) as work:
            single = {name: function_weight_bytes(f) for name, f in program.functions.items()}
            staged = save_program(program, Path(work) / out_pkg.name)
            del program
            blob = blob_bytes(staged)
            if blob > SHARED_BLOB_SLACK * max(single.values()):
                raise ExportError(f"weights stored more than once: package blob {blob} bytes, "
                                  f"single functions {single}")
            functions = _describe(staged)
            hashes = hashing.result()
            contract_path(out_pkg).unlink(missing_ok=True)
            _replace_dir(staged, out_pkg)

    floor = weight_floor_bytes(weight_shapes, precision)
    contract = {
        "schema": CONTRACT_SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "package": out_pkg.name,
        "functions": functions,
        "default_function": FUNCTIONS[0],
        "names": {"input_ids": INPUT_IDS, "position": POSITION, "logits": LOGITS,
                  "k_cache": K_CACHE, "v_cache": V_CACHE},
        "prefill_shapes": list(shapes),
        "max_context": max_context,
        "cache": {
            "shape": list(cache_shape),
            "axes": (["layer", "kv_head", "d_head", "position"] if layout == "ane"
                     else ["layer", "kv_head", "position", "d_head"]),
            "dtype": "float16",
            "semantics": "prefill writes positions [0, S) and attends causally within its chunk; "
                         "decode writes slot pos (0 <= pos < max_context), then attends over "
                         "slots 0..pos (later slots are masked, so stale or padded entries there "
                         "are harmless). Both functions declare the same states: one state object "
                         "serves a prefill followed by decode calls",
        },
        "precision": precision,
        "quantization": quantization_summary(precision),
        "layout": layout,
        "target": target,
        "source": {"checkpoint": str(ckpt_dir.resolve()), **hashes},
        "coremltools_version": ct.__version__,
        "model_config": config.to_dict(),
        "static_checks": {"passed": report["passed"], "allow_non_ane": allow_non_ane,
                          "report": checks_path(out_pkg).name},
        "sizes": {"weight_blob_bytes": blob, "single_function_blob_bytes": single,
                  "floor_bytes": floor, "blob_over_floor": round(blob / floor, 4),
                  # not parameters, so not in the floor: fp16 cos/sin tables of max_context rows
                  "rope_table_bytes": 2 * max_context * config.d_head},
        "export_seconds": {**{k: round(v, 2) for k, v in stage.times.items()},
                           "total": round(time.perf_counter() - started, 2)},
    }
    from mlx_distill.atomic import atomic_write_text

    atomic_write_text(checks_path(out_pkg), json.dumps(report, indent=2) + "\n")
    atomic_write_text(contract_path(out_pkg), json.dumps(contract, indent=2) + "\n")
    return out_pkg


def _replace_dir(src: Path, target: Path) -> None:
    """Move ``src`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.rmtree(staged)
    shutil.move(str(src), str(staged))
    old = target.with_name(f".{target.name}.old") if target.exists() else None
    if old is not None:
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- command line ----

def _int_list(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one length")
    return values


def _run(args) -> int:
    import sys

    from mlx_distill.cli import UserError

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        pkg = export_coreml(args.ckpt_dir, args.out, precision=args.precision, shapes=args.shapes,
                            max_context=args.max_context, layout=args.layout, target=args.target,
                            allow_non_ane=args.allow_non_ane, role=args.role, progress=say)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    contract = json.loads(contract_path(pkg).read_text())
    sizes = contract["sizes"]
    print(f"wrote {pkg} in {contract['export_seconds']['total']} s: weights "
          f"{sizes['weight_blob_bytes'] / 1e6:.2f} MB = {sizes['blob_over_floor']:.3f}x the "
          f"floor of {sizes['floor_bytes'] / 1e6:.2f} MB (RoPE tables "
          f"{sizes['rope_table_bytes'] / 1e6:.2f} MB on top)")
    print(f"contract {contract_path(pkg)}; checks {checks_path(pkg)} "
          f"({'passed' if contract['static_checks']['passed'] else 'VIOLATIONS, allowed'})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-coreml",
        help="export a checkpoint to a stateful Core ML package (prefill + decode)",
        description="Build the student as MIL programs (no torch) and save one multifunction "
        ".mlpackage with a prefill function (enumerated prompt lengths) and a decode function "
        "(one token, KV cache in Core ML state), plus <name>.contract.json and "
        "<name>.checks.json beside it.",
    )
    p.add_argument("ckpt_dir", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="output .mlpackage path")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="weight precision (activations are fp16 in every case)")
    p.add_argument("--shapes", type=_int_list, default=None,
                   help="prefill lengths, e.g. 64,128,256 (default: the role's, else 64,128,256)")
    p.add_argument("--layout", choices=LAYOUTS, default="linear",
                   help="linear: (1, S, C) matmul form; ane: (1, C, 1, S) conv form")
    p.add_argument("--role", default=None, help="take shapes and max context from "
                   "configs/roles.yaml")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache length (default: the role's, else the model's max_seq_len)")
    p.add_argument("--target", choices=TARGETS, default="ios18", help="minimum deployment target")
    p.add_argument("--allow-non-ane", action="store_true",
                   help="export even when static ANE checks find violations")
    p.set_defaults(func=_run)
