"""Training checkpoints: a loadable model directory plus everything needed to resume exactly.

``OUT/checkpoints/step-00000100/`` is a normal model directory (:mod:`mlx_distill.checkpoint`:
``config.json``, ``model.safetensors``, tokenizer files, ``mlx_distill.json``; LoRA adapters are
fused into plain weights so mlx-lm and our exporter load it unchanged), plus:

- ``trainer_state.json``: step, data position, RNG key, best validation loss and its step, the
  early-stopping and NaN counters, tokens seen, and the run's config;
- ``optimizer.safetensors``: AdamW moments, its update count and learning rate;
- ``adapters/`` (LoRA runs): ``adapters.safetensors`` + ``adapter_config.json`` in mlx-lm's layout
  (``mlx_lm.generate --model BASE --adapter-path .../adapters`` works).

Each step directory is written with :func:`mlx_distill.atomic.atomic_directory`, then the
``OUT/checkpoints/latest`` pointer is replaced atomically, then old step directories beyond
``keep_last`` are removed (never the one ``OUT/checkpoints/best`` names). A kill at any moment
leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from mlx_distill.atomic import atomic_directory, atomic_write_text
from mlx_distill.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mlx_distill.model import Model

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTERS_DIR = "adapters"
STATE_SCHEMA = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class LoopState:
    """Counters that live across steps; saved and restored with each checkpoint."""

    step: int = 0  # steps done (an update or a skipped non-finite step)
    data: dict[str, Any] = field(default_factory=dict)  # the batch source's position
    best_val: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nan_streak: int = 0
    tokens_seen: int = 0  # supervised tokens, all ranks
    rng_key: list[int] = field(default_factory=list)
    world_size: int = 1  # data-parallel processes of the run that saved

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def read_pointer(out_dir: str | Path, name: str = LATEST) -> Path | None:
    """The checkpoint dir a pointer (``latest`` / ``best``) names, or None when there is none."""
    root = checkpoints_root(out_dir)
    pointer = root / name
    if not pointer.exists():
        return None
    target = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_DIR.match(target) or not (root / target / STATE_FILE).exists():
        raise CheckpointError(f"{pointer}: names {target!r}, which is not a complete checkpoint")
    return root / target


def rng_key() -> list[int]:
    return [int(x) for x in mx.random.state[0].tolist()]


def set_rng_key(key: list[int]) -> None:
    # mx.random.key(seed) packs a 64-bit seed as [high, low] words: seeding with the packed key
    # restores the generator state exactly.
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


# ---- LoRA ----

def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_a")]


def fused_model(model: Model) -> Model:
    """A plain :class:`Model` whose weights are ``model``'s with every LoRA update fused in."""
    modules = lora_modules(model)
    if not modules:
        return model
    weights = dict(tree_flatten(model.parameters()))
    for name, module in modules:
        for leaf in ("linear.weight", "linear.bias", "lora_a", "lora_b"):
            weights.pop(f"{name}.{leaf}", None)
        fused = module.fuse()
        weights[f"{name}.weight"] = fused.weight
        if "bias" in fused:
            weights[f"{name}.bias"] = fused.bias
    plain = Model(model.config)
    plain.load_weights(list(weights.items()), strict=True)
    return plain


def adapter_config(lora: Any, n_layers: int) -> dict[str, Any]:
    """mlx-lm's ``adapter_config.json`` for :func:`mlx_lm.tuner.utils.load_adapters`."""
    return {
        "fine_tune_type": "lora",
        "num_layers": lora.num_layers or n_layers,
        "lora_parameters": {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout,
                            "keys": lora.keys},
    }


# ---- save ----

