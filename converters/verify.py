"""``mlx-distill verify-coreml PKG --against CKPT_DIR``: does an exported package compute what the
checkpoint computes in MLX?

For every enumerated prefill length: logits on random token ids and, when the checkpoint has a
tokenizer, on a fixed English text (tiled to the length); cosine similarity, max abs error and
top-1 agreement against MLX in float32. Then a prefill + greedy decode loop through the KV cache
state against MLX greedy generation. Gates (exit status 1 when one is missed) depend on the
package's precision (:data:`GATES`). On Linux the package runs in our numpy MIL interpreter, which
is not Core ML; on macOS, Core ML itself (``MLModel.predict``) by default.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.probe import (
    VerifyError,
    compare,
    cosine,
    make_runner,
    print_probe,
    run_probe,
)

# Reference logits whose top two are closer than this are ties at fp16 precision: either token is
# a correct answer, so top-1 agreement is counted over the other positions only. The same rule as
# tests/test_export.py: the fp16 logits' error on our models is ~0.01, at most ~0.1.
TIE_MARGIN = 0.1
DECODE_STEPS = 32
DECODE_PROMPT = 16
REAL_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by "
             "the sea, a girl named Lily found a shiny red ball in the sand and ran home to show "
             "her mother, who smiled and said it was the best thing she had seen all day.")


@dataclass(frozen=True)
class Gate:
    cosine: float  # logits (and probe hidden states) cosine similarity, at least
    top1: float | None  # top-1 agreement over decisive positions, at least (None: reported)
    decode_exact: bool  # greedy decode must equal MLX token for token


GATES = {
    "fp16": Gate(cosine=0.999, top1=0.99, decode_exact=True),
    "int8": Gate(cosine=0.995, top1=None, decode_exact=False),
    # 4-bit weights cost accuracy in proportion to how the network amplifies rounding noise:
    # ~0.99 on the trained toy, ~0.8 on random-init weights (MLX with the same weights fake-
    # quantized gives the same figure). Below 0.98 the package no longer reproduces the model;
    # --probe shows whether the loss builds up layer by layer (quantization) or jumps (a fault).
    "int4": Gate(cosine=0.98, top1=None, decode_exact=False),
}


# ---- metrics ----

def margins(logits) -> np.ndarray:
    top = np.sort(np.asarray(logits, np.float32), axis=-1)
    return top[..., -1] - top[..., -2]


def top1(got, want, tie_margin: float) -> tuple[float | None, int]:
    """(agreement over decisive positions or None when every position is a tie, count of
    decisive positions) of (S, V) logits against the reference ``want``."""
    decisive = margins(want) >= tie_margin
    if not decisive.any():
        return None, 0
    agree = np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)
    return float(agree[decisive].mean()), int(decisive.sum())


# ---- inputs and references ----

def read_contract(pkg: Path) -> dict[str, Any]:
    from converters.export import contract_path

    path = contract_path(pkg)
    if not pkg.is_dir():
        raise VerifyError(f"{pkg}: not a .mlpackage directory")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing; the contract written by export-coreml must lie "
                          "beside the package") from None
    except json.JSONDecodeError as exc:
        raise VerifyError(f"{path}: invalid JSON ({exc})") from None


def source_notes(contract: dict[str, Any], ckpt: Path) -> list[str]:
    """Differences between the checkpoint and what the package was exported from."""
    from mlx_distill.checkpoint import load_config, sha256_file

    config = load_config(ckpt).to_dict()
    if config != contract["model_config"]:
        field = next(k for k in sorted(set(config) | set(contract["model_config"]))
                     if config.get(k) != contract["model_config"].get(k))
        raise VerifyError(f"{ckpt}: model config differs from the package's ({field}: "
                          f"{config.get(field)!r} vs {contract['model_config'].get(field)!r})")
    recorded = contract.get("source", {}).get("weights_sha256") or {}
    notes = []
    for name, sha in recorded.items():
        path = ckpt / name
        if not path.exists() or sha256_file(path) != sha:
            notes.append(f"{name}: not the weights the package was exported from (sha256 "
                         "differs); the comparison measures that difference")
    return notes


def real_ids(ckpt: Path, vocab_size: int) -> tuple[np.ndarray | None, str]:
    """Token ids of :data:`REAL_TEXT` from the checkpoint's tokenizer, or None and why not."""
    if not (ckpt / "tokenizer.json").exists():
        return None, "no tokenizer.json in the checkpoint: random ids only"
    from mlx_distill.tokenizer import load_tokenizer

    ids = np.asarray(load_tokenizer(ckpt).encode(REAL_TEXT), np.int64)
    if ids.size == 0 or ids.max() >= vocab_size:
        return None, "the tokenizer's ids do not fit the model's vocabulary: random ids only"
    return ids, f"real ids: the checkpoint's tokenizer on a fixed text ({ids.size} tokens, tiled)"


def mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(np.asarray(ids))[None]).astype(mx.float32))[0]


def mlx_greedy(model, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """MLX greedy generation through its KV cache: tokens and each step's logits."""
    import mlx.core as mx

    cache = model.make_cache()
    logits = model(mx.array(prompt)[None], cache)[0, -1]
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(np.array(logits.astype(mx.float32)))
        tokens.append(int(np.argmax(step_logits[-1])))
        logits = model(mx.array([[tokens[-1]]]), cache)[0, -1]
    return tokens, step_logits


def package_greedy(runner, prompt: np.ndarray, length: int, steps: int
                   ) -> tuple[list[int], list[np.ndarray]]:
    """Prefill ``prompt`` padded to the enumerated ``length`` (padding lies past the prompt, where
    the causal mask and the decode writes make it harmless), then greedy decode via the state."""
    ids = np.zeros(length, np.int64)
    ids[:prompt.size] = prompt
    state = runner.new_state()
    out = runner.prefill(ids, state)
    logits = np.asarray(out[runner.names["logits"]][0, prompt.size - 1], np.float32)
    state = runner.handoff(state)
    tokens, step_logits = [], []
    for pos in range(prompt.size, prompt.size + steps):
        step_logits.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = runner.decode(tokens[-1], pos, state)
    return tokens, step_logits


# ---- the checks ----

def check_prefill(runner, model, length: int, kind: str, ids: np.ndarray, gate: Gate,
                  tie_margin: float) -> dict[str, Any]:
    got = np.asarray(runner.prefill(ids)[runner.names["logits"]][0], np.float32)
    want = mlx_logits(model, ids)
    row = {"function": "prefill", "length": length, "ids": kind, **compare(got, want,
                                                                          gate.cosine)}
    agreement, decisive = top1(got, want, tie_margin)
    row.update(top1=agreement, decisive=decisive, positions=length)
    if gate.top1 is not None and agreement is not None and agreement < gate.top1:
        row["passed"] = False
    return row


def check_decode(runner, model, prompt: np.ndarray, length: int, steps: int, gate: Gate,
                 tie_margin: float) -> dict[str, Any]:
    want, want_logits = mlx_greedy(model, prompt, steps)
    got, got_logits = package_greedy(runner, prompt, length, steps)
    mismatch = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    # Logits are comparable while both saw the same tokens: up to and including the mismatch.
    shared = steps if mismatch is None else mismatch + 1
    got_logits, want_logits = np.stack(got_logits[:shared]), np.stack(want_logits[:shared])
    pooled = compare(got_logits, want_logits, gate.cosine)  # as prefill's: all steps at once
    tie = mismatch is not None and float(margins(want_logits[mismatch])) < tie_margin
    tokens_ok = mismatch is None or tie or not gate.decode_exact
    return {
        "prompt_tokens": int(prompt.size), "prefill_length": length, "steps": steps,
        "mlx_tokens": want, "package_tokens": got,
        "equal_tokens": steps if mismatch is None else mismatch,
        "first_mismatch": mismatch, "mismatch_at_tie": tie,
        "compared_steps": shared, "cosine": pooled["cosine"],
        "max_abs_error": pooled["max_abs_error"],
        "min_step_cosine": round(min(cosine(a, b) for a, b in zip(got_logits, want_logits,
                                                                   strict=True)), 7),
        "passed": tokens_ok and pooled["passed"],
    }


def verify_package(pkg: str | Path, ckpt: str | Path, seed: int = 0, probe: bool = False,
                   backend: str = "auto", steps: int = DECODE_STEPS,
                   tie_margin: float = TIE_MARGIN) -> dict[str, Any]:
    """The verification report of ``pkg`` against ``ckpt`` (see the module doc)."""
    import mlx.core as mx

    from mlx_distill.checkpoint import load_checkpoint

    pkg, ckpt = Path(pkg), Path(ckpt)
    contract = read_contract(pkg)
    gate = GATES.get(contract["precision"])
    if gate is None:
        raise VerifyError(f"{pkg}: unknown precision {contract['precision']!r} in the contract")
    notes = source_notes(contract, ckpt)
    model = load_checkpoint(ckpt, dtype=mx.float32)  # a float32 reference, whatever is stored
    runner = make_runner(backend, pkg, dict(contract["names"]))
    vocab = contract["model_config"]["vocab_size"]
    rng = np.random.default_rng(seed)
    text_ids, text_note = real_ids(ckpt, vocab)
    notes.append(text_note)
    rows, row_ids = [], []
    for length in contract["prefill_shapes"]:
        inputs = [("random", rng.integers(0, vocab, length))]
        if text_ids is not None:
            inputs.append(("real", np.resize(text_ids, length)))
        for kind, ids in inputs:
            rows.append(check_prefill(runner, model, length, kind, ids, gate, tie_margin))
            row_ids.append(ids)

    shortest = min(contract["prefill_shapes"])
    steps = min(steps, contract["max_context"] - 1)
    prompt_len = max(1, min(DECODE_PROMPT, shortest, contract["max_context"] - steps))
    prompt = (np.resize(text_ids, prompt_len) if text_ids is not None
              else rng.integers(0, vocab, prompt_len))
    decode = check_decode(runner, model, prompt, shortest, steps, gate, tie_margin)
    decode["ids"] = "real" if text_ids is not None else "random"

    report = {
        "package": str(pkg), "checkpoint": str(ckpt), "runtime": runner.label,
        "precision": contract["precision"], "layout": contract["layout"],
        "gates": {**asdict(gate), "tie_margin": tie_margin},
        "tie_rule": f"top-1 counts positions where MLX's top-2 logit margin is >= {tie_margin}; "
                    "closer ones are ties at fp16 precision (either token is right). A decode "
                    "mismatch at such a step is a tie, not a failure.",
        "seed": seed, "notes": notes, "prefill": rows, "decode": decode, "probe": None,
    }
    failures = [f"prefill length {r['length']} ({r['ids']} ids)" for r in rows if not r["passed"]]
    if not decode["passed"]:
        failures.append("decode loop")
    report["failures"], report["passed"] = failures, not failures
    if probe:
        # On the first failing row's ids (the first row's when everything passed).
        failing = next((i for i, r in enumerate(rows) if not r["passed"]), 0)
        report["probe"] = _probe(pkg, contract, model, row_ids[failing], gate, backend, runner)
    return report


def _probe(pkg, contract, model, ids, gate: Gate, backend: str, runner) -> dict[str, Any]:
    def prefill_outputs(probe_pkg: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
        return make_runner(backend, probe_pkg, runner.names).prefill(ids)

    try:  # beside the package, so its weights can be hard-linked rather than copied
        work_dir = tempfile.TemporaryDirectory(prefix=".probe-", dir=pkg.parent)
    except OSError:  # a read-only directory
        work_dir = tempfile.TemporaryDirectory(prefix="mlx-distill-probe-")
    with work_dir as work:
        return run_probe(pkg, contract, model, ids, gate.cosine, prefill_outputs, Path(work),
                         mlx_logits(model, ids))


# ---- output ----

def print_report(report: dict[str, Any], say: Callable[[str], None] = print) -> None:
    gates = report["gates"]
    say(f"verify-coreml {report['package']}\n  against {report['checkpoint']} "
        f"(precision {report['precision']}, layout {report['layout']}, seed {report['seed']})")
    say(f"runtime: {report['runtime']}")
    top = f"top-1 >= {gates['top1']:.0%}" if gates["top1"] is not None else "top-1 reported"
    decode = "token for token" if gates["decode_exact"] else "reported"
    say(f"gates: cosine >= {gates['cosine']}, {top}, decode loop {decode}")
    say(f"tie rule: {report['tie_rule']}")
    for note in report["notes"]:
        say(f"note: {note}")
    say(f"\n{'function':<9} {'length':>6} {'ids':<7} {'cosine':>10} {'max|err|':>10} "
        f"{'top-1':>7} {'decisive':>9}  gate")
    for r in report["prefill"]:
        agree = f"{r['top1']:.1%}" if r["top1"] is not None else "n/a"
        say(f"{r['function']:<9} {r['length']:>6} {r['ids']:<7} {r['cosine']:>10.6f} "
            f"{r['max_abs_error']:>10.4g} {agree:>7} {r['decisive']:>4}/{r['positions']:<4}  "
            f"{'pass' if r['passed'] else 'FAIL'}")
    d = report["decode"]
    if d["first_mismatch"] is None:
        outcome = f"{d['steps']}/{d['steps']} tokens equal MLX greedy"
    else:
        outcome = (f"first {d['equal_tokens']} of {d['steps']} tokens equal; step "
                   f"{d['first_mismatch']} differs"
                   + (" at a near-tie (not a failure)" if d["mismatch_at_tie"] else ""))
    say(f"\ndecode loop: prompt {d['prompt_tokens']} tokens ({d['ids']} ids) prefilled at length "
        f"{d['prefill_length']}, {d['steps']} greedy steps through the state: {outcome}")
    say(f"  logits of the {d['compared_steps']} steps with equal context: cosine "
        f"{d['cosine']:.6f} (min per step {d['min_step_cosine']:.6f}), max|err| "
        f"{d['max_abs_error']:.4g}  {'pass' if d['passed'] else 'FAIL'}")
    if report["probe"] is not None:
        print_probe(report["probe"], say)
    if report["passed"]:
        say("\nresult: PASS")
    else:
        say("\nresult: FAIL (" + "; ".join(report["failures"]) + ")")
        if report["probe"] is None:
            say("rerun with --probe to find the first layer that diverges")


def _run(args) -> int:
    from converters.interpreter import MILLoadError
    from mlx_distill.cli import UserError

    try:
        report = verify_package(args.package, args.against, seed=args.seed, probe=args.probe,
                                backend=args.backend, steps=args.steps,
                                tie_margin=args.tie_margin)
    except (VerifyError, MILLoadError) as exc:  # ProbeError is a VerifyError
        raise UserError(str(exc)) from None
    print_report(report)
    if args.json:
        from mlx_distill.atomic import atomic_write_text

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify-coreml",
        help="compare an exported Core ML package with its checkpoint in MLX (exit 1 on a "
        "missed gate)",
        description=__doc__,
    )
    p.add_argument("package", help="the .mlpackage written by export-coreml (its "
                   "<name>.contract.json must lie beside it)")
    p.add_argument("--against", required=True, metavar="CKPT_DIR",
                   help="the checkpoint directory it was exported from")
    p.add_argument("--probe", action="store_true",
                   help="also compare per-layer hidden states (a probe copy of the package with "
                   "extra outputs) and name the first layer below the cosine gate")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--steps", type=_positive, default=DECODE_STEPS,
                   help=f"greedy decode steps (default {DECODE_STEPS})")
    p.add_argument("--tie-margin", type=float, default=TIE_MARGIN,
                   help=f"top-2 logit margin below which a position is a tie (default "
                   f"{TIE_MARGIN})")
    p.add_argument("--backend", choices=("auto", "interpreter", "coreml"), default="auto",
                   help="auto: Core ML on macOS, the MIL reference interpreter elsewhere")
    p.set_defaults(func=_run)
