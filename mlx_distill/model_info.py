"""Exact sizes of a student config and whether its deployments fit their memory budgets.

``mlx-distill model-info CONFIG`` prints the exact parameter count, the weight bytes at fp16 /
int8 / int4, the KV-cache bytes per token, the roles the size serves and, for every machine in
``configs/memory_budgets.yaml`` that deploys it, whether the whole deployment fits.

Memory units are binary throughout: GB = GiB = 2**30 bytes, MB = MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlx_distill.config import (
    ConfigError,
    ModelConfig,
    SizeConfig,
    configs_dir,
    load_size_config,
    read_yaml,
)
from mlx_distill.roles import (
    Role,
    SizeLookup,
    check_keys,
    default_roles_path,
    load_roles,
    load_size,
    positive_int,
    positive_number,
)

MIB, GIB = 2**20, 2**30
INT4_BLOCK = 32  # int4 weights share one fp16 scale per 32 consecutive inputs
WEIGHTS_TOLERANCE = 0.01  # stated weights_mb_int8 may be rounded, by at most 1%
EVICTION_POLICIES = ("lru", "drop-oldest-session", "none")
DEPLOYED_KEYS = ("role", "size", "precision", "weights_mb_int8", "kv_bytes_per_token",
                 "max_context", "max_concurrent_sessions", "eviction")


# ---- sizes of one config ----

@lru_cache(maxsize=64)
def _parameter_shapes(config: ModelConfig) -> tuple[tuple[int, ...], ...]:
    # MLX arrays are lazy: building the model records the initialisers without running them, so
    # even the 9b config is counted in milliseconds with no weight memory allocated.
    from mlx.utils import tree_flatten

    from mlx_distill.model import Model

    return tuple(tuple(p.shape) for _, p in tree_flatten(Model(config).parameters()))


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count of ``Model(config)`` (tied embeddings counted once)."""
    return sum(math.prod(shape) for shape in _parameter_shapes(config))


def weight_bytes(config: ModelConfig) -> dict[str, int]:
    """Bytes of the weights at each precision.

    - ``fp16``: 2 bytes per parameter.
    - ``int8``: symmetric per-output-channel quantisation of every 2-D matrix (embedding,
      q/k/v/o, gate/up/down, lm_head when untied): 1 byte per weight plus one fp16 scale per
      output row. Norm weights and biases stay fp16 (2 bytes).
    - ``int4``: 0.5 byte per matrix weight (rounded up per matrix) plus one fp16 scale per block
      of 32 along the input dimension of each row; norms and biases fp16.

    A matrix's rows are its first axis (``nn.Linear`` stores ``[out, in]``; the embedding
    ``[vocab, d_model]`` is also the tied lm_head's ``[out, in]``).
    """
    fp16 = int8 = int4 = 0
    for shape in _parameter_shapes(config):
        n = math.prod(shape)
        fp16 += 2 * n
        if len(shape) == 2:
            rows, cols = shape
            int8 += n + 2 * rows
            int4 += (n + 1) // 2 + 2 * rows * math.ceil(cols / INT4_BLOCK)
        else:
            int8 += 2 * n
            int4 += 2 * n
    return {"fp16": fp16, "int8": int8, "int4": int4}


def kv_bytes_per_token(config: ModelConfig) -> int:
    """fp16 K and V for every layer: 2 · layers · kv_heads · d_head · 2 bytes."""
    return config.kv_bytes_per_token


# ---- memory budgets (configs/memory_budgets.yaml) ----

@dataclass(frozen=True)
class Deployed:
    """One model resident on a machine; the numbers are as stated in the budget file."""

    role: str
    size: str
    precision: str
    weights_mb_int8: float
    kv_bytes_per_token: int
    max_context: int
    max_concurrent_sessions: int
    eviction: str
    where: str = field(default="", compare=False)  # "file: hardware.X.models[i]" for messages


@dataclass(frozen=True)
class Hardware:
    name: str
    unified_memory_gb: float
    usable_fraction: float
    models: tuple[Deployed, ...]
    notes: str = ""

    @property
    def usable_bytes(self) -> int:
        return int(self.unified_memory_gb * GIB * self.usable_fraction)