def save_training_checkpoint(
    out_dir: str | Path,
    model: Model,
    optimizer: optim.Optimizer,
    loop: LoopState,
    config: dict[str, Any],
    tokenizer_dir: str | Path | None,
    keep_last: int,
    lora: Any = None,
    best: bool = False,
) -> Path:
    """Write ``checkpoints/step-N`` atomically, point ``latest`` (and ``best``) at it, prune."""
    root = checkpoints_root(out_dir)
    target = root / step_dir_name(loop.step)
    with atomic_directory(target) as tmp:
        # save_checkpoint writes a directory atomically too: it replaces the empty ``tmp``.
        save_checkpoint(fused_model(model), tmp, tokenizer_dir=tokenizer_dir,
                        extra_meta={"training": {"step": loop.step, "lora": lora is not None}})
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        if lora is not None:
            adapters = tmp / ADAPTERS_DIR
            adapters.mkdir()
            mx.save_safetensors(str(adapters / "adapters.safetensors"),
                                dict(tree_flatten(model.trainable_parameters())))
            (adapters / "adapter_config.json").write_text(
                json.dumps(adapter_config(lora, model.config.n_layers), indent=2) + "\n")
        state = {"schema": STATE_SCHEMA, **loop.to_dict(), "config": config}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    atomic_write_text(root / LATEST, target.name + "\n")
    if best:
        atomic_write_text(root / BEST, target.name + "\n")
    prune_checkpoints(out_dir, keep_last)
    return target


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Remove step dirs older than the newest ``keep_last``, sparing ``latest`` and ``best``."""
    root = checkpoints_root(out_dir)
    steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    keep = set(steps[-keep_last:])
    for name in (LATEST, BEST):
        pointer = root / name
        if pointer.exists():
            keep.add(root / pointer.read_text(encoding="utf-8").strip())
    removed = [p for p in steps if p not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ---- restore ----

def read_state(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({exc})") from None
    if state.get("schema") != STATE_SCHEMA:
        raise CheckpointError(f"{path}: schema: expected {STATE_SCHEMA}, got "
                              f"{state.get('schema')!r}")
    return state


def restore_training_checkpoint(
    ckpt_dir: Path, model: Model, optimizer: optim.Optimizer, lora: bool
) -> LoopState:
    """Load weights (or adapters), optimizer state and RNG from ``ckpt_dir``; return the counters.

    ``model`` must be built as at the start of the run (same config; LoRA layers already in
    place, their frozen base weights loaded from the same init checkpoint).
    """
    state = read_state(ckpt_dir)
    if lora:
        path = ckpt_dir / ADAPTERS_DIR / "adapters.safetensors"
        if not path.exists():
            raise CheckpointError(f"{path}: file not found (this run trains LoRA adapters)")
        _load_exact(model, mx.load(str(path)), path, dict(tree_flatten(
            model.trainable_parameters())))
    else:
        saved = load_checkpoint(ckpt_dir)
        weights = dict(tree_flatten(saved.parameters()))
        _load_exact(model, weights, ckpt_dir, dict(tree_flatten(model.parameters())))
    _restore_optimizer(optimizer, model, ckpt_dir / OPTIMIZER_FILE)
    loop = LoopState(**{k: state[k] for k in LoopState.__dataclass_fields__ if k in state})
    if loop.rng_key:
        set_rng_key(loop.rng_key)
    return loop


def _load_exact(model: nn.Module, weights: dict[str, mx.array], where: Path,
                expected: dict[str, mx.array]) -> None:
    for name, param in expected.items():
        if name not in weights:
            raise CheckpointError(f"{where}: missing tensor {name}")
        if weights[name].shape != param.shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {weights[name].shape}, "
                                  f"expected {param.shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]}")
    model.update(tree_unflatten([(k, weights[k].astype(p.dtype)) for k, p in expected.items()]))
    mx.eval(model.parameters())


def _restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    saved = mx.load(str(path))
    optimizer.init(model.trainable_parameters())

    def take(name, value):
        if name not in saved:
            raise CheckpointError(f"{path}: missing optimizer tensor {name}")
        return saved[name]

    expected = {k for k, _ in tree_flatten(optimizer.state)}
    extra = sorted(set(saved) - expected)
    if extra:
        raise CheckpointError(f"{path}: unexpected optimizer tensor {extra[0]}")
    # Replacing the dict's contents keeps the object mx.compile captured, if any.
    restored = tree_map_with_path(take, optimizer.state)
    optimizer.state.clear()
    optimizer.state.update(restored)
    mx.eval(optimizer.state)
