"""Distillation training-step throughput: our ``Trainer`` step vs mlx-lm's trainer step.

Three runners per size config, each with its own copy of the same initial weights, the same AdamW
(``mlx_distill.trainer.make_optimizer``: schedule, betas, weight decay), the same batches in the
same order:

* ``mlx-lm``: the step of ``mlx_lm.tuner.trainer.train`` rebuilt line for line
  (:func:`make_mlx_lm_step`): ``default_loss`` (masked CE) under ``nn.value_and_grad``,
  ``mx.compile`` with ``[model.state, optimizer.state, mx.random.state]`` as inputs and outputs,
  ``average_gradients``, ``optimizer.update``; after each step the loop's
  ``mx.eval(state, losses, n_tokens, grad_accum)`` and ``_clear_cache(clear_cache_threshold=0)``
  (the ``mlx_lm lora`` default, which frees MLX's buffer cache every step; ``--peer-keep-cache``
  skips it). mlx-lm's llama ``Model`` gets our weights (``load_weights(strict=True)``).
* ``ours KD``: ``mlx_distill.trainer.Trainer.step()`` as ``mlx-distill train`` runs it: sparse
  forward KL on the teacher's top-K (K = 20) with the tail bucket, ``alpha * CE + (1 - alpha) *
  KD``, gradient clipping at 1.0 (``--grad-clip``) and the non-finite skip, all in one compiled
  function and one evaluation per step (``mlx_distill.train.make_fused_step``).
* ``ours CE``: the same ``Trainer.step()`` with ``loss.kind: ce`` (the KD-overhead baseline).

Data is synthetic (throughput does not depend on token values): full rows of ``seq_len`` random
tokens whose last ``1 - prompt_fraction`` are the supervised completion (mlx-lm: ``lengths =
(offset, seq_len)``, the same positions), and at every supervised position K distinct teacher ids
(the target among them) with random log-probs. Batches are built before timing, as in mlx-lm's
loop, where the batch is fetched before its timer starts.

Rounds rotate the runner order; headline ratios are medians of per-round ratios (each round runs
every runner back to back, so a slow spell of a shared machine hits all alike). Peak memory is
MLX's (``mx.get_peak_memory``) during each runner's steps, as ``resident`` (its parameters and
optimizer state) plus ``transient`` (peak minus the memory active before the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import mlx_distill  # noqa: F401  (must precede mlx.core: interposes OpenBLAS on Linux)
from mlx_distill import fast_blas

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import default_loss

from mlx_distill.config import ModelConfig, load_size_config
from mlx_distill.data.batches import slot_width
from mlx_distill.model import Model, num_parameters
from mlx_distill.train_config import TrainConfig, config_from_dict
from mlx_distill.trainer import Trainer, make_objective, make_optimizer

# Per size: (batch, seq_len), so that a default run of both takes about 3 minutes on a 2-core VM.
DEFAULT_SHAPES = {"toy": (8, 256), "small": (4, 128)}
GOAL_VS_MLX_LM = 1.0
GOAL_KD_OVERHEAD = 0.15


# ---- mlx-lm's step, as mlx_lm.tuner.trainer.train builds it ----

def make_mlx_lm_step(model: nn.Module, optimizer, grad_accum_steps: int = 1):
    """``(step, state)`` exactly as in ``mlx_lm.tuner.trainer.train`` (mlx-lm 0.32)."""
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)

        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)

        if do_update:
            grad = average_gradients(grad)
            if grad_accum_steps > 1:
                grad = tree_map(lambda x: x / grad_accum_steps, grad)
            optimizer.update(model, grad)
            grad = None

        return lvalue, toks, grad

    return step, state


class MlxLmLoop:
    """The body of ``train()``'s loop around the step (no evaluation, reporting or saving)."""

    def __init__(self, model, optimizer, batches, clear_cache: bool = True):
        model.train()
        self.step, self.state = make_mlx_lm_step(model, optimizer)
        self.batches, self.clear_cache = batches, clear_cache
        self.losses, self.n_tokens, self.grad_accum, self.it = 0, 0, None, 0
        self.first_loss: float | None = None

    def __call__(self) -> None:
        self.it += 1
        batch = self.batches[(self.it - 1) % len(self.batches)]
        lvalue, toks, self.grad_accum = self.step(batch, self.grad_accum, True)
        self.losses += lvalue
        self.n_tokens += toks
        mx.eval(self.state, self.losses, self.n_tokens, self.grad_accum)
        if self.first_loss is None:
            self.first_loss = lvalue.item()
        if self.clear_cache and mx.get_cache_memory() > 0:  # _clear_cache(threshold=0)
            mx.clear_cache()


# ---- data ----

