"""The training config: examples load, overrides apply, bad values fail in one line naming the
field (and the CLI writes nothing), every field is documented."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill import cli
from mlx_distill.config import ConfigError
from mlx_distill.train_config import (
    TrainConfig,
    apply_override,
    config_differences,
    config_from_dict,
    load_train_config,
)

EXAMPLES = sorted((Path(__file__).parent.parent / "configs" / "train").glob("*.yaml"))
README = Path(__file__).parent.parent / "configs" / "train" / "README.md"
MINIMAL = {"student": {"size": "toy", "tokenizer": "tok"}, "data": {"train": ["kd.jsonl"]}}


def fields(cls=TrainConfig, prefix=""):
    """Every leaf field as (dotted name, type hint)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        target = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if target is not None:
            yield from fields(target, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_train_config(path)
    assert config.train.steps > 0


def test_every_field_is_documented_in_the_readme():
    text = README.read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    for name, _ in fields():
        assert name.split(".")[-1] in documented, name
    assert "mlx.launch --backend ring" in text and "hostfile" in text


def test_overrides_create_sections_and_parse_yaml(tmp_path):
    data = dict(MINIMAL)
    for item in ("train.lora.rank=16", "optim.lr=2e-3", "data.train=[a.jsonl, b.jsonl]",
                 "teacher.remote_url=http://h:1/v1", "train.eval_every=5", "data.val_fraction=0.1"):
        apply_override(data, item)
    data["student"] = {"init": "ckpt"}
    data["teacher"]["mode"] = "on-policy"
    config = config_from_dict(data)
    assert config.train.lora.rank == 16 and config.train.lora.scale == 20.0
    assert config.optim.lr == 2e-3 and config.data.train == ["a.jsonl", "b.jsonl"]
    assert config.teacher.remote_url == "http://h:1/v1"
    with pytest.raises(ConfigError, match="expected section.field=value"):
        apply_override({}, "no-equals-sign")
    before, after = config.to_dict(), config_from_dict(
        {**data, "optim": {"lr": 1e-3}}).to_dict()
    assert config_differences(before, after) == ["optim.lr"]


BAD = [
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"optim": {"lr": -1}}, "optim.lr: expected a positive number"),
    ({"loss": {"kind": "kl"}}, "loss.kind: expected one of"),
    ({"train": {"stepz": 3}}, "train.stepz: unknown field"),
    ({"teacher": {"mode": "local"}}, "teacher.model: mode 'local' needs"),
    ({"loss": {"kind": "jsd"}}, "loss.kind: 'jsd' needs full teacher distributions"),
    ({"student": {"size": "toy", "init": "x"}}, "student.size: give exactly one"),
    ({"train": {"lora": {"rank": 4}}}, "train.lora: LoRA needs a pretrained student"),
    ({"data": {"shapes": [1]}}, "data.shapes[0]: expected an integer >= 2"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: expected two numbers"),
    ({"train": {"patience": 2}}, "train.patience: early stopping needs train.eval_every"),
    ({"optim": {"warmup_steps": 50}, "train": {"steps": 10}}, "optim.warmup_steps: expected <"),
    ({"train": {"progress": "yes"}}, "train.progress: expected true or false"),
    ({"data": {"batch_size": 2.5}}, "data.batch_size: expected an integer"),
    ({"train": {"eval_every": 5}, "data": {"val_fraction": 0.0}}, "train.eval_every: evaluation"),
    ({"debug": {"poison_steps": ["x"]}}, "debug.poison_steps[0]: expected an integer"),
]


@pytest.mark.parametrize("patch,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_is_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys, patch,
                                                                    message):
    data = {"out": str(tmp_path / "out"), **{k: dict(v) for k, v in MINIMAL.items()}}
    for section, values in patch.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"mlx-distill train: error: {path}: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_unreadable_files_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert cli.main(["train", str(missing)]) == 2
    assert "file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    assert cli.main(["train", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid YAML" in err and err.count("\n") == 0
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert cli.main(["train", str(listing)]) == 2
    assert "expected a mapping with sections" in capsys.readouterr().err


JUNK = st.one_of(st.text(max_size=5), st.integers(-5, 5), st.floats(allow_nan=False),
                 st.booleans(), st.none(), st.lists(st.integers(-2, 2), max_size=3),
                 st.dictionaries(st.sampled_from(["a", "rank"]), st.integers(0, 2), max_size=2))


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from([name for name, _ in fields()]), value=JUNK)
def test_any_value_in_any_field_is_accepted_or_refused_with_a_config_error(field, value):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    apply_override(data, f"{field}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    try:
        config_from_dict(data, "cfg.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("cfg.yaml: ")
        # A refusal names a dotted field of the schema (the one set, or the one it conflicts with).
        named = message.removeprefix("cfg.yaml: ").split(":")[0].split("[")[0]
        assert named in {name for name, _ in fields()} | {"student", "data", "train.lora"}, message
