"""Running an exported package for ``verify-coreml`` (the MIL reference interpreter anywhere,
Core ML on macOS), the comparison metrics, and ``--probe``: the first layer where a saved package
departs from MLX.

The probe build is a copy of the saved package (weights hard-linked, never rewritten) whose
``prefill`` function also returns the residual stream after the embeddings and after every decoder
layer. The exporter names those values (``mil_llama.EMBEDDINGS``, ``mil_llama.hidden_state_name``);
the probe only lists them as extra block outputs and describes them in the model description, so
it runs the package's exact program and weights: a corrupted weight blob shows up, and so does an
export bug. MLX computes the same hidden states by running our ``Model`` one layer at a time.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters.mil_llama import EMBEDDINGS, LOGITS, hidden_state_name

INTERPRETER_LABEL = "MIL reference interpreter (numpy), not Core ML"
COREML_LABEL = "Core ML (MLModel.predict, compute units ALL)"


class VerifyError(ValueError):
    """The package and checkpoint cannot be compared; the message says why."""


class ProbeError(VerifyError):
    """The package cannot be probed; the message says why."""


# ---- metrics ----

def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def compare(got, want, cosine_gate: float) -> dict[str, Any]:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        raise VerifyError(f"package output shape {got.shape} != MLX shape {want.shape}")
    cos = cosine(got, want)
    finite = bool(np.all(np.isfinite(got)))
    return {"cosine": round(cos, 7), "max_abs_error": float(np.max(np.abs(got - want))),
            "passed": finite and cos >= cosine_gate}


# ---- running a package ----

class _Runner:
    """Prefill and decode calls of one package; ``handoff`` turns the state a prefill wrote into
    one the decode function accepts."""

    label = ""

    def __init__(self, prefill, decode, names: dict[str, str]):
        self._prefill, self._decode, self.names = prefill, decode, names

    def new_state(self):
        return self._prefill.make_state()

    def handoff(self, state):
        return state

    def prefill(self, ids: np.ndarray, state=None) -> dict[str, np.ndarray]:
        state = state if state is not None else self.new_state()
        return self._predict(self._prefill, {self.names["input_ids"]: ids[None].astype(np.int32)},
                             state)

    def decode(self, token: int, pos: int, state) -> np.ndarray:
        out = self._predict(self._decode, {self.names["input_ids"]: np.array([[token]], np.int32),
                                           self.names["position"]: np.array([pos], np.int32)},
                            state)
        return np.asarray(out[self.names["logits"]][0, 0], np.float32)

    @staticmethod
    def _predict(function, inputs, state):
        return function.predict(inputs, state)


class InterpreterRunner(_Runner):
    """``converters.interpreter`` (any platform); one MILState serves both functions, which
    declare the same states."""

    label = INTERPRETER_LABEL

    def __init__(self, pkg: Path, names: dict[str, str]):
        from converters.interpreter import load_mlpackage

        prefill = load_mlpackage(pkg, function_name="prefill")
        super().__init__(prefill, prefill.with_function("decode"), names)


class CoreMLRunner(_Runner):  # pragma: macos
    """Core ML itself (macOS only)."""

    label = COREML_LABEL

    def __init__(self, pkg: Path, names: dict[str, str]):
        import coremltools as ct

        def load(function):
            return ct.models.MLModel(str(pkg), function_name=function,
                                     compute_units=ct.ComputeUnit.ALL)

        super().__init__(load("prefill"), load("decode"), names)

    def handoff(self, state):
        # An MLState belongs to the model that made it: copy the cache into a decode state.
        decode_state = self._decode.make_state()
        for key in ("k_cache", "v_cache"):
            decode_state.write_state(self.names[key], state.read_state(self.names[key]))
        return decode_state

    @staticmethod
    def _predict(function, inputs, state):
        return function.predict(inputs, state=state)


def make_runner(backend: str, pkg: Path, names: dict[str, str]):
    if backend == "auto":
        backend = "coreml" if sys.platform == "darwin" else "interpreter"
    if backend == "interpreter":
        return InterpreterRunner(pkg, names)
    if sys.platform != "darwin":
        raise VerifyError("--backend coreml: Core ML execution needs macOS; on this platform the "
                          "package runs in the MIL reference interpreter (--backend interpreter)")
    return CoreMLRunner(pkg, names)  # pragma: macos


# ---- the probe ----

PROBE_FUNCTION = "prefill"
# coremltools' add_int16_cast pass replaces a gather that has int32 indices by a new op named
# "<name>_cast_uint16" or "<name>_cast_int16" (linear layout, vocabularies within 16 bits).
_RENAMED_SUFFIXES = ("_cast_uint16", "_cast_int16")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link weight blobs (they can be gigabytes and are only read); copy anything else, so
    rewriting the spec of the copy never touches the original."""
    if Path(src).parent.name == "weights":
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copy2(src, dst)


def _produced_names(block) -> set[str]:
    return {out.name for operation in block.operations for out in operation.outputs}


def _resolve(name: str, produced: set[str]) -> str | None:
    if name in produced:
        return name
    for suffix in _RENAMED_SUFFIXES:
        if name + suffix in produced:
            return name + suffix
    return None


