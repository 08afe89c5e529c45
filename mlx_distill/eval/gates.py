"""Gates (``configs/gates.yaml``): thresholds on an eval run's headline metrics, per task, in named
profiles. Loading checks every field; :func:`check_gates` judges one backend's metrics."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.config import ConfigError, configs_dir, read_yaml
from mlx_distill.eval.dataset import TASKS

PERF_METRICS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms",
                "decode_tps")
HEALTH_METRICS = ("shapes_ok", "logits_ok")
TASK_METRICS = {
    "toolcall": ("lax_f1", "strict_f1", "strict_precision", "strict_recall", "exact_accuracy",
                 "json_validity", "controls_with_call", "privacy_ok_rate", "fixture_hit_rate",
                 "final_answer_accuracy"),
    "eightball": ("accuracy", "privacy_ok_rate"),
}
BOUNDS = ("min", "max", "equals")
PROFILE_KEYS = (*TASKS, "baseline", "role_targets")
BASELINE_KEYS = ("quality_tolerance", "perf_tolerance", "fail")


@dataclass(frozen=True)
class Gate:
    metric: str
    bound: str  # min | max | equals
    value: Any

    def describe(self) -> str:
        sign = {"min": ">=", "max": "<=", "equals": "=="}[self.bound]
        return f"{self.metric} {sign} {_fmt(self.value)}"


@dataclass(frozen=True)
class BaselinePolicy:
    quality_tolerance: float = 0.02
    perf_tolerance: float = 0.10
    fail: bool = True


@dataclass(frozen=True)
class GateProfile:
    name: str
    source: str
    gates: dict[str, tuple[Gate, ...]]  # task -> gates
    baseline: BaselinePolicy
    enforce_role_targets: bool

    def for_task(self, task: str) -> tuple[Gate, ...]:
        return self.gates.get(task, ())

    def needs_health(self, task: str) -> bool:
        return any(g.metric in HEALTH_METRICS for g in self.for_task(task))


def default_gates_path() -> Path:
    return configs_dir() / "gates.yaml"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _number(value: Any, where: str) -> float:
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return value


def _parse_gate(task: str, metric: Any, spec: Any, where: str) -> Gate:
    allowed = TASK_METRICS[task] + PERF_METRICS + HEALTH_METRICS
    if metric not in allowed:
        raise ConfigError(f"{where}: unknown metric; expected one of {list(allowed)}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in BOUNDS:
        raise ConfigError(f"{where}: expected exactly one of {{min: X}}, {{max: X}}, "
                          "{equals: X}")
    bound, value = next(iter(spec.items()))
    if metric in HEALTH_METRICS:
        if bound != "equals" or not isinstance(value, bool):
            raise ConfigError(f"{where}: expected {{equals: true}} or {{equals: false}}")
    elif bound != "equals":
        value = _number(value, f"{where}.{bound}")
    return Gate(metric, bound, value)


def _parse_baseline(data: Any, where: str) -> BaselinePolicy:
    if data is None:
        return BaselinePolicy()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(BASELINE_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in BASELINE_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of "
                          f"{list(BASELINE_KEYS)}")
    policy = BaselinePolicy()
    tolerances = {}
    for key in ("quality_tolerance", "perf_tolerance"):
        value = _number(data.get(key, getattr(policy, key)), f"{where}.{key}")
        if value < 0:
            raise ConfigError(f"{where}.{key}: expected a number >= 0, got {value!r}")
        tolerances[key] = float(value)
    fail = data.get("fail", policy.fail)
    if not isinstance(fail, bool):
        raise ConfigError(f"{where}.fail: expected true or false")
    return BaselinePolicy(fail=fail, **tolerances)


def _parse_role_targets(data: Any, where: str) -> bool:
    if data is None:
        return False
    if not isinstance(data, dict) or set(data) - {"enforce"}:
        raise ConfigError(f"{where}: expected {{enforce: true|false}}")
    enforce = data.get("enforce", False)
    if not isinstance(enforce, bool):
        raise ConfigError(f"{where}.enforce: expected true or false")
    return enforce


def load_profile(path: str | os.PathLike | None = None, profile: str = "default") -> GateProfile:
    """The named profile of a gates file (default ``configs/gates.yaml``); ConfigError naming the
    file and field on any problem."""
    path = Path(path) if path is not None else default_gates_path()
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile name to gates")
    profiles = data["profiles"]
    if profile not in profiles:
        raise ConfigError(f"{path}: profiles.{profile}: no such profile; expected one of "
                          f"{sorted(map(str, profiles))}")
    where = f"{path}: profiles.{profile}"
    body = profiles[profile]
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: expected a mapping with keys among {list(PROFILE_KEYS)}")
    unknown = sorted(str(k) for k in body if k not in PROFILE_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of "
                          f"{list(PROFILE_KEYS)}")
    gates = {}
    for task in TASKS:
        specs = body.get(task) or {}
        if not isinstance(specs, dict):
            raise ConfigError(f"{where}.{task}: expected a mapping of metric to bound")
        gates[task] = tuple(_parse_gate(task, metric, spec, f"{where}.{task}.{metric}")
                            for metric, spec in specs.items())
    return GateProfile(
        name=profile, source=str(path), gates=gates,
        baseline=_parse_baseline(body.get("baseline"), f"{where}.baseline"),
        enforce_role_targets=_parse_role_targets(body.get("role_targets"),
                                                 f"{where}.role_targets"),
    )


def _passes(gate: Gate, value: Any) -> bool:
    if isinstance(gate.value, bool) or isinstance(value, bool):
        # true is not 1 here: a health flag only equals a flag.
        return gate.bound == "equals" and value is gate.value
    if isinstance(value, float) and math.isnan(value):
        return False
    if gate.bound == "equals":
        return value == gate.value
    return value >= gate.value if gate.bound == "min" else value <= gate.value


def check_gates(gates: tuple[Gate, ...], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per gate: ``status`` is ``pass``, ``fail`` or ``n/a`` (metric not measured)."""
    verdicts = []
    for gate in gates:
        value = metrics.get(gate.metric)
        status = "n/a" if value is None else ("pass" if _passes(gate, value) else "fail")
        verdicts.append({"metric": gate.metric, "bound": gate.bound, "threshold": gate.value,
                         "gate": gate.describe(), "value": value, "status": status})
    return verdicts


def all_passed(verdicts: list[dict[str, Any]]) -> bool:
    return all(v["status"] != "fail" for v in verdicts)
