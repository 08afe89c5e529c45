"""The whole pipeline, shortened (configs/demo/quick.yaml), as CI runs it: teacher SFT -> teacher
server on loopback -> KD records through the HTTP client -> >= 4x smaller student -> Core ML
fp16 + int8 -> verify -> eval of teacher, MLX student and Core ML student on the held-out split.

Asserts the toy gates the seed set (configs/gates.yaml, profile ``toy``): every enumerated shape
runs, no NaN / all-zero logits, tool-call lax micro-F1 >= 0.20, and a written report. About two
minutes on two CPU cores; the slowest test of the suite by design.
"""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill import cli
from mlx_distill.config import configs_dir
from mlx_distill.demo_config import ConfigError, load_demo_config
from mlx_distill.demo_data import offered_tools, without_descriptions, write_task
from mlx_distill.demo_steps import DemoError, teacher_server
from mlx_distill.tasks import toolcall
from mlx_distill.tasks.common import read_jsonl
from mlx_distill.tasks.toolcall_tools import TOOLS

TOY_F1 = 0.20


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    code = cli.main(["demo", "--quick", "--out", str(out), "--no-progress"])
    return code, out


def test_quick_demo_passes_the_toy_gates(demo_run, capsys):
    code, out = demo_run
    summary = json.loads((out / "demo.json").read_text())
    eval_report = json.loads((out / "eval" / "report.json").read_text())
    assert code == 0, summary.get("passed")
    # A distilled student at least 4x smaller than its teacher.
    params = summary["parameters"]
    assert params["teacher"] >= 4 * params["student"]
    # KD data came through the HTTP client with its cache and checkpoint files.
    n_train = summary["config"]["data"]["n_train"]
    kd = out / "kd" / "kd.jsonl"
    assert len(kd.read_text().splitlines()) == summary["kd"]["records"] == n_train
    assert (out / "kd" / "kd.jsonl.state.json").is_file()
    # The student trains on the merged copy: the same records, sorted by id.
    merged = [json.loads(line)["id"] for line in (out / "kd" / "kd.merged.jsonl").open()]
    assert merged == sorted(json.loads(line)["id"] for line in kd.open())
    assert (out / "kd" / "kd.jsonl.cache").is_dir()
    assert summary["kd"]["url"].startswith("http://127.0.0.1:")
    assert (out / "kd" / "teacher-serve.log").is_file()  # served by a `teacher serve` process
    # Every enumerated shape of both packages ran and matched MLX within verify-coreml's gates.
    assert set(summary["coreml"]) == {"fp16", "int8"}
    for package in summary["coreml"].values():
        assert package["passed"], package["failures"]
        assert package["shapes_ran"] == sorted(package["shapes"])
    # Teacher, MLX student and Core ML student were evaluated on the held-out split.
    labels = [b["label"] for b in eval_report["backends"]]
    assert labels == ["teacher", "student", "student-coreml-int8"]
    assert eval_report["profile"] == "toy"
    for backend in eval_report["backends"]:
        m = backend["metrics"]
        assert m["logits_ok"] is True, backend["label"]
        # Enumerated shapes exist only in the Core ML package (None: not applicable to MLX).
        assert m["shapes_ok"] is (True if backend["kind"] == "coreml" else None), backend["label"]
        assert m["lax_f1"] >= TOY_F1, (backend["label"], m["lax_f1"])
        assert backend["passed"]
    # The Core ML student computes what the MLX student does: same predictions, sample by sample.
    student, coreml = (eval_report["backends"][i]["quality"] for i in (1, 2))
    assert coreml["lax"]["f1"] == pytest.approx(student["lax"]["f1"], abs=0.1)
    # The report has the comparison table, the plots and the stage timings.
    report = (out / "report.md").read_text()
    assert "| teacher |" in report and "| student-coreml-int8 |" in report
    for figure in ("eval/latency.png", "eval/categories.png", "teacher/loss_curve.png"):
        assert figure in report and (out / figure).is_file()
    stages = [s["name"] for s in summary["stages"]]
    assert stages == ["data", "tokenizer", "teacher", "kd-generate", "student", "coreml",
                      "eval", "report"]