def build_probe_package(pkg: str | os.PathLike, out_pkg: str | os.PathLike,
                        n_layers: int) -> list[tuple[str, str]]:
    """Write the probe copy of ``pkg`` to ``out_pkg``; returns (label, output name) per probe
    point, in network order: embeddings, layer 0 .. n_layers - 1."""
    from converters.interpreter.package import locate_model_files, read_spec

    spec_file, _ = locate_model_files(pkg)
    spec = read_spec(spec_file)
    if PROBE_FUNCTION not in spec.mlProgram.functions:
        raise ProbeError(f"{pkg}: no {PROBE_FUNCTION!r} function to probe")
    function = spec.mlProgram.functions[PROBE_FUNCTION]
    wanted = [("embeddings", EMBEDDINGS)] + [
        (f"layer {i}", hidden_state_name(i)) for i in range(n_layers)]
    points: list[tuple[str, str]] | None = None
    for block in function.block_specializations.values():
        produced = _produced_names(block)
        resolved = [(label, _resolve(name, produced)) for label, name in wanted]
        missing = [name for (label, name), (_, got) in zip(wanted, resolved, strict=True)
                   if got is None]
        if missing:
            raise ProbeError(
                f"{pkg}: function {PROBE_FUNCTION!r} has no value named {missing[0]!r}; the probe "
                "needs the named hidden states of a package exported by this version of "
                "mlx-distill export-coreml (re-export it)")
        points = [(label, name) for label, name in resolved]
        block.outputs.extend(name for _, name in points if name not in block.outputs)
    description = next((f for f in spec.description.functions if f.name == PROBE_FUNCTION),
                       None)
    if description is None or points is None:
        raise ProbeError(f"{pkg}: the model description has no {PROBE_FUNCTION!r} function")
    template = next((o for o in description.output if o.name == LOGITS), None)
    if template is None:
        raise ProbeError(f"{pkg}: function {PROBE_FUNCTION!r} has no {LOGITS!r} output")
    for _, name in points:
        feature = description.output.add()
        feature.CopyFrom(template)  # fp16 multi-array, shape left flexible like the logits'
        feature.name = name
        del feature.type.multiArrayType.shape[:]
    out_pkg = Path(out_pkg)
    if out_pkg.exists():
        shutil.rmtree(out_pkg)
    shutil.copytree(pkg, out_pkg, copy_function=_link_or_copy)
    out_spec = out_pkg / spec_file.relative_to(Path(pkg))
    out_spec.unlink()  # a fresh file: never write through to the original
    out_spec.write_bytes(spec.SerializeToString())
    return points


def channels_last(value: np.ndarray, layout: str) -> np.ndarray:
    """A probe output as (S, C) float32: (1, S, C) linear, (1, C, 1, S) ane."""
    value = np.asarray(value, np.float32)
    return value[0, :, 0, :].T if layout == "ane" else value[0]


def mlx_hidden_states(model, ids: np.ndarray) -> list[np.ndarray]:
    """MLX's residual stream for ``ids`` (S,), (S, C) float32 each: the embeddings, then after
    each decoder layer (the layers of ``mlx_distill.model.Decoder`` called one by one)."""
    import mlx.core as mx

    h = model.model.embed_tokens(mx.array(np.asarray(ids))[None])
    mask = "causal" if h.shape[1] > 1 else None
    states = [h]
    for layer in model.model.layers:
        h = layer(h, mask)
        states.append(h)
    return [np.array(s[0].astype(mx.float32)) for s in states]


def run_probe(pkg: Path, contract: dict[str, Any], model, ids: np.ndarray, gate: float,
              prefill_outputs: Callable[[Path, np.ndarray], dict[str, np.ndarray]],
              workdir: Path, reference_logits: np.ndarray) -> dict[str, Any]:
    """Compare the probe build's hidden states with MLX's on ``ids`` (an enumerated length).

    ``prefill_outputs(pkg, ids)`` runs a package's prefill (interpreter or Core ML) and returns
    every output. The first point whose cosine is below ``gate`` is named; when every hidden
    state passes but the logits do not, the final norm + LM head is.
    """
    layout = contract["layout"]
    probe_pkg = workdir / "probe.mlpackage"
    points = build_probe_package(pkg, probe_pkg, contract["model_config"]["n_layers"])
    outputs = prefill_outputs(probe_pkg, ids)
    reference = mlx_hidden_states(model, ids)
    rows = []
    for (label, name), want in zip(points, reference, strict=True):
        got = channels_last(outputs[name], layout)
        rows.append({"point": label, "output": name, **compare(got, want, gate)})
    head = compare(np.asarray(outputs[LOGITS][0], np.float32), reference_logits, gate)
    rows.append({"point": "final norm + lm head", "output": LOGITS, **head})
    first = next((row["point"] for row in rows if not row["passed"]), None)
    return {"function": PROBE_FUNCTION, "length": int(len(ids)), "cosine_gate": gate,
            "points": rows, "first_divergence": first}


def print_probe(probe: dict[str, Any], say: Callable[[str], None]) -> None:
    say(f"\nprobe: hidden states of {probe['function']} (length {probe['length']}) vs MLX, "
        f"gate cosine >= {probe['cosine_gate']}")
    say(f"  {'point':<22} {'cosine':>10} {'max|err|':>10}")
    for row in probe["points"]:
        mark = "" if row["passed"] else "  <- below the gate"
        say(f"  {row['point']:<22} {row['cosine']:>10.6f} {row['max_abs_error']:>10.4g}{mark}")
    first = probe["first_divergence"]
    if first is None:
        first = "none (every probe point passes)"
    elif first.startswith("layer "):
        first += f" (model.layers.{first.split()[1]}: its attention or MLP)"
    say(f"  first divergence: {first}")