def default_budgets_path() -> Path:
    return configs_dir() / "memory_budgets.yaml"


def _parse_deployed(data: Any, where: str) -> Deployed:
    check_keys(data, where, DEPLOYED_KEYS)
    for key in ("role", "size"):
        if not isinstance(data[key], str) or not data[key]:
            raise ConfigError(f"{where}.{key}: expected a name, got {data[key]!r}")
    if data["precision"] != "int8":
        raise ConfigError(f"{where}.precision: only int8 deployments are budgeted, "
                          f"got {data['precision']!r}")
    if data["eviction"] not in EVICTION_POLICIES:
        raise ConfigError(f"{where}.eviction: expected one of {list(EVICTION_POLICIES)}, "
                          f"got {data['eviction']!r}")
    return Deployed(
        role=data["role"], size=data["size"], precision="int8",
        weights_mb_int8=positive_number(data["weights_mb_int8"], f"{where}.weights_mb_int8"),
        kv_bytes_per_token=positive_int(data["kv_bytes_per_token"],
                                        f"{where}.kv_bytes_per_token"),
        max_context=positive_int(data["max_context"], f"{where}.max_context"),
        max_concurrent_sessions=positive_int(data["max_concurrent_sessions"],
                                             f"{where}.max_concurrent_sessions"),
        eviction=data["eviction"], where=where,
    )


def load_budgets(path: str | os.PathLike | None = None) -> dict[str, Hardware]:
    """Parse and validate a memory budget file; ConfigError names the file and field."""
    path = Path(path) if path is not None else default_budgets_path()
    data = check_keys(read_yaml(path), str(path), ("hardware",))
    if not isinstance(data["hardware"], dict) or not data["hardware"]:
        raise ConfigError(f"{path}: hardware: expected a mapping of machine name to budget")
    budgets = {}
    for name, body in data["hardware"].items():
        where = f"{path}: hardware.{name}"
        check_keys(body, where, ("unified_memory_gb", "usable_fraction", "models"), ("notes",))
        fraction = positive_number(body["usable_fraction"], f"{where}.usable_fraction")
        if fraction > 1:
            raise ConfigError(f"{where}.usable_fraction: expected at most 1, got {fraction:g}")
        if not isinstance(body["models"], list) or not body["models"]:
            raise ConfigError(f"{where}.models: expected a non-empty list of deployed models")
        models = tuple(_parse_deployed(m, f"{where}.models[{i}]")
                       for i, m in enumerate(body["models"]))
        budgets[str(name)] = Hardware(
            str(name), positive_number(body["unified_memory_gb"], f"{where}.unified_memory_gb"),
            fraction, models, str(body.get("notes", "")))
    return budgets


@dataclass
class ModelCheck:
    deployed: Deployed
    weights_bytes: int  # computed int8 bytes
    kv_bytes: int  # computed: sessions × max_context × kv bytes per token
    errors: list[str]  # stated numbers that disagree with the configs

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes


@dataclass
class HardwareCheck:
    hardware: Hardware
    models: list[ModelCheck]

    @property
    def total_bytes(self) -> int:
        return sum(m.total_bytes for m in self.models)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hardware.usable_bytes

    @property
    def errors(self) -> list[str]:
        return [e for m in self.models for e in m.errors]