def make_batches(vocab: int, batch: int, seq_len: int, k: int, prompt_fraction: float,
                 count: int, seed: int) -> list[tuple[dict, tuple]]:
    """``count`` batches in both layouts: ours (a ``BatchLoader``-style dict), mlx-lm's
    ``(tokens (B, S+1), lengths (B, 2))``."""
    rng = np.random.default_rng(seed)
    offset = min(max(int(seq_len * prompt_fraction), 1), seq_len)  # first supervised step
    out = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss_mask = np.zeros((batch, seq_len), np.float32)
        loss_mask[:, offset - 1:] = 1.0  # mlx-lm: steps = t + 1 >= offset
        keys = rng.random((batch, seq_len, vocab), dtype=np.float32)
        np.put_along_axis(keys, targets[..., None], -1.0, axis=-1)  # the target is in the top-k
        top_ids = np.argpartition(keys, k - 1, axis=-1)[..., :k].astype(np.int32)
        logits = rng.normal(0.0, 2.0, size=(batch, seq_len, k + 1))  # K ids + the tail
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top_logprobs = np.where(loss_mask[..., None] > 0, logprobs[..., :k], -np.inf)
        ours = {
            "inputs": inputs, "targets": targets, "loss_mask": loss_mask, "kd_mask": loss_mask,
            "tool_mask": np.zeros_like(loss_mask), "top_ids": top_ids,
            "top_logprobs": top_logprobs.astype(np.float32),
        }
        # Where the supervised positions are, as BatchLoader says: our objective computes the LM
        # head and the losses there only. mlx-lm computes logits at every position.
        run = seq_len - (offset - 1)
        width = slot_width(run, seq_len)
        ours["loss_positions"] = np.zeros((batch, width), np.int32)
        ours["loss_positions"][:, :run] = np.arange(offset - 1, seq_len)
        ours["loss_slots"] = np.zeros((batch, width), np.float32)
        ours["loss_slots"][:, :run] = 1.0
        ours = {key: mx.array(value) for key, value in ours.items()}
        lengths = mx.array([[offset, seq_len]] * batch, dtype=mx.int32)
        peer = (mx.array(tokens), lengths)
        mx.eval(ours, peer)
        out.append((ours, peer))
    return out


# ---- models and runners ----

def train_config(kind: str, out: str, lr: float, seed: int, grad_clip: float = 1.0
                 ) -> TrainConfig:
    return config_from_dict({
        "out": out,
        "student": {"size": "toy", "tokenizer": "unused"},  # the model is built here instead
        "data": {"train": ["synthetic"]},
        "loss": {"kind": kind, "alpha": 0.5, "temperature": 1.0},
        "optim": {"lr": lr, "grad_clip": grad_clip},
        "train": {"steps": 100_000, "seed": seed, "progress": False, "plot": False},
    })


def copy_weights(source: Model, target: nn.Module) -> None:
    # Copies, not shared buffers; strict=True fails on any name or shape mismatch.
    target.load_weights([(k, mx.array(np.array(v))) for k, v in
                         tree_flatten(source.parameters())], strict=True)
    mx.eval(target.parameters())


def state_bytes(*trees) -> int:
    return sum(v.nbytes for tree in trees for _, v in tree_flatten(tree)
               if isinstance(v, mx.array))


@dataclasses.dataclass
class Runner:
    name: str
    step: Callable[[], None]  # one training step, evaluated
    resident: Callable[[], int]  # bytes of its parameters + optimizer state
    seconds: list[float] = dataclasses.field(default_factory=list)
    transient: int = 0

    def run(self, steps: int, record: bool = True) -> None:
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        elapsed = time.perf_counter() - t0
        self.transient = max(self.transient, mx.get_peak_memory() - before)
        if record:
            self.seconds.append(elapsed / steps)


def build_runners(config: ModelConfig, batches, args, tmp: str) -> tuple[list[Runner], dict]:
    mx.random.seed(args.seed)
    base = Model(config)
    mx.eval(base.parameters())
    runners, info = [], {"params": num_parameters(base)}

    peer = llama.Model(llama.ModelArgs.from_dict(config.to_hf_dict()))
    copy_weights(base, peer)
    peer_opt = make_optimizer(train_config("ce", tmp, args.lr, args.seed))
    loop = MlxLmLoop(peer, peer_opt, [b[1] for b in batches],
                     clear_cache=not args.peer_keep_cache)
    runners.append(Runner("mlx-lm", loop, lambda: state_bytes(peer.parameters(), peer_opt.state)))
    info["mlx-lm"] = peer

    for kind, name in (("ce", "ours CE"), ("forward_kl", "ours KD")):
        model = Model(config)
        copy_weights(base, model)
        cfg = train_config(kind, f"{tmp}/{kind}", args.lr, args.seed, args.grad_clip)
        trainer = Trainer(cfg, model, itertools.cycle([b[0] for b in batches]))
        info[name] = (cfg, model)
        runners.append(Runner(name, partial(_trainer_step, trainer), lambda t=trainer: state_bytes(
            t.model.parameters(), t.optimizer.state)))
    return runners, info


