"""Fingerprints that pin what an eval measured: sha256 of the dataset, fixtures, tool registry,
model weights and tokenizer, plus the git commit and package versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlx_distill.checkpoint import git_sha, sha256_file
from mlx_distill.teacher.types import canonical_json

PACKAGES = ("mlx", "mlx-lm", "coremltools", "numpy", "tokenizers", "llguidance", "xgrammar")
# Where a Core ML package keeps its weight blob(s).
COREML_WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"


def tool_registry(samples: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every distinct tool definition the samples offer, in order of first appearance."""
    seen: dict[str, dict[str, Any]] = {}
    for sample in samples:
        for tool in sample.get("tools") or []:
            seen.setdefault(canonical_json(tool), tool)
    return list(seen.values())


def tool_registry_sha256(samples: Iterable[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of :func:`tool_registry` (the same tools in the same order
    give the same digest however the files spelled them)."""
    text = canonical_json(tool_registry(samples))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    return {
        "git_sha": git_sha(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }


def data_fingerprints(data_path: str | os.PathLike, fixture_paths: Iterable[str | os.PathLike],
                      samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {
        "dataset": str(data_path),
        "dataset_sha256": sha256_file(data_path),
        "fixtures_sha256": {str(p): sha256_file(p) for p in fixture_paths},
        "tool_registry_sha256": tool_registry_sha256(samples),
    }


def _digests(files: Iterable[Path], root: Path) -> dict[str, str]:
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in sorted(files)}


def weight_files(kind: str, location: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, files) holding a model's weights: a checkpoint's ``model*.safetensors`` or a Core ML
    package's weight blobs; no files for a remote endpoint."""
    root = Path(location)
    if kind == "mlx":
        return root, sorted(root.glob("model*.safetensors"))
    if kind == "coreml":
        weights = root / COREML_WEIGHTS_DIR
        return root, sorted(f for f in weights.glob("*") if f.is_file())
    return root, []


def model_fingerprints(kind: str, location: str | os.PathLike,
                       tokenizer_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """sha256 per weight file (paths relative to the model), their total size in bytes, and the
    tokenizer's sha256 (``tokenizer_file``, else the model directory's ``tokenizer.json``)."""
    root, files = weight_files(kind, location)
    if tokenizer_file is None and kind == "mlx" and (root / "tokenizer.json").is_file():
        tokenizer_file = root / "tokenizer.json"
    return {
        "weights_sha256": _digests(files, root) if files else None,
        "weight_bytes": sum(f.stat().st_size for f in files) if files else None,
        "tokenizer": str(tokenizer_file) if tokenizer_file else None,
        "tokenizer_sha256": sha256_file(tokenizer_file) if tokenizer_file else None,
    }