def _check_deployed(d: Deployed, size: SizeConfig, roles: dict[str, Role] | None) -> ModelCheck:
    cfg = size.model
    weights = weight_bytes(cfg)["int8"]
    kv = d.max_concurrent_sessions * d.max_context * cfg.kv_bytes_per_token
    errors = []
    stated = d.weights_mb_int8 * MIB
    if abs(stated - weights) > WEIGHTS_TOLERANCE * weights:
        errors.append(f"{d.where}.weights_mb_int8: stated {d.weights_mb_int8:g} MiB but size "
                      f"{size.name} needs {weights / MIB:.1f} MiB at int8 (tolerance 1%)")
    if d.kv_bytes_per_token != cfg.kv_bytes_per_token:
        errors.append(f"{d.where}.kv_bytes_per_token: stated {d.kv_bytes_per_token} but size "
                      f"{size.name} has {cfg.kv_bytes_per_token}")
    if d.max_context > cfg.max_seq_len:
        errors.append(f"{d.where}.max_context: {d.max_context} exceeds size {size.name}'s "
                      f"max_seq_len {cfg.max_seq_len}")
    if roles is not None:
        role = roles.get(d.role)
        if role is None:
            errors.append(f"{d.where}.role: no role {d.role!r} in the roles file; "
                          f"roles: {sorted(roles)}")
        else:
            if role.size.name != d.size:
                errors.append(f"{d.where}.size: role {d.role} is served by size "
                              f"{role.size.name}, not {d.size}")
            if d.max_context > max(role.contexts):
                errors.append(f"{d.where}.max_context: {d.max_context} exceeds role {d.role}'s "
                              f"largest context {max(role.contexts)}")
    return ModelCheck(d, weights, kv, errors)


def check_budgets(budgets: dict[str, Hardware], roles: dict[str, Role] | None = None,
                  sizes: SizeLookup = load_size) -> list[HardwareCheck]:
    """Per machine: computed weights (int8) + max sessions × max context × KV bytes per token
    for every model, against the usable bytes, plus stated numbers that disagree with configs."""
    return [HardwareCheck(hw, [_check_deployed(d, sizes(d.size, f"{d.where}.size"), roles)
                               for d in hw.models])
            for hw in budgets.values()]


# ---- mlx-distill model-info ----

def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _size_lookup(size: SizeConfig) -> SizeLookup:
    """Resolve size names from configs/sizes, except the one being inspected: a config file
    given on the command line stands in for the size of its name."""
    def lookup(name: Any, where: str) -> SizeConfig:
        return size if name == size.name else load_size(name, where)
    return lookup


def model_info(config: str, budgets_path: str | None = None,
               roles_path: str | None = None) -> dict[str, Any]:
    """Everything ``model-info`` prints, as plain data (the ``--json`` output)."""
    size = load_size_config(config)
    cfg = size.model
    lookup = _size_lookup(size)
    # The default files are optional (a fresh checkout may lack them); named ones must exist.
    if roles_path is None and default_roles_path().exists():
        roles_path = str(default_roles_path())
    roles = load_roles(roles_path, lookup) if roles_path is not None else None
    checks = []
    if budgets_path is not None or default_budgets_path().exists():
        budgets = {k: hw for k, hw in load_budgets(budgets_path).items()
                   if any(d.size == size.name for d in hw.models)}
        checks = check_budgets(budgets, roles, lookup)
    params = count_parameters(cfg)
    return {
        "name": size.name,
        "path": size.path,
        "notes": size.notes,
        "model": cfg.to_dict(),
        "parameters": params,
        "nominal_params": int(size.nominal_params),
        "deviation_pct": 100.0 * (params / size.nominal_params - 1.0),
        "weight_bytes": weight_bytes(cfg),
        "kv_bytes_per_token": cfg.kv_bytes_per_token,
        "roles": {
            name: {"contexts": list(r.contexts),
                   "coreml": {"prefill_shapes": list(r.coreml.prefill_shapes),
                              "max_context": r.coreml.max_context},
                   "targets": asdict(r.targets)}
            for name, r in (roles or {}).items() if r.size.name == size.name},
        "budgets": [{
            "hardware": c.hardware.name,
            "unified_memory_gb": c.hardware.unified_memory_gb,
            "usable_fraction": c.hardware.usable_fraction,
            "usable_bytes": c.hardware.usable_bytes,
            "total_bytes": c.total_bytes,
            "fits": c.fits,
            "consistent": not c.errors,
            "errors": c.errors,
            "models": [{"role": m.deployed.role, "size": m.deployed.size,
                        "weights_bytes_int8": m.weights_bytes, "kv_bytes": m.kv_bytes,
                        "max_concurrent_sessions": m.deployed.max_concurrent_sessions,
                        "max_context": m.deployed.max_context,
                        "eviction": m.deployed.eviction, "total_bytes": m.total_bytes}
                       for m in c.models],
        } for c in checks],
    }


