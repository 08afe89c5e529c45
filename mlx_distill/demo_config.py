"""The end-to-end demo's configuration (``configs/demo/*.yaml``): task data, tokenizer, teacher,
KD generation, student, Core ML export and evaluation. Unknown fields, wrong types and out-of-range
values stop the demo before anything is written, with one line naming the file and the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.config import ConfigError, ModelConfig, resolve_config_path
from mlx_distill.demo_data import TASKS
from mlx_distill.train_config import _build, _choice, _fraction, _positive, read_sections

PRECISIONS = ("fp16", "int8", "int4")


@dataclass
class DataSection:
    n_train: int = 400
    n_val: int = 40
    n_test: int = 100
    seed: int = 0
    tools_per_sample: int = 0  # toolcall: tools offered per sample (0: all five)
    tool_descriptions: bool = True  # toolcall: keep the tools' description texts


@dataclass
class TokenizerSection:
    vocab_size: int = 2048


@dataclass
class ModelSection:
    """A model shape; the vocabulary is the tokenizer's, the context ``max_seq_len``."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int = 1
    d_ff: int = 176
    max_seq_len: int = 512

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, vocab_size=vocab_size,
                           max_seq_len=self.max_seq_len)


@dataclass
class TrainSection:
    model: ModelSection = field(default_factory=ModelSection)
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 10
    shapes: list[int] = field(default_factory=lambda: [128, 256, 384])


@dataclass
class StudentSection(TrainSection):
    alpha: float = 0.5  # CE weight; the KD term (top-k forward KL) gets 1 - alpha
    kd_temperature: float = 1.0
    tool_weight: float = 2.0  # tokens inside tool-call JSON count this much
    min_ratio: float = 4.0  # teacher / student parameters, at least


@dataclass
class KDSection:
    max_tokens: int = 96
    top_logprobs: int = 20
    temperature: float = 0.0  # the teacher's sampling temperature (0: greedy)
    concurrency: int = 4
    checkpoint_interval: int = 50


@dataclass
class ExportSection:
    precisions: list[str] = field(default_factory=lambda: ["fp16", "int8"])
    shapes: list[int] = field(default_factory=lambda: [128, 256, 384])
    max_context: int = 512
    layout: str = "linear"
    decode_steps: int = 32  # verify-coreml's greedy decode loop


@dataclass
class EvalSection:
    limit: int = 0  # test samples evaluated (0: all)
    max_tokens: int = 96
    coreml: str = "int8"  # the package evaluated (one of export.precisions)
    profile: str = "toy"  # gates profile of configs/gates.yaml


@dataclass
class DemoConfig:
    task: str = "toolcall"
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    teacher: TrainSection = field(default_factory=TrainSection)
    kd: KDSection = field(default_factory=KDSection)
    student: StudentSection = field(default_factory=StudentSection)
    export: ExportSection = field(default_factory=ExportSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        _choice(self.task, TASKS, "task")
        d = self.data
        for name in ("n_train", "n_val", "n_test"):
            _at_least(getattr(d, name), 1, f"data.{name}")
        _at_least(d.seed, 0, "data.seed")
        _at_least(d.tools_per_sample, 0, "data.tools_per_sample")
        _at_least(self.tokenizer.vocab_size, 266, "tokenizer.vocab_size")
        for name in ("teacher", "student"):
            self._check_training(getattr(self, name), name)
        s = self.student
        _fraction(s.alpha, "student.alpha")
        _positive(s.kd_temperature, "student.kd_temperature")
        _positive(s.tool_weight, "student.tool_weight")
        _positive(s.min_ratio, "student.min_ratio")
        k = self.kd
        _at_least(k.max_tokens, 1, "kd.max_tokens")
        if not 1 <= k.top_logprobs <= 20:
            raise ConfigError(f"kd.top_logprobs: expected 1..20, got {k.top_logprobs}")
        if not 0 <= k.temperature <= 2:
            raise ConfigError(f"kd.temperature: expected 0..2, got {k.temperature}")
        _at_least(k.concurrency, 1, "kd.concurrency")
        _at_least(k.checkpoint_interval, 1, "kd.checkpoint_interval")
        self._check_export()
        e = self.eval
        _at_least(e.limit, 0, "eval.limit")
        _at_least(e.max_tokens, 1, "eval.max_tokens")
        if e.coreml not in self.export.precisions:
            raise ConfigError(f"eval.coreml: expected one of export.precisions "
                              f"{self.export.precisions}, got {e.coreml!r}")

    def _check_training(self, section: TrainSection, name: str) -> None:
        try:
            section.model.model_config(vocab_size=self.tokenizer.vocab_size)
        except ConfigError as exc:
            raise ConfigError(f"{name}.model.{exc}") from None
        _at_least(section.steps, 1, f"{name}.steps")
        _at_least(section.batch_size, 1, f"{name}.batch_size")
        _positive(section.lr, f"{name}.lr")
        if not 0 <= section.warmup_steps < section.steps:
            raise ConfigError(f"{name}.warmup_steps: expected 0 <= warmup < steps "
                              f"({section.steps}), got {section.warmup_steps}")
        _lengths(section.shapes, f"{name}.shapes", section.model.max_seq_len)

    def _check_export(self) -> None:
        x = self.export
        if not x.precisions or any(p not in PRECISIONS for p in x.precisions):
            raise ConfigError(f"export.precisions: expected a non-empty list of "
                              f"{', '.join(PRECISIONS)}; got {x.precisions!r}")
        _lengths(x.shapes, "export.shapes", x.max_context)
        if x.max_context > self.student.model.max_seq_len:
            raise ConfigError(f"export.max_context: expected <= student.model.max_seq_len "
                              f"({self.student.model.max_seq_len}), got {x.max_context}")
        _choice(x.layout, ("linear", "ane"), "export.layout")
        _at_least(x.decode_steps, 1, "export.decode_steps")


def _at_least(value: int, low: int, where: str) -> None:
    if value < low:
        raise ConfigError(f"{where}: expected an integer >= {low}, got {value}")


def _lengths(values: list[int], where: str, limit: int) -> None:
    if not values or any(not 2 <= v <= limit for v in values):
        raise ConfigError(f"{where}: expected a non-empty list of lengths in 2..{limit}, "
                          f"got {values!r}")


def load_demo_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                     ) -> DemoConfig:
    """Read, override (``section.field=value``, the value parsed as YAML) and validate."""
    path = resolve_config_path(name_or_path, "demo")
    data = read_sections(path, DemoConfig, overrides)
    try:
        config = _build(DemoConfig, data, "")
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
