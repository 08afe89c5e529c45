"""Model directories interchangeable with mlx-lm and Hugging Face.

A checkpoint directory holds:
- ``config.json``: HF/mlx-lm Llama field names (``model_type: llama``);
- ``model.safetensors``: HF Llama tensor names;
- tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, …) when a tokenizer is given;
- ``mlx_distill.json``: our ModelConfig, sha256 of the weights, git sha, creation time.

Loading accepts our directories and mlx-lm/HF Llama-family directories (llama, qwen2, mistral).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_distill.atomic import atomic_directory
from mlx_distill.cli import UserError
from mlx_distill.config import ConfigError, ModelConfig
from mlx_distill.model import Model

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mlx_distill.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
META_SCHEMA = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read or written; the message names the file and the problem."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str | None:
    """The commit of the mlx_distill source tree, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def save_checkpoint(
    model: Model,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and tokenizer files from ``tokenizer_dir``) to ``out_dir`` atomically."""
    config: ModelConfig = model.config
    weights = dict(tree_flatten(model.parameters()))
    dtype = next(iter(weights.values())).dtype
    if config.attention_bias and not config.attention_out_bias:
        # HF/mlx-lm Llama ties o_proj's bias to attention_bias: store a zero one so they load it.
        for i in range(config.n_layers):
            weights[f"model.layers.{i}.self_attn.o_proj.bias"] = mx.zeros(config.d_model, dtype)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        hf = config.to_hf_dict()
        hf["torch_dtype"] = _dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_dir is not None:
            copied = 0
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
                    copied += 1
            if not copied:
                raise CheckpointError(f"{tokenizer_dir}: no tokenizer files found to copy")
        meta = {
            "schema": META_SCHEMA,
            "model_config": config.to_dict(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "dtype": _dtype_name(dtype),
            "git_sha": git_sha(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **(extra_meta or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint directory")
    meta_path = ckpt_dir / META_FILE
    try:
        if meta_path.exists():
            meta = _read_json(meta_path)
            return ModelConfig.from_dict(
                meta.get("model_config"), source=f"{meta_path}: model_config"
            )
        hf = _read_json(ckpt_dir / "config.json")
        if hf.get("quantization") or hf.get("quantization_config"):
            raise CheckpointError(
                f"{ckpt_dir / 'config.json'}: quantized checkpoints are not supported; "
                "use a float checkpoint"
            )
        return ModelConfig.from_hf_dict(hf, source=str(ckpt_dir / "config.json"))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def _weight_files(ckpt_dir: Path) -> list[Path]:
    files = sorted(ckpt_dir.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt_dir / WEIGHTS_FILE}: file not found")
    return files


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as exc:  # mlx raises RuntimeError/ValueError with multi-line messages
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable or truncated safetensors ({reason})") from None


def load_weights(ckpt_dir: str | os.PathLike, verify: bool = True) -> dict[str, mx.array]:
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if verify and meta_path.exists():
        meta = _read_json(meta_path)
        expected = meta.get("weights_sha256")
        path = ckpt_dir / meta.get("weights_file", WEIGHTS_FILE)
        if not path.exists():
            raise CheckpointError(f"{path}: file not found")
        if expected and sha256_file(path) != expected:
            raise CheckpointError(
                f"{path}: sha256 does not match {META_FILE} (file changed or corrupted)"
            )
    weights: dict[str, mx.array] = {}
    for path in _weight_files(ckpt_dir):
        weights.update(_load_safetensors(path))
    return weights


def _sanitize(weights: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    if not config.attention_out_bias:
        for i in range(config.n_layers):
            key = f"model.layers.{i}.self_attn.o_proj.bias"
            bias = weights.get(key)
            if bias is not None and not bool(mx.all(bias == 0)):
                raise CheckpointError(
                    f"{key}: non-zero o_proj bias but the config has attention_out_bias false"
                )
            weights.pop(key, None)
    return weights


def load_checkpoint(
    ckpt_dir: str | os.PathLike, dtype: mx.Dtype | None = None, verify: bool = True
) -> Model:
    """Build the model from ``ckpt_dir`` and load its weights, checking names and shapes."""
    ckpt_dir = Path(ckpt_dir)
    config = load_config(ckpt_dir)
    model = Model(config)
    weights = _sanitize(load_weights(ckpt_dir, verify=verify), config)
    expected = dict(tree_flatten(model.parameters()))
    where = ckpt_dir / WEIGHTS_FILE
    for name, param in expected.items():
        if name not in weights:
            raise CheckpointError(f"{where}: missing tensor {name}")
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"expected {tuple(param.shape)}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}")
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model


def _inspect(args) -> int:
    from mlx_distill.model import num_parameters

    model = load_checkpoint(args.ckpt_dir)
    cfg = model.config
    meta_path = Path(args.ckpt_dir) / META_FILE
    meta = _read_json(meta_path) if meta_path.exists() else {}
    print(f"checkpoint   {args.ckpt_dir}")
    print(f"parameters   {num_parameters(model):,}")
    print(f"layers       {cfg.n_layers} × d_model {cfg.d_model}, heads {cfg.n_heads} "
          f"(kv {cfg.n_kv_heads}, d_head {cfg.d_head}), d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}")
    sha = meta.get("weights_sha256")
    print(f"weights      sha256 {sha + ' (verified)' if sha else 'not recorded (not our format)'}")
    print(f"created      {meta.get('created', '-')}  git {meta.get('git_sha') or '-'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="load a checkpoint dir, verify its weights and print a summary",
        description="Load an mlx-distill or mlx-lm Llama-family checkpoint directory, check every "
        "tensor's name and shape and the weights' sha256, and print a summary. "
        "Exits 2 with one line naming the file/tensor when something is wrong.",
    )
    p.add_argument("ckpt_dir", help="checkpoint directory (config.json + model.safetensors)")
    p.set_defaults(func=_inspect)