def test_demo_refuses_a_used_directory_and_bad_config(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert cli.main(["demo", "--quick", "--out", str(used), "--no-progress"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (used / "keep.txt").read_text() == "mine"

    with pytest.raises(ConfigError, match=r"quick.yaml: student.steps: expected an integer"):
        load_demo_config("quick", ["student.steps=0"])
    with pytest.raises(ConfigError, match="eval.coreml: expected one of export.precisions"):
        load_demo_config("quick", ["eval.coreml=int4"])
    with pytest.raises(ConfigError, match="teacher.model.n_kv_heads"):
        load_demo_config("quick", ["teacher.model.n_kv_heads=3"])  # 4 heads: not a divisor
    with pytest.raises(ConfigError, match="unknown field"):
        load_demo_config("quick", ["kd.bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: chess\n")
    assert cli.main(["demo", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "task: expected one of toolcall, eightball" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["toolcall", "eightball", "quick"])
def test_shipped_demo_configs_are_valid(name):
    config = load_demo_config(name)
    raw = yaml.safe_load((configs_dir() / "demo" / f"{name}.yaml").read_text())
    assert config.task == raw["task"]
    assert config.eval.coreml in config.export.precisions


def _strip_descriptions(node):
    """Every ``description`` key removed, at any depth (the reference for the demo's stripping)."""
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


@settings(max_examples=25, deadline=None)
@given(count=st.integers(0, 6), seed=st.integers(0, 3))
def test_offered_tools_keep_the_gold_tools_and_fill_with_distractors(count, seed):
    samples = [s for split in toolcall.generate(20, 2, 6, seed=1).values() for s in split]
    for sample in samples:
        offered = offered_tools(sample, count, seed)
        names = [t["function"]["name"] for t in offered]
        called = {c["name"] for c in sample["gold"].get("calls") or []}
        assert called <= set(names) and len(set(names)) == len(names)
        everything = count == 0 or count >= len(TOOLS)
        assert len(names) == (len(TOOLS) if everything else max(count, len(called)))
        assert all(t in sample["tools"] for t in offered)
        assert offered == offered_tools(sample, count, seed)  # seeded: same every time
        for tool in offered:
            assert without_descriptions(tool) == _strip_descriptions(tool)


def test_written_task_files_agree_with_each_other(tmp_path):
    out = write_task("toolcall", tmp_path / "task", (12, 3, 6), seed=2, tools_per_sample=2,
                     tool_descriptions=False)
    fixtures = read_jsonl(out / "fixtures.jsonl")
    for split in ("train", "val", "test"):
        samples = read_jsonl(out / f"{split}.jsonl")
        prompts = read_jsonl(out / f"{split}.prompts.jsonl")
        sft = read_jsonl(out / f"{split}.sft.jsonl")
        for sample, prompt, conversation in zip(samples, prompts, sft, strict=True):
            assert sample["tools"] == prompt["tools"] == conversation["tools"]
            assert len(sample["tools"]) == max(2, len(sample["gold"].get("calls") or []))
            assert "description" not in json.dumps(sample["tools"])
            for call in sample["gold"].get("calls") or []:
                assert {"name": call["name"], "arguments": call["arguments"]} in [
                    {"name": f["name"], "arguments": f["arguments"]} for f in fixtures]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tools_per_sample"] == 2 and manifest["counts"]["test"] == 6


def test_a_teacher_server_that_cannot_start_is_one_clear_error(tmp_path):
    log = tmp_path / "serve.log"
    with pytest.raises(DemoError, match="teacher serve did not start") as info:
        with teacher_server(tmp_path / "no-such-checkpoint", log):
            pass
    assert "\n" not in str(info.value) and str(log) in str(info.value)
    assert "no-such-checkpoint" in log.read_text()