def format_info(info: dict[str, Any]) -> str:
    m = info["model"]
    lines = [f"{info['name']}  ({info['path']})"]
    if info["notes"]:
        lines.append(f"  {info['notes']}")
    tied = "tied" if m["tie_embeddings"] else "untied"
    lines += [
        f"  d_model {m['d_model']} · layers {m['n_layers']} · heads {m['n_heads']} / kv "
        f"{m['n_kv_heads']} · d_head {m['d_head']} · d_ff {m['d_ff']} · vocab "
        f"{m['vocab_size']} · {tied} embeddings · max_seq_len {m['max_seq_len']}",
        "",
        f"  {'parameters':<18}{info['parameters']:>18,}",
        f"  {'nominal':<18}{info['nominal_params']:>18,}   ({info['deviation_pct']:+.2f}%)",
        "",
    ]
    for precision, n in info["weight_bytes"].items():
        lines.append(f"  {'weights ' + precision:<18}{n:>18,} B   {human_bytes(n):>10}")
    kv = info["kv_bytes_per_token"]
    lines += [f"  {'KV per token':<18}{kv:>18,} B   {human_bytes(kv):>10}"
              f"   (fp16 K+V, {m['n_layers']} layers x {m['n_kv_heads']} kv heads x "
              f"{m['d_head']})"]
    for name, r in info["roles"].items():
        t = r["targets"]
        lines += ["", f"  role {name}: contexts {'/'.join(map(str, r['contexts']))}; Core ML "
                  f"prefill {'/'.join(map(str, r['coreml']['prefill_shapes']))}, max context "
                  f"{r['coreml']['max_context']}; targets p50 {t['latency_p50_ms']:g} ms, "
                  f"p95 {t['latency_p95_ms']:g} ms, {t['decode_tps']:g} tok/s"]
    for b in info["budgets"]:
        lines += ["", f"  memory budget {b['hardware']}: {b['unified_memory_gb']:g} GiB unified, "
                  f"usable {100 * b['usable_fraction']:g}% = {human_bytes(b['usable_bytes'])}",
                  f"    {'role':<10}{'size':<7}{'weights int8':>14}{'sessions x ctx':>18}"
                  f"{'KV':>12}{'total':>12}  eviction"]
        for d in b["models"]:
            ctx = f"{d['max_concurrent_sessions']} x {d['max_context']}"
            lines.append(f"    {d['role']:<10}{d['size']:<7}"
                         f"{human_bytes(d['weights_bytes_int8']):>14}{ctx:>18}"
                         f"{human_bytes(d['kv_bytes']):>12}{human_bytes(d['total_bytes']):>12}"
                         f"  {d['eviction']}")
        verdict = "OK" if b["fits"] else "FAIL (does not fit)"
        lines.append(f"    {'total':<61}{human_bytes(b['total_bytes']):>12}  of "
                     f"{human_bytes(b['usable_bytes'])} usable  {verdict}")
        lines.append("    stated numbers: " + ("consistent" if b["consistent"] else
                                                "INCONSISTENT"))
        lines += [f"      {e}" for e in b["errors"]]
    if not info["budgets"]:
        lines += ["", f"  no memory budget deploys size {info['name']}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.config, args.budgets, args.roles)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    problems = [f"{b['hardware']}: needs {human_bytes(b['total_bytes'])} but only "
                f"{human_bytes(b['usable_bytes'])} is usable" for b in info["budgets"]
                if not b["fits"]]
    problems += [e for b in info["budgets"] for e in b["errors"]]
    for problem in problems:
        print(f"mlx-distill model-info: {problem}", file=sys.stderr)
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "model-info", help="parameter count, weight/KV bytes and memory-budget check of a config",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG",
                   help="size name (e.g. 7b, from configs/sizes/) or a size-config YAML path")
    p.add_argument("--budgets", metavar="FILE",
                   help="memory budget file (default: configs/memory_budgets.yaml)")
    p.add_argument("--roles", metavar="FILE", help="roles file (default: configs/roles.yaml)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
