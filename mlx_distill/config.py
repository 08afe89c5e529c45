"""Student model configuration: the dataclass, its validation, YAML size configs and the mapping to
Hugging Face / mlx-lm ``config.json`` field names."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_distill.cli import UserError

ROPE_SCALING_TYPES = ("linear", "dynamic")


class ConfigError(UserError, ValueError):
    """Bad configuration; the message names the file/field and what is expected."""


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


@dataclass(frozen=True)
class RopeScaling:
    """``linear``: positions are divided by ``factor``.

    ``dynamic``: NTK-aware base scaling past ``original_max_position``. The base used for position
    ``p`` is the dynamic-NTK base of a sequence of length ``p + 1``, so a position's rotation never
    depends on how many tokens follow it: a KV cache stays valid and prefill equals step-by-step
    decode. (Implementations that rescale every position by the current total length, such as
    mlx-lm's ``DynamicNTKScalingRoPE``, give different logits for prefill and for cached decode.)
    """

    type: str
    factor: float
    original_max_position: int | None = None

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"rope_scaling.type: expected one of {ROPE_SCALING_TYPES}, got {self.type!r}"
            )
        if not (isinstance(self.factor, (int, float)) and self.factor >= 1.0):
            raise ConfigError(f"rope_scaling.factor: expected a number >= 1, got {self.factor!r}")
        if self.type == "dynamic" and not (
            isinstance(self.original_max_position, int) and self.original_max_position > 0
        ):
            raise ConfigError(
                "rope_scaling.original_max_position: dynamic scaling needs a positive integer, "
                f"got {self.original_max_position!r}"
            )


@dataclass(frozen=True)
class ModelConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    d_head: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2-style bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj as well (HF Llama with attention_bias)
    max_seq_len: int = 2048

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_head: not given and d_model ({self.d_model}) is not divisible by "
                    f"n_heads ({self.n_heads}); set d_head explicitly"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        elif not isinstance(self.d_head, int) or self.d_head <= 0:
            raise ConfigError(f"d_head: expected a positive integer, got {self.d_head!r}")
        if self.d_head % 2:
            raise ConfigError(f"d_head: RoPE needs an even head size, got {self.d_head}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_from_dict(self.rope_scaling))

    @property
    def kv_bytes_per_token(self) -> int:
        """fp16 K and V for every layer: 2 · layers · kv_heads · d_head · 2 bytes."""
        return 2 * self.n_layers * self.n_kv_heads * self.d_head * 2

    # ---- plain dict / YAML form (our own field names) ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'model config'}: expected a mapping of fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{_where(source, unknown[0])}: unknown field; expected one of {sorted(known)}"
            )
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in data]
        if required:
            raise ConfigError(f"{_where(source, required[0])}: required field is missing")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None

    # ---- Hugging Face / mlx-lm config.json ----
    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.d_head,
            "intermediate_size": self.d_ff,
            "vocab_size": self.vocab_size,
            "rope_theta": float(self.rope_theta),
            "rms_norm_eps": float(self.norm_eps),
            "tie_word_embeddings": self.tie_embeddings,
            # HF Llama puts the bias on o_proj too; checkpoints store a zero o_proj bias when
            # only q/k/v carry one, so mlx-lm and transformers load them unchanged.
            "attention_bias": self.attention_bias or self.attention_out_bias,
            "mlp_bias": False,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rope_scaling": None,
            "torch_dtype": "float32",
        }
        rs = self.rope_scaling
        if rs is not None:
            out["rope_scaling"] = {"type": rs.type, "rope_type": rs.type, "factor": rs.factor}
            if rs.type == "dynamic":
                # HF convention: for dynamic NTK, max_position_embeddings is the trained context.
                out["max_position_embeddings"] = rs.original_max_position
                out["rope_scaling"]["original_max_position_embeddings"] = rs.original_max_position
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ConfigError(
                f"{source}: model_type: expected llama, qwen2 or mistral, got {model_type!r}"
            )

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: {key}: required field is missing")
            return hf[key]

        n_heads = need("num_attention_heads")
        rope_scaling = None
        scaling = hf.get("rope_scaling")
        max_pos = hf.get("max_position_embeddings") or 2048
        if scaling:
            kind = scaling.get("rope_type") or scaling.get("type") or "default"
            if kind == "default":
                scaling = None
            elif kind in ROPE_SCALING_TYPES:
                orig = scaling.get("original_max_position_embeddings")
                if kind == "dynamic" and orig is None:
                    orig = max_pos
                rope_scaling = RopeScaling(kind, float(scaling["factor"]), orig)
            else:
                raise ConfigError(
                    f"{source}: rope_scaling.type: expected one of {ROPE_SCALING_TYPES}, "
                    f"got {kind!r}"
                )
        bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
        else:
            qkv_bias = out_bias = bias
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias: true is not supported by the student model")
        try:
            return cls(
                d_model=need("hidden_size"),
                n_layers=need("num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                d_head=hf.get("head_dim"),
                d_ff=need("intermediate_size"),
                vocab_size=need("vocab_size"),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rope_scaling=rope_scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                attention_bias=qkv_bias,
                attention_out_bias=out_bias,
                max_seq_len=int(max_pos),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _rope_from_dict(data: dict[str, Any]) -> RopeScaling:
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"rope_scaling.{unknown[0]}: unknown field; expected {sorted(known)}")
    if "type" not in data or "factor" not in data:
        raise ConfigError("rope_scaling: expected fields 'type' and 'factor'")
    return RopeScaling(**data)


# ---- size configs (configs/<name>.yaml) ----

@dataclass(frozen=True)
class SizeConfig:
    name: str
    nominal_params: float
    model: ModelConfig
    path: str | None = None
    notes: str = field(default="", compare=False)


def configs_dir() -> Path:
    """Where named configs live: $MLX_DISTILL_CONFIGS, else the repository's ``configs/``."""
    env = os.environ.get("MLX_DISTILL_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None


def resolve_config_path(name_or_path: str | os.PathLike, kind: str = "sizes") -> Path:
    """A YAML path as given, or ``configs/<kind>/<name>.yaml`` for a bare name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = configs_dir() / kind / f"{name_or_path}.yaml"
    if not candidate.exists():
        available = sorted(p.stem for p in (configs_dir() / kind).glob("*.yaml"))
        raise ConfigError(f"{name_or_path}: no such config file or {kind.rstrip('s')} name; "
                          f"{kind}: {available}")
    return candidate


def load_size_config(name_or_path: str | os.PathLike) -> SizeConfig:
    path = resolve_config_path(name_or_path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys name, nominal_params, model")
    allowed = {"name", "nominal_params", "model", "notes"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; expected {sorted(allowed)}")
    for key in ("name", "nominal_params", "model"):
        if key not in data:
            raise ConfigError(f"{path}: {key}: required key is missing")
    nominal = data["nominal_params"]
    if not isinstance(nominal, (int, float)) or isinstance(nominal, bool) or nominal <= 0:
        raise ConfigError(f"{path}: nominal_params: expected a positive number, got {nominal!r}")
    model = ModelConfig.from_dict(data["model"], source=f"{path}: model")
    return SizeConfig(str(data["name"]), float(nominal), model, str(path), data.get("notes", ""))


def list_size_configs() -> list[Path]:
    return sorted((configs_dir() / "sizes").glob("*.yaml"))
