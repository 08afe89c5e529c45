"""``mlx-distill train CONFIG.yaml``: build the student, data and teacher from a config and train.

Data parallel: the same command under ``mlx.launch`` trains on every host; each rank takes its
rows of every global batch, gradient and loss SUMS are all-reduced before each update, so the
result equals one process on the whole batch. Only rank 0 writes the output directory.

One machine, two processes (ring backend over loopback)::

    mlx.launch --backend ring -n 2 python -m mlx_distill train run.yaml

Several Macs: the same environment and files (config, data, tokenizer, init checkpoint) at the same
paths on every host, passwordless ssh from the launching host, and a hostfile listing the hosts,
e.g. ``hosts.json`` = ``[{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "mac2.local",
"ips": ["10.0.0.2"]}]``::

    mlx.launch --backend ring --hostfile hosts.json -- python -m mlx_distill train run.yaml

(``mlx.distributed_config --hosts mac1.local,mac2.local --over thunderbolt`` writes a hostfile for
Thunderbolt rings; ``--backend mpi`` works too.) ``data.batch_size`` is the global micro-batch and
must divide by the number of processes. ``--resume`` needs rank 0's output directory visible at the
same path on every host (a shared filesystem), or copied there before resuming.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import yaml
from mlx.utils import tree_flatten

from mlx_distill.atomic import atomic_write_text
from mlx_distill.cli import UserError
from mlx_distill.data import BatchLoader
from mlx_distill.train_config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    config_differences,
    load_train_config,
)
from mlx_distill.train_state import LATEST, read_pointer, read_state
from mlx_distill.trainer import Trainer, TrainResult

CONFIG_COPY = "train_config.yaml"


# ---- student ----

def load_student_tokenizer(config: TrainConfig) -> tuple[Any, Path]:
    from mlx_distill.tokenizer import load_tokenizer

    path = Path(config.student.tokenizer or config.student.init)
    return load_tokenizer(path), path


def build_student(config: TrainConfig, tokenizer: Any):
    """The model to train: loaded from ``student.init`` or initialized from ``student.size``
    (vocabulary = the tokenizer's), with LoRA layers when ``train.lora`` is set."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_distill.checkpoint import load_checkpoint
    from mlx_distill.config import load_size_config
    from mlx_distill.model import Model

    s, lora = config.student, config.train.lora
    dtype = getattr(mx, s.dtype)
    n_tokens = len(tokenizer.get_vocab())
    mx.random.seed(config.train.seed)
    if s.init is not None:
        model = load_checkpoint(s.init, dtype=dtype)
        if model.config.vocab_size < n_tokens:
            raise UserError(f"student.tokenizer: {n_tokens} tokens, but {s.init} has vocab_size "
                            f"{model.config.vocab_size}")
    else:
        size = load_size_config(s.size)
        model = Model(dataclasses.replace(size.model, vocab_size=n_tokens))
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    if lora is not None:
        n_layers = model.config.n_layers
        if lora.num_layers > n_layers:
            raise UserError(f"train.lora.num_layers: {lora.num_layers} exceeds the student's "
                            f"{n_layers} layers")
        model.freeze()
        params = {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout}
        if lora.keys is not None:
            params["keys"] = lora.keys
        try:
            linear_to_lora_layers(model, lora.num_layers or n_layers, params)
        except ValueError as exc:
            raise UserError(f"train.lora.keys: {exc}") from None
        if not tree_flatten(model.trainable_parameters()):
            raise UserError(f"train.lora.keys: {lora.keys} matched no linear layer in a block "
                            "(expected paths such as self_attn.q_proj, mlp.down_proj)")
        mx.eval(model.parameters())
    return model


# ---- data ----

class TrackingLoader(BatchLoader):
    """A :class:`BatchLoader` that also remembers which examples made this rank's last batch
    (on-policy remote scoring needs each row's conversation)."""

    last_rows: list = []

    def assemble(self, shape, members):
        per_rank = self.batch_size // self.world_size
        first = self.rank * per_rank
        self.last_rows = [self.examples[int(members[i])] if i < len(members) else None
                          for i in range(first, first + per_rank)]
        return super().assemble(shape, members)


def build_data(config: TrainConfig, tokenizer: Any, rank: int, world: int, log=print):
    """``(train_loader, val_batches or None)`` from ``config.data``; prints the data report."""
    from mlx_distill.data import linear_curriculum, load_dataset, split_validation
    from mlx_distill.data.stats import format_stats
    from mlx_distill.tokenizer import load_tokenizer

    d, t = config.data, config.train
    teacher_tokenizer = load_tokenizer(d.teacher_tokenizer) if d.teacher_tokenizer else None
    options = dict(teacher_tokenizer=teacher_tokenizer, align=d.align,
                   tool_arguments=d.tool_arguments, max_bad_fraction=d.max_bad_fraction)
    dataset = load_dataset(d.train + d.sft, tokenizer, **options)
    if rank == 0:
        log("\n".join(format_stats(dataset, None, d.batch_size)))
    train, val = dataset.examples, []
    if d.val:
        val = load_dataset(d.val, tokenizer, **options).examples
    elif t.eval_every:
        train, val = split_validation(train, d.val_fraction, seed=t.seed)
    accum = config.optim.grad_accum
    # The loader counts micro-batches; the config counts optimizer steps.
    curriculum = [(start * accum, max_len) for start, max_len in d.curriculum]
    if d.linear_curriculum:
        curriculum = [(s * accum, m) for s, m in linear_curriculum(d.shapes, t.steps)]
    k = max((e.teacher.k for e in train + val if e.teacher is not None), default=1)
    common = dict(shapes=d.shapes, batch_size=d.batch_size, k=k, pad_id=dataset.vocab.pad_id,
                  overflow=d.overflow, seed=t.seed, rank=rank, world_size=world)
    loader = TrackingLoader(train, curriculum=curriculum, **common)
    val_batches = None
    if val:
        val_loader = BatchLoader(val, shuffle=False, **common)
        val_batches = val_loader.iterate_once
    return loader, val_batches, dataset.vocab


def read_conversations(paths: list[str]) -> dict[str, tuple[list, list | None]]:
    """Example id -> (prompt messages, tools) of the records in ``paths``, keyed as
    :func:`mlx_distill.data.load_dataset` names examples (record id; ``path:line`` for SFT
    conversations without one). Remote on-policy scoring sends these to the teacher server."""
    from mlx_distill.data.dataset import is_sft_example

    out = {}
    for path in map(Path, paths):
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                    continue
                messages = obj["messages"]
                if is_sft_example(obj):
                    messages = messages[:-1]  # the gold answer is what the student replaces
                key = obj["id"] if isinstance(obj.get("id"), str) else f"{path}:{lineno}"
                out[key] = (messages, obj.get("tools"))
    return out


# ---- teacher ----

def build_prepare(config: TrainConfig, model, tokenizer, loader, vocab):
    """The per-micro-batch hook: on-policy resampling, then local-teacher annotation."""
    from mlx_distill.teachers_local import LocalTeacher, OnPolicy, RemoteScorer

    tc = config.teacher
    local = None
    if tc.model is not None:
        local = LocalTeacher(tc.model, tokenizer, model.config.vocab_size, tc.top_k,
                             compile=config.train.compile)
    on_policy = None
    if tc.mode == "on-policy":
        remote = conversations = None
        if tc.remote_url is not None:
            remote = RemoteScorer(tc.remote_url, tc.remote_top_logprobs, tc.remote_timeout_s,
                                  vocab)
            table = read_conversations(config.data.train + config.data.sft)
            conversations = table.__getitem__
        on_policy = OnPolicy(model, tokenizer, tc.on_policy_fraction, tc.max_new_tokens,
                             tc.sample_temperature, config.train.seed, vocab.pad_id,
                             remote=remote, conversation=conversations)
    if local is None and on_policy is None:
        return None

    def prepare(batch, step, micro):
        # step -1: a validation batch (scored by the teacher, never resampled).
        if on_policy is not None and step >= 0 and on_policy.chosen(step, micro):
            batch = on_policy.resample(batch, loader.last_rows)
        if local is not None:
            batch = local.annotate(batch)
        return batch

    return prepare


# ---- the run ----

def _check_out_dir(config: TrainConfig, resume: bool) -> None:
    out = Path(config.out)
    latest = read_pointer(out, LATEST)
    if not resume:
        if latest is not None:
            raise UserError(f"out: {out} already has checkpoints (latest {latest.name}); pass "
                            "--resume to continue that run, or choose another --out")
        return
    if latest is None:
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'} (nothing to resume; "
                        "start without --resume)")
    saved = read_state(latest).get("config", {})
    changed = [f for f in config_differences(saved, config.to_dict())
               if f not in RESUMABLE_CHANGES]
    if changed:
        field = changed[0]
        before, now = _dig(saved, field), _dig(config.to_dict(), field)
        raise UserError(f"--resume: {field} differs from the run in {out} ({before!r} there, "
                        f"{now!r} now); resume with the same config or start a new --out")