def _trainer_step(trainer: Trainer) -> None:
    record = trainer.step()
    if record["skipped"]:
        sys.exit(f"{trainer.config.loss.kind} step {record['step']}: non-finite loss or gradient")


def check_agreement(info: dict, batches, tol: float) -> str:
    """Ours (CE objective) and mlx-lm's ``default_loss`` must agree on the first batch before any
    update: the same weights, tokens and supervised positions. The KD objective must be finite."""
    ours_batch, (tokens, lengths) = batches[0]
    cfg, model = info["ours CE"]
    _, ce_sums = make_objective(cfg)(model, ours_batch)
    kd_cfg, kd_model = info["ours KD"]
    _, kd_sums = make_objective(kd_cfg)(kd_model, ours_batch)
    peer_loss, _ = default_loss(info["mlx-lm"], tokens, lengths)
    mx.eval(ce_sums, kd_sums, peer_loss)
    # sums are laid out as mlx_distill.train.SUM_FIELDS: loss, ce, kd, n_tokens, n_kd_tokens
    ce = ce_sums[0].item() / max(ce_sums[3].item(), 1.0)
    kd = kd_sums[2].item() / max(kd_sums[4].item(), 1.0)
    peer = peer_loss.item()
    if not (math.isfinite(ce) and math.isfinite(kd) and abs(ce - peer) <= tol * max(1.0, ce)):
        sys.exit(f"first-batch losses disagree: ours CE {ce:.6f}, mlx-lm {peer:.6f} (KD {kd}): "
                 "the runners do not train on the same thing")
    return (f"first-batch loss before any update: ours CE {ce:.6f}, mlx-lm {peer:.6f} "
            f"(|diff| {abs(ce - peer):.1e}); ours KD part {kd:.4f}")


# ---- measurement and report ----

def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """(median, lower quartile, upper quartile, min, max)."""
    if len(values) > 1:
        low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    else:
        low = high = values[0]
    return statistics.median(values), low, high, min(values), max(values)


def verdict(values: list[float], goal: float, higher_is_better: bool) -> str:
    med, low, high, _, _ = spread(values)
    ok = (lambda v: v >= goal) if higher_is_better else (lambda v: v <= goal)
    if ok(med):
        return "met"
    if ok(high if higher_is_better else low):
        return "not met by the median; the goal is inside the interquartile range (noise)"
    return "NOT met"


def measure(size: str, args) -> dict:
    model_config = load_size_config(size).model
    batch, seq_len = DEFAULT_SHAPES.get(size, (8, 256))
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    if seq_len > model_config.max_seq_len:
        model_config = dataclasses.replace(model_config, max_seq_len=seq_len)
    batches = make_batches(model_config.vocab_size, batch, seq_len, args.k, args.prompt_fraction,
                           args.distinct_batches, args.seed)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        runners, info = build_runners(model_config, batches, args, tmp)
        agreement = check_agreement(info, batches, args.loss_rtol)
        print(f"\n== {size}: {info['params'] / 1e6:.2f}M params (d_model {model_config.d_model}, "
              f"{model_config.n_layers} layers, vocab {model_config.vocab_size}); batch {batch} x "
              f"{seq_len}, completion = last {1 - args.prompt_fraction:.0%} of each row, K = "
              f"{args.k}\n{agreement}", flush=True)
        for r in runners:
            t0 = time.perf_counter()
            r.run(args.warmup, record=False)
            print(f"warmup {r.name}: {args.warmup} steps in {time.perf_counter() - t0:.1f} s "
                  "(includes compilation)", flush=True)
        for rnd in range(args.rounds):
            shift = rnd % len(runners)
            for r in runners[shift:] + runners[:shift]:
                r.run(args.steps)
            line = "   ".join(f"{r.name} {batch * seq_len / r.seconds[-1]:8.1f} tok/s"
                              for r in runners)
            print(f"round {rnd + 1}: {line}", flush=True)
        peer, ce, kd = runners
        result = {
            "size": size, "params": info["params"], "batch": batch, "seq_len": seq_len,
            "k": args.k, "rounds": args.rounds, "steps_per_round": args.steps,
            "grad_clip": args.grad_clip, "mlx_lm_clears_cache": not args.peer_keep_cache,
            "runners": {r.name: {
                "tok_per_s": batch * seq_len / statistics.median(r.seconds),
                "seconds_per_step": r.seconds,
                "resident_bytes": r.resident(),
                "transient_bytes": r.transient,
            } for r in runners},
            "kd_vs_mlx_lm": [p / k for p, k in zip(peer.seconds, kd.seconds, strict=True)],
            "ce_vs_mlx_lm": [p / c for p, c in zip(peer.seconds, ce.seconds, strict=True)],
            "kd_overhead": [k / c - 1 for k, c in zip(kd.seconds, ce.seconds, strict=True)],
        }
    return result


