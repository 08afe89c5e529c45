"""``mlx-distill train`` configuration: a YAML file of seven sections, validated into dataclasses.

Every field, its default and meaning is documented in ``configs/train/README.md``; an example is
``configs/train/toy_kd.yaml``. A bad value stops the run before anything is written, with one line
naming the file and the dotted field (``run.yaml: optim.lr: expected a positive number, got 'x'``).
Relative paths are taken relative to the current directory. ``--set section.field=value`` overrides
a field (the value is parsed as YAML: ``--set train.lora.rank=16``, ``--set data.train=[a, b]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_distill.config import ConfigError, read_yaml

TEACHER_MODES = ("offline", "local", "on-policy")
LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "ce")
DTYPES = ("float32", "bfloat16", "float16")
# Fields that may differ between a run and its --resume (they do not change the trajectory).
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.plot", "out",
                     "debug.hang_after_step")


@dataclass
class StudentConfig:
    size: str | None = None  # size config name (configs/sizes) or YAML path: random init
    init: str | None = None  # checkpoint dir to start from (ours, mlx-lm or HF Llama family)
    tokenizer: str | None = None  # tokenizer dir; default: the init checkpoint dir
    dtype: str = "float32"  # parameter dtype while training

    def validate(self, where: str) -> None:
        if (self.size is None) == (self.init is None):
            raise ConfigError(f"{where}.size: give exactly one of student.size (random init) "
                              "or student.init (checkpoint dir)")
        if self.init is None and self.tokenizer is None:
            raise ConfigError(f"{where}.tokenizer: required when the student starts from a size "
                              "config (there is no checkpoint to take the tokenizer from)")
        _choice(self.dtype, DTYPES, f"{where}.dtype")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # KD record files (kd.jsonl)
    sft: list[str] = field(default_factory=list)  # SFT example files (CE only)
    val: list[str] = field(default_factory=list)  # held-out KD records; empty: split from train
    val_fraction: float = 0.05  # share of train records held out when val is empty
    batch_size: int = 8  # sequences per micro-batch (global, across data-parallel ranks)
    shapes: list[int] = field(default_factory=lambda: [256])  # sequence-length buckets
    curriculum: list[list[int]] = field(default_factory=list)  # [[step, max_len], ...]
    linear_curriculum: bool = False  # one more shape every steps / len(shapes) steps
    overflow: str = "truncate"  # longer than the largest shape: truncate | reject
    max_bad_fraction: float = 0.01  # stop when more records than this share are bad
    align: str = "auto"  # teacher top-k onto student tokens: auto | id | text
    teacher_tokenizer: str | None = None  # tokenizer of the records' teacher (auto -> by id)
    tool_arguments: str = "text"  # tool-call arguments to the template as JSON text | object

    def validate(self, where: str) -> None:
        if not self.train and not self.sft:
            raise ConfigError(f"{where}.train: give at least one KD record file "
                              "(or data.sft for CE-only examples)")
        _fraction(self.val_fraction, f"{where}.val_fraction", upper_open=True)
        _positive(self.batch_size, f"{where}.batch_size")
        if not self.shapes:
            raise ConfigError(f"{where}.shapes: expected a non-empty list of sequence lengths")
        for i, s in enumerate(self.shapes):
            if s < 2:
                raise ConfigError(f"{where}.shapes[{i}]: expected an integer >= 2, got {s}")
        for i, entry in enumerate(self.curriculum):
            if len(entry) != 2 or entry[0] < 0 or entry[1] <= 0:
                raise ConfigError(f"{where}.curriculum[{i}]: expected [start_step, max_len] with "
                                  f"start_step >= 0 and max_len > 0, got {entry!r}")
        _fraction(self.max_bad_fraction, f"{where}.max_bad_fraction")
        _choice(self.overflow, ("truncate", "reject"), f"{where}.overflow")
        _choice(self.align, ("auto", "id", "text"), f"{where}.align")
        _choice(self.tool_arguments, ("text", "object"), f"{where}.tool_arguments")
        if self.curriculum and self.linear_curriculum:
            raise ConfigError(f"{where}.linear_curriculum: give either data.curriculum or "
                              "data.linear_curriculum, not both")


@dataclass
class TeacherConfig:
    mode: str = "offline"  # offline | local | on-policy
    model: str | None = None  # local teacher checkpoint dir (local, on-policy)
    top_k: int = 0  # local teacher: 0 = full logits (dense loss); k > 0 = top-k on the fly
    on_policy_fraction: float = 0.5  # on-policy: probability λ a batch is the student's samples
    max_new_tokens: int = 128  # on-policy: sample length cap
    sample_temperature: float = 1.0  # on-policy: student sampling temperature
    remote_url: str | None = None  # on-policy: teacher server scoring samples (POST /v1/score)
    remote_top_logprobs: int = 20  # on-policy remote: alternatives requested per token
    remote_timeout_s: float = 120.0

    def validate(self, where: str) -> None:
        _choice(self.mode, TEACHER_MODES, f"{where}.mode")
        _non_negative(self.top_k, f"{where}.top_k")
        _fraction(self.on_policy_fraction, f"{where}.on_policy_fraction")
        _positive(self.max_new_tokens, f"{where}.max_new_tokens")
        _non_negative(self.sample_temperature, f"{where}.sample_temperature")
        _positive(self.remote_top_logprobs, f"{where}.remote_top_logprobs")
        _positive(self.remote_timeout_s, f"{where}.remote_timeout_s")
        if self.mode == "local" and self.model is None:
            raise ConfigError(f"{where}.model: mode 'local' needs a teacher checkpoint dir")
        if self.mode == "on-policy" and (self.model is None) == (self.remote_url is None):
            raise ConfigError(f"{where}.model: mode 'on-policy' needs exactly one of "
                              "teacher.model (local scoring) or teacher.remote_url")
        if self.mode == "offline" and (self.model or self.remote_url):
            raise ConfigError(f"{where}.mode: teacher.model/remote_url are set but mode is "
                              "'offline' (KD records only); use mode local or on-policy")


@dataclass
class LossConfig:
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd | ce
    alpha: float = 0.5  # weight of CE; KD gets 1 - alpha (where the teacher has a distribution)
    temperature: float = 1.0  # KD temperature (losses are scaled by T²)
    beta: float = 0.5  # jsd: teacher weight of the mixture (0: forward KL, 1: reverse KL)
    tool_weight: float = 1.0  # multiplier for tokens inside tool-call JSON
    tail: bool = True  # sparse KD: compare the teacher's remaining mass as a tail bucket

    def validate(self, where: str) -> None:
        _choice(self.kind, LOSS_KINDS, f"{where}.kind")
        _fraction(self.alpha, f"{where}.alpha")
        _positive(self.temperature, f"{where}.temperature")
        _fraction(self.beta, f"{where}.beta")
        _positive(self.tool_weight, f"{where}.tool_weight")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak AdamW learning rate
    min_lr: float | None = None  # end of the cosine decay; default lr / 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warmup from 0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    grad_accum: int = 1  # micro-batches per update

    def validate(self, where: str) -> None:
        _positive(self.lr, f"{where}.lr")
        if self.min_lr is not None:
            _non_negative(self.min_lr, f"{where}.min_lr")
            if self.min_lr > self.lr:
                raise ConfigError(f"{where}.min_lr: expected <= lr ({self.lr}), got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1), got {self.betas!r}")
        _positive(self.eps, f"{where}.eps")
        _non_negative(self.weight_decay, f"{where}.weight_decay")
        _non_negative(self.warmup_steps, f"{where}.warmup_steps")
        _non_negative(self.grad_clip, f"{where}.grad_clip")
        _positive(self.grad_accum, f"{where}.grad_accum")

    @property
    def end_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class LoraConfig:
    rank: int = 8
    scale: float = 20.0  # mlx-lm's LoRA scale (multiplies the low-rank update)
    dropout: float = 0.0
    num_layers: int = 0  # adapt the last N transformer blocks; 0 = all
    keys: list[str] | None = None  # module paths inside a block (self_attn.q_proj, ...); None: all

    def validate(self, where: str) -> None:
        _positive(self.rank, f"{where}.rank")
        _positive(self.scale, f"{where}.scale")
        _fraction(self.dropout, f"{where}.dropout", upper_open=True)
        _non_negative(self.num_layers, f"{where}.num_layers")
        if self.keys is not None and not self.keys:
            raise ConfigError(f"{where}.keys: expected a non-empty list or null (all linears)")


@dataclass
class LoopConfig:
    steps: int = 1000  # optimizer steps (each grad_accum micro-batches)
    eval_every: int = 0  # validate every N steps (and at the end); 0 = never
    eval_batches: int = 8  # validation micro-batches per evaluation
    patience: int = 0  # stop after N evaluations without improvement; 0 = never
    min_delta: float = 0.0  # improvement smaller than this does not count
    checkpoint_every: int = 0  # save every N steps; 0 = only at the end (and at best val)
    keep_last: int = 3  # step checkpoints kept (the best one is kept as well)
    seed: int = 0  # initialization, data order, dropout and sampling
    lora: LoraConfig | None = None  # null: full fine-tune
    grad_checkpoint: bool = False  # recompute block activations in the backward pass
    nan_limit: int = 3  # stop after this many non-finite steps in a row
    compile: bool = True  # mx.compile the gradient and update functions
    progress: bool = True  # tqdm progress bar
    plot: bool = True  # loss-curve PNG at each evaluation and at the end

    def validate(self, where: str) -> None:
        _positive(self.steps, f"{where}.steps")
        _non_negative(self.eval_every, f"{where}.eval_every")
        _positive(self.eval_batches, f"{where}.eval_batches")
        _non_negative(self.patience, f"{where}.patience")
        _non_negative(self.min_delta, f"{where}.min_delta")
        _non_negative(self.checkpoint_every, f"{where}.checkpoint_every")
        _positive(self.keep_last, f"{where}.keep_last")
        _non_negative(self.seed, f"{where}.seed")
        _positive(self.nan_limit, f"{where}.nan_limit")
        if self.patience and not self.eval_every:
            raise ConfigError(f"{where}.patience: early stopping needs train.eval_every > 0")
        if self.lora is not None:
            self.lora.validate(f"{where}.lora")


@dataclass
class DebugConfig:
    """Explicit test hooks; leave empty in real runs."""

    # Steps whose loss is multiplied by NaN (exercises the skip / stop-after-K path).
    poison_steps: list[int] = field(default_factory=list)
    # After this step's metrics are written, sleep until killed (kill -9 / resume tests).
    hang_after_step: int | None = None


@dataclass
class TrainConfig:
    out: str = "runs/train"
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self, where: str = "") -> None:
        prefix = f"{where}: " if where else ""
        try:
            for name in ("student", "data", "teacher", "loss", "optim", "train"):
                getattr(self, name).validate(name)
            self._cross_checks()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None

    def _cross_checks(self) -> None:
        dense = self.teacher.mode in ("local", "on-policy") and self.teacher.top_k == 0 and (
            self.teacher.model is not None
        )
        if self.loss.kind == "jsd" and not dense:
            raise ConfigError("loss.kind: 'jsd' needs full teacher distributions: teacher.mode "
                              "local or on-policy with teacher.model and teacher.top_k 0")
        if self.train.lora is not None and self.student.init is None:
            raise ConfigError("train.lora: LoRA needs a pretrained student (student.init); "
                              "a randomly initialized student needs a full fine-tune")
        if self.optim.warmup_steps >= self.train.steps:
            raise ConfigError(f"optim.warmup_steps: expected < train.steps ({self.train.steps}), "
                              f"got {self.optim.warmup_steps}")
        if self.train.eval_every and not self.data.val and self.data.val_fraction == 0:
            raise ConfigError("train.eval_every: evaluation needs held-out data: data.val files "
                              "or data.val_fraction > 0")
        if self.teacher.mode == "on-policy" and not self.data.train:
            raise ConfigError("data.train: on-policy training samples completions for the KD "
                              "records' prompts; give at least one record file")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading ----

def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                      ) -> TrainConfig:
    """Read, override (``section.field=value``) and validate a training config."""
    return config_from_dict(read_sections(path, TrainConfig, overrides), str(path))


def read_sections(path: str | Path, cls: type, overrides: list[str] | tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    """The YAML mapping at ``path`` (empty file: ``{}``) with ``overrides`` applied, before it is
    built into the dataclass ``cls`` whose fields name the sections."""
    data = read_yaml(Path(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections "
                          f"{[f.name for f in dataclasses.fields(cls)]}")
    for item in overrides:
        apply_override(data, item)
    return data


def config_from_dict(data: dict[str, Any], source: str = "") -> TrainConfig:
    prefix = f"{source}: " if source else ""
    try:
        config = _build(TrainConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    config.validate(source)
    return config


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``data[a][b] = yaml(value)`` for ``item == "a.b=value"`` (sections are created)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, where: str) -> Any:
    label = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown field; expected one of "
                          f"{sorted(fields)}")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, _join(where, name))
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, where)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and (
            args[0] is str
        ):
            value = [value]  # one path may be given without brackets
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{where}: unsupported field type {hint!r}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _positive(value: float, where: str) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")


def _non_negative(value: float, where: str) -> None:
    if not value >= 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")


def _fraction(value: float, where: str, upper_open: bool = False) -> None:
    ok = 0 <= value < 1 if upper_open else 0 <= value <= 1
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{where}: expected a number in {bound}, got {value!r}")


def _choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}; got {value!r}")


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two ``TrainConfig.to_dict()`` trees."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = _join(prefix, key)
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_differences(va, vb, name))
        elif va != vb:
            out.append(name)
    return out
