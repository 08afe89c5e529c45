"""The Core ML backend: an exported ``.mlpackage`` driven by its ``<stem>.contract.json``.

A request runs ``prefill`` once, at the smallest enumerated length that holds the prompt: the ids
are right-padded, and since prefill attends causally, padding after the prompt changes nothing at
the prompt's positions; the next-token logits are at index ``len - 1``. The KV state then holds
padding entries from ``len`` on; ``decode`` starts at ``pos = len``, writes slot ``pos`` before it
attends, and masks slots after ``pos`` (the contract's ``cache.semantics``), so they are never
read. A prompt longer than the largest enumerated length is prefilled at that length and its
remaining tokens go through ``decode`` one by one (the exported prefill always starts at position
0, so it cannot be chunked). Prompt plus answer must fit ``max_context``.

On macOS the package runs in Core ML itself; elsewhere in the numpy MIL interpreter
(``converters.interpreter``), labelled ``coreml-reference (MIL interpreter; not Core ML)`` in
every result, so interpreter timings are never reported as Core ML or Neural Engine figures.
Sampling is numpy's (``numpy.random.default_rng(seed)``) on float32 copies of the fp16 logits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.runtime.base import LocalBackend
from mlx_distill.runtime.types import BackendError, Sampling

REFERENCE_LABEL = "coreml-reference (MIL interpreter; not Core ML)"
COREML_LABEL = "coreml"
RUNTIMES = ("auto", "coreml", "interpreter")
CONTRACT_KEYS = ("functions", "names", "prefill_shapes", "max_context", "model_config")


def read_contract(package: Path) -> dict[str, Any]:
    """The package's contract, checked for the fields the backend relies on."""
    from converters.probe import VerifyError
    from converters.verify import read_contract as read

    try:
        contract = read(package)
    except VerifyError as exc:
        raise BackendError(str(exc)) from None
    from converters.export import contract_path

    where = contract_path(package)
    if not isinstance(contract, dict):
        raise BackendError(f"{where}: expected a JSON object")
    missing = [k for k in CONTRACT_KEYS if k not in contract]
    if missing:
        raise BackendError(f"{where}: {missing[0]}: required field is missing")
    shapes = contract["prefill_shapes"]
    if not isinstance(shapes, list) or not shapes or not all(
            isinstance(s, int) and s > 0 for s in shapes):
        raise BackendError(f"{where}: prefill_shapes: expected positive integers, got {shapes!r}")
    if not isinstance(contract["max_context"], int) or contract["max_context"] < max(shapes):
        raise BackendError(f"{where}: max_context: expected an integer >= the largest prefill "
                           f"shape, got {contract['max_context']!r}")
    vocab = (contract["model_config"] or {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise BackendError(f"{where}: model_config.vocab_size: expected a positive integer, "
                           f"got {vocab!r}")
    missing = [f for f in ("prefill", "decode") if f not in contract["functions"]]
    if missing:
        raise BackendError(f"{where}: functions: no {missing[0]!r} function")
    return contract


def tokenizer_dir(package: Path, contract: dict[str, Any],
                  tokenizer: str | os.PathLike | None) -> Path:
    """``tokenizer`` when given, else the checkpoint the package was exported from (the
    contract's ``source.checkpoint``). Its ``tokenizer.json`` must be the one exported with,
    when the contract recorded that one's sha256."""
    from converters.export import contract_path
    from mlx_distill.checkpoint import sha256_file

    source = contract.get("source") or {}
    if tokenizer is not None:
        path = Path(tokenizer)
    elif source.get("checkpoint"):
        path = Path(source["checkpoint"])
        if not path.is_dir():
            raise BackendError(f"{contract_path(package)}: source.checkpoint {path} no longer "
                               "exists; pass the tokenizer directory (coreml:PKG#TOKENIZER_DIR)")
    else:
        raise BackendError(f"{contract_path(package)}: names no source checkpoint; pass the "
                           "tokenizer directory (coreml:PKG#TOKENIZER_DIR)")
    recorded = source.get("tokenizer_sha256")
    tokenizer_json = path / "tokenizer.json"
    if recorded and tokenizer_json.is_file() and sha256_file(tokenizer_json) != recorded:
        raise BackendError(f"{tokenizer_json}: not the tokenizer {package.name} was exported with "
                           f"(sha256 differs from {contract_path(package).name})")
    return path


def sample(logits: np.ndarray, allowed: np.ndarray | None, sampling: Sampling,
           rng: np.random.Generator) -> tuple[int, float]:
    """(token, its logprob under the raw logits): greedy at temperature 0, else drawn from the
    tempered distribution restricted to ``allowed``, the top-k and the top-p nucleus."""
    logits = np.asarray(logits, np.float64)
    top = logits.max()
    logprobs = logits - top - np.log(np.exp(logits - top).sum())
    scores = logprobs if allowed is None else np.where(allowed, logprobs, -np.inf)
    if sampling.temperature == 0:
        token = int(np.argmax(scores))
        return token, float(logprobs[token])
    scores = scores / sampling.temperature
    if 0 < sampling.top_k < scores.size:
        kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        # The smallest set of most likely tokens whose probability reaches top_p (at least one).
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        kept = np.zeros_like(probs)
        keep = order[before < sampling.top_p]
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    token = int(rng.choice(probs.size, p=probs))
    return token, float(logprobs[token])


class CoreMLBackend(LocalBackend):
    """An exported package. ``runtime``: "auto" (Core ML on macOS, the interpreter elsewhere),
    "coreml" or "interpreter"; ``tokenizer``: see :func:`tokenizer_dir`."""

    def __init__(self, package: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 runtime: str = "auto"):
        from mlx_distill.tokenizer import load_tokenizer

        if runtime not in RUNTIMES:
            raise BackendError(f"runtime: expected one of {RUNTIMES}, got {runtime!r}")
        self.package = Path(package)
        if self.package.suffix != ".mlpackage":
            raise BackendError(f"{self.package}: expected a .mlpackage path")
        self.contract = read_contract(self.package)
        vocab = self.contract["model_config"].get("vocab_size")
        tok = load_tokenizer(tokenizer_dir(self.package, self.contract, tokenizer))
        if runtime == "auto":
            runtime = "coreml" if sys.platform == "darwin" else "interpreter"
        if runtime == "coreml" and sys.platform != "darwin":
            raise BackendError("runtime 'coreml': Core ML runs on macOS only; elsewhere use "
                               "'interpreter' (the MIL reference interpreter)")
        label = REFERENCE_LABEL if runtime == "interpreter" else COREML_LABEL
        super().__init__(tok, vocab, f"{label} ({self.package.name})")
        self.runtime = runtime
        self.names = dict(self.contract["names"])
        self.shapes = sorted(self.contract["prefill_shapes"])
        self.max_context = self.contract["max_context"]
        pad = getattr(tok, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
        self.runner = self._load_runner()

    def _load_runner(self):
        from converters.interpreter import MILLoadError
        from converters.probe import InterpreterRunner, VerifyError

        try:
            if self.runtime == "interpreter":
                return InterpreterRunner(self.package, self.names)
            return self._load_coreml()  # pragma: macos
        except (MILLoadError, VerifyError) as exc:
            raise BackendError(str(exc)) from None

    def _load_coreml(self):  # pragma: macos
        # MLModel(..., function_name=...) per function; MLState handed from prefill to decode.
        from converters.probe import CoreMLRunner

        return CoreMLRunner(self.package, self.names)

    def _check_prompt(self, prompt_ids) -> list[int]:
        ids = super()._check_prompt(prompt_ids)
        if len(ids) > self.max_context:
            raise BackendError(f"prompt has {len(ids)} tokens; {self.package.name} holds at most "
                               f"{self.max_context} (max_context in its contract)")
        return ids

    def _room(self, prompt_tokens: int) -> int:
        # The first token comes from prefill; each later one needs its predecessor's cache slot.
        return self.max_context - prompt_tokens + 1

    def prefill_length(self, prompt_tokens: int) -> int:
        """The enumerated length a prompt this long is prefilled at."""
        return next((s for s in self.shapes if s >= prompt_tokens), self.shapes[-1])

    def _prompt_notes(self, prompt_tokens: int) -> list[str]:
        length = self.prefill_length(prompt_tokens)
        if prompt_tokens <= length:
            return [f"prefill at enumerated length {length} ({length - prompt_tokens} padding "
                    "tokens)"]
        return [f"prefill at enumerated length {length}, then {prompt_tokens - length} prompt "
                "tokens through decode (prompt longer than the largest enumerated length)"]

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, Any]:
        """Logits after the whole prompt, and the state ready for decode at ``len(ids)``."""
        length = self.prefill_length(len(ids))
        head = ids[:length]
        padded = np.full(length, self.pad_id, np.int64)
        padded[:len(head)] = head
        state = self.runner.new_state()
        out = self.runner.prefill(padded, state)
        logits = np.asarray(out[self.names["logits"]][0, len(head) - 1], np.float32)
        state = self.runner.handoff(state)
        for pos in range(len(head), len(ids)):
            logits = self.runner.decode(ids[pos], pos, state)
        return logits, state

    def _tokens(self, ids: list[int], sampling: Sampling, mask: Any,
                limit: int) -> Iterator[tuple[int, float]]:
        rng = np.random.default_rng(sampling.seed)
        logits, state = self._prefill(ids)
        for n, pos in enumerate(range(len(ids), len(ids) + limit), start=1):
            token, logprob = sample(logits, mask.allowed() if mask is not None else None,
                                    sampling, rng)
            if mask is not None:
                mask.advance(token)
            yield token, logprob
            if n == limit:
                return
            logits = self.runner.decode(token, pos, state)