def _dig(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def run_training(config: TrainConfig, resume: bool = False, log=print) -> TrainResult:
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    _check_out_dir(config, resume)
    tokenizer, tokenizer_dir = load_student_tokenizer(config)
    model = build_student(config, tokenizer)
    loader, val_batches, vocab = build_data(config, tokenizer, rank, world, log)
    prepare = build_prepare(config, model, tokenizer, loader, vocab)
    trainer = Trainer(config, model, loader, val_batches=val_batches, prepare=prepare,
                      tokenizer_dir=tokenizer_dir, group=group)
    if resume:
        ckpt = trainer.resume()
        if rank == 0:
            log(f"resumed from {ckpt} (step {trainer.loop.step})")
    elif rank == 0:
        trainer.metrics.truncate_after(0)  # leftovers of a run that died before any checkpoint
    if rank == 0:
        atomic_write_text(Path(config.out) / CONFIG_COPY,
                          yaml.safe_dump(config.to_dict(), sort_keys=False))
    result = trainer.run()
    if rank == 0:
        _summary(result, config, log)
    return result


def _summary(result: TrainResult, config: TrainConfig, log) -> None:
    out = Path(config.out)
    last = result.last
    line = f"done: {result.steps} steps ({result.stop_reason.replace('_', ' ')})"
    if last.get("loss") is not None:
        line += f", last loss {last['loss']:.4f}"
    if result.best_val is not None:
        line += f", best val loss {result.best_val:.4f}"
    log(line)
    log(f"latest checkpoint: {result.latest}")
    if result.best is not None:
        log(f"best checkpoint:   {result.best}")
    log(f"metrics: {out / 'metrics.jsonl'}")


def _cmd_train(args) -> int:
    overrides = list(args.set or [])
    if args.out is not None:
        overrides.append(f"out={args.out}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_train_config(args.config, overrides)
    run_training(config, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="distill (or fine-tune) a student from a training config",
        description="Train the student described by CONFIG (see configs/train/README.md): KD "
        "from offline records, a local teacher or on-policy samples; checkpoints, metrics, "
        "loss curve in the output dir. Under mlx.launch it trains data-parallel.",
    )
    p.add_argument("config", help="training config YAML")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the output dir from its latest checkpoint")
    p.add_argument("--out", help="output dir (overrides 'out')")
    p.add_argument("--steps", type=int, help="training steps (overrides train.steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.set_defaults(func=_cmd_train)