def _fmt_spread(values: list[float], percent: bool = False) -> str:
    med, low, high, lo, hi = spread(values)
    f = (lambda v: f"{100 * v:+.1f} %") if percent else (lambda v: f"{v:.3f}")
    return f"{f(med)} (IQR {f(low)} .. {f(high)}; range {f(lo)} .. {f(hi)})"


def report(results: list[dict]) -> None:
    mib = 1 / 2**20
    print("\n| size | params | batch x seq | step | tok/s (median) | resident MiB | "
          "transient MiB | peak MiB |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for res in results:
        for name, r in res["runners"].items():
            resident, transient = r["resident_bytes"] * mib, r["transient_bytes"] * mib
            print(f"| {res['size']} | {res['params'] / 1e6:.2f}M | {res['batch']} x "
                  f"{res['seq_len']} | {name} | {r['tok_per_s']:.1f} | {resident:.1f} | "
                  f"{transient:.1f} | {resident + transient:.1f} |")
    print("\n| size | ours KD / mlx-lm (goal >= 1.0) | ours CE / mlx-lm | KD overhead vs CE "
          "(goal <= 15 %) |")
    print("| --- | --- | --- | --- |")
    for res in results:
        print(f"| {res['size']} | {_fmt_spread(res['kd_vs_mlx_lm'])} | "
              f"{_fmt_spread(res['ce_vs_mlx_lm'])} | "
              f"{_fmt_spread(res['kd_overhead'], percent=True)} |")
    print()
    for res in results:
        n = len(res["kd_overhead"])
        print(f"{res['size']}: ours KD / mlx-lm >= {GOAL_VS_MLX_LM}: "
              f"{verdict(res['kd_vs_mlx_lm'], GOAL_VS_MLX_LM, True)}; KD overhead <= "
              f"{GOAL_KD_OVERHEAD:.0%}: {verdict(res['kd_overhead'], GOAL_KD_OVERHEAD, False)} "
              f"({n} rounds x {res['steps_per_round']} steps; ratios are medians of per-round "
              "ratios)")
    # ru_maxrss is in KiB on Linux: the whole process, all runners and sizes together.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS (all runners together): {rss:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="tokens/s of our distillation Trainer step (sparse top-k KD + CE) vs "
                    "mlx-lm's trainer step, and KD vs CE-only; same model, data and optimizer.")
    p.add_argument("--sizes", default="toy,small",
                   help="size configs (configs/sizes), comma-separated (default %(default)s)")
    p.add_argument("--batch", type=int, help="rows per batch (default: per size, "
                   + ", ".join(f"{k} {b}" for k, (b, _) in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--seq-len", type=int, help="row length (default: per size, "
                   + ", ".join(f"{k} {s}" for k, (_, s) in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--k", type=int, default=20, help="teacher top-k (default %(default)s)")
    p.add_argument("--prompt-fraction", type=float, default=0.75,
                   help="share of each row that is prompt (not supervised) (default %(default)s)")
    p.add_argument("--rounds", type=int, default=8, help="measurement rounds (default %(default)s)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps per runner per round (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per runner first (compilation) (default %(default)s)")
    p.add_argument("--distinct-batches", type=int, default=4,
                   help="different batches cycled through (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW peak lr (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="our steps' gradient clipping (mlx-distill train's default 1.0; 0: off, "
                        "as mlx-lm, which never clips)")
    p.add_argument("--peer-keep-cache", action="store_true",
                   help="do not free MLX's buffer cache after each mlx-lm step (mlx-lm's "
                        "default clear_cache_threshold 0 frees it)")
    p.add_argument("--loss-rtol", type=float, default=1e-4,
                   help="allowed relative difference of the first CE losses (default %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "distinct_batches", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if not 0 < args.prompt_fraction < 1:
        p.error("--prompt-fraction: expected a number in (0, 1)")

    status = fast_blas.status()
    blas = (f"OpenBLAS via shim, OPENBLAS_NUM_THREADS={status.threads}" if status.enabled
            else f"stock ({status.reason})")
    print(f"mlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}; AdamW lr {args.lr}"
          f", weight decay 0.01; ours clips gradients at {args.grad_clip or 'off'}; mlx-lm "
          f"{'keeps' if args.peer_keep_cache else 'clears'} the buffer cache each step")
    results = [measure(size.strip(), args) for size in args.sizes.split(",") if size.strip()]
    report(results)
    if args.json:
        import json
        from pathlib import Path

        from mlx_distill.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
