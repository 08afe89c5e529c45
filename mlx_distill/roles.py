"""Deployment roles (``configs/roles.yaml``): which size serves each role, its contexts, Core ML
export shapes and performance targets. Loading validates everything against the size configs, so a
role that a size cannot serve fails here, with the file and field named, not at export time."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.config import ConfigError, SizeConfig, configs_dir, load_size_config, read_yaml

ROLE_KEYS = ("size", "contexts", "coreml", "targets")
COREML_KEYS = ("prefill_shapes", "max_context")
TARGET_KEYS = ("latency_p50_ms", "latency_p95_ms", "decode_tps")


@dataclass(frozen=True)
class CoreMLExport:
    prefill_shapes: tuple[int, ...]
    max_context: int


@dataclass(frozen=True)
class Targets:
    latency_p50_ms: float
    latency_p95_ms: float
    decode_tps: float


@dataclass(frozen=True)
class Role:
    name: str
    size: SizeConfig
    contexts: tuple[int, ...]
    coreml: CoreMLExport
    targets: Targets


def default_roles_path() -> Path:
    return configs_dir() / "roles.yaml"


def check_keys(data: Any, where: str, required: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` must be a mapping with every ``required`` key and nothing outside both lists."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(required)}")
    allowed = required + optional
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of {list(allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    return data


def positive_int(value: Any, where: str) -> int:
    # bool is an int subclass: `true` in YAML must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def positive_number(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of positive integers")
    return tuple(positive_int(v, f"{where}[{i}]") for i, v in enumerate(value))


def load_size(name: Any, where: str) -> SizeConfig:
    """A size config by name; the error names the role field that referred to it."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise ConfigError(f"{where}: expected a size config name, got {name!r}")
    if not (configs_dir() / "sizes" / f"{name}.yaml").exists():
        available = sorted(p.stem for p in (configs_dir() / "sizes").glob("*.yaml"))
        raise ConfigError(f"{where}: no size config named {name!r}; sizes: {available}")
    return load_size_config(name)


# (size name, where it is referred to) -> SizeConfig; lets model-info substitute a config file.
SizeLookup = Callable[[Any, str], SizeConfig]


def _parse_role(name: str, data: Any, where: str, sizes: SizeLookup) -> Role:
    check_keys(data, where, ROLE_KEYS)
    size = sizes(data["size"], f"{where}.size")
    max_seq = size.model.max_seq_len
    contexts = int_list(data["contexts"], f"{where}.contexts")

    coreml_data = check_keys(data["coreml"], f"{where}.coreml", COREML_KEYS)
    max_context = positive_int(coreml_data["max_context"], f"{where}.coreml.max_context")
    shapes = int_list(coreml_data["prefill_shapes"], f"{where}.coreml.prefill_shapes")
    if max_context > max_seq:
        raise ConfigError(f"{where}.coreml.max_context: {max_context} exceeds size {size.name}'s "
                          f"max_seq_len {max_seq}")
    for i, shape in enumerate(shapes):
        if shape > max_context:
            raise ConfigError(f"{where}.coreml.prefill_shapes[{i}]: {shape} exceeds "
                              f"coreml.max_context {max_context}")
    for i, ctx in enumerate(contexts):
        if ctx > max_seq:
            raise ConfigError(f"{where}.contexts[{i}]: {ctx} exceeds size {size.name}'s "
                              f"max_seq_len {max_seq}")
        # The exported model's KV cache must hold every context the role is served at.
        if ctx > max_context:
            raise ConfigError(f"{where}.contexts[{i}]: {ctx} exceeds coreml.max_context "
                              f"{max_context}")

    targets_data = check_keys(data["targets"], f"{where}.targets", TARGET_KEYS)
    targets = Targets(*(positive_number(targets_data[k], f"{where}.targets.{k}")
                        for k in TARGET_KEYS))
    if targets.latency_p50_ms > targets.latency_p95_ms:
        raise ConfigError(f"{where}.targets.latency_p50_ms: {targets.latency_p50_ms:g} is above "
                          f"latency_p95_ms {targets.latency_p95_ms:g}")
    return Role(name, size, contexts, CoreMLExport(shapes, max_context), targets)


def load_roles(path: str | os.PathLike | None = None,
               sizes: SizeLookup = load_size) -> dict[str, Role]:
    """Parse and validate a roles file (default ``configs/roles.yaml``); ConfigError on problems.

    ``sizes`` resolves the roles' size names (default: ``configs/sizes/<name>.yaml``)."""
    path = Path(path) if path is not None else default_roles_path()
    data = check_keys(read_yaml(path), str(path), ("roles",))
    roles_data = data["roles"]
    if not isinstance(roles_data, dict) or not roles_data:
        raise ConfigError(f"{path}: roles: expected a mapping of role name to role")
    roles = {str(name): _parse_role(str(name), body, f"{path}: roles.{name}", sizes)
             for name, body in roles_data.items()}
    # Speculative decoding compares token ids: the drafter must speak the worker's vocabulary.
    if "worker" in roles and "drafter" in roles:
        worker_vocab = roles["worker"].size.model.vocab_size
        drafter_vocab = roles["drafter"].size.model.vocab_size
        if worker_vocab != drafter_vocab:
            raise ConfigError(f"{path}: roles.drafter.size: vocab_size {drafter_vocab} differs "
                              f"from the worker's {worker_vocab}; speculative decoding needs one")
    return roles
