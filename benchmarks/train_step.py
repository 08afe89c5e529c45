"""Train-step throughput: our student ``Model`` vs mlx-lm's llama ``Model`` on the same config.

Both models get identical weights (ours are copied into mlx-lm's, names match), the same AdamW
(same lr), the same batches in the same order, and the same compilation: an mlx-lm-style step,
``mx.compile(step, inputs=state, outputs=state)`` with ``state = [model.state, optimizer.state]``.

* ours:   ``mlx_distill.train.make_train_step`` (``lm_loss``: masked mean cross-entropy);
* mlx-lm: ``mlx_lm.tuner.trainer.default_loss`` (the loss ``mlx_lm lora`` trains with).

Before timing, the first losses of both are checked to agree. Timing alternates rounds
(ours first on even rounds, mlx-lm first on odd ones) so machine drift hits both alike.
The OpenBLAS thread count is read from the environment at import, so compare with e.g.
``OPENBLAS_NUM_THREADS=2 python benchmarks/train_step.py``.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import statistics
import sys
import tempfile
import time
from functools import partial

import mlx_distill  # noqa: F401  (must precede mlx.core: interposes OpenBLAS on Linux)
from mlx_distill import fast_blas

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import default_loss

from mlx_distill.config import ModelConfig
from mlx_distill.model import Model, num_parameters
from mlx_distill.train import lm_batches, lm_loss, make_train_step


def build_models(config: ModelConfig, seed: int) -> tuple[Model, llama.Model]:
    mx.random.seed(seed)
    ours = Model(config)
    mx.eval(ours.parameters())
    peer = llama.Model(llama.ModelArgs.from_dict(config.to_hf_dict()))
    # Copies, not shared buffers: each model owns its arrays as in a real run. strict=True fails
    # on any name or shape mismatch between the two architectures.
    weights = [(k, mx.array(np.array(v))) for k, v in tree_flatten(ours.parameters())]
    peer.load_weights(weights, strict=True)
    mx.eval(peer.parameters())
    return ours, peer


def make_peer_step(model: nn.Module, optimizer: optim.Optimizer, compile: bool = True):
    """The core of ``mlx_lm.tuner.trainer.train``'s step (no grad accumulation, no distributed)."""
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state]

    def step(batch, lengths):
        (loss, _ntoks), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss

    if compile:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    return step


def make_batches(config: ModelConfig, batch: int, seq_len: int, count: int, seed: int):
    """``count`` batches in both forms: ours (inputs, targets, mask), mlx-lm's (tokens, lengths)."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, config.vocab_size, size=max(200_000, 4 * batch * (seq_len + 1)))
    source = lm_batches(stream, batch, seq_len, seed=seed)
    # lengths (offset, length) = (0, seq_len): every target position counts, as with mask = 1.
    lengths = mx.array([[0, seq_len]] * batch, dtype=mx.int32)
    out = []
    for _ in range(count):
        inputs, targets, mask = next(source)
        tokens = mx.concatenate([inputs, targets[:, -1:]], axis=1)
        mx.eval(inputs, targets, mask, tokens)
        out.append(((inputs, targets, mask), (tokens, lengths)))
    return out


def check_agreement(ours, peer, batches, tol: float) -> tuple[float, float]:
    (inputs, targets, mask), (tokens, lengths) = batches[0]
    loss_ours = lm_loss(ours, inputs, targets, mask)
    loss_peer, _ = default_loss(peer, tokens, lengths)
    logit_diff = mx.abs(ours(inputs) - peer(inputs)).max()
    mx.eval(loss_ours, loss_peer, logit_diff)
    a, b = loss_ours.item(), loss_peer.item()
    print(f"first loss (before any update): ours {a:.6f}  mlx-lm {b:.6f}  "
          f"|diff| {abs(a - b):.2e}; max |logit diff| {logit_diff.item():.2e}")
    if not (math.isfinite(a) and abs(a - b) <= tol * max(1.0, abs(a))):
        sys.exit(f"losses disagree by more than rtol {tol}: the models do not compute the same")
    return a, b


def primitive_counts(outputs: list[mx.array]) -> collections.Counter:
    """How many nodes of each MLX primitive the (uncompiled) graph behind ``outputs`` has."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.dot")
        mx.export_to_dot(path, *outputs)
        with open(path) as f:
            return collections.Counter(re.findall(r'label ="([A-Za-z]+)', f.read()))


def compare_graphs(ours, peer, batches) -> None:
    """Diagnostic: the loss+gradient graphs of both models, primitive by primitive."""
    (inputs, targets, mask), (tokens, lengths) = batches[0]
    loss, grads = nn.value_and_grad(ours, lm_loss)(ours, inputs, targets, mask)
    c_ours = primitive_counts([loss] + [g for _, g in tree_flatten(grads)])
    (loss, _), grads = nn.value_and_grad(peer, default_loss)(peer, tokens, lengths)
    c_peer = primitive_counts([loss] + [g for _, g in tree_flatten(grads)])
    print(f"\n{'primitive':<16} {'ours':>6} {'mlx-lm':>7}   (loss + gradient graph)")
    for name in sorted(set(c_ours) | set(c_peer)):
        mark = "" if c_ours[name] == c_peer[name] else "   <- differs"
        print(f"{name:<16} {c_ours[name]:>6} {c_peer[name]:>7}{mark}")
    print(f"{'total':<16} {sum(c_ours.values()):>6} {sum(c_peer.values()):>7}\n")


class Runner:
    """One model's compiled step plus its position in the shared batch list."""

    def __init__(self, name, step, state, batches, which):
        self.name, self.step, self.state = name, step, state
        self.batches, self.which, self.next = batches, which, 0
        self.losses: list[float] = []
        self.tok_per_s: list[float] = []

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            args = self.batches[self.next % len(self.batches)][self.which]
            self.next += 1
            loss = self.step(*args)
            mx.eval(loss, self.state)
            self.losses.append(loss.item())
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="forward+backward+AdamW tokens/s: mlx_distill Model vs mlx-lm llama Model "
                    "(same config, weights, optimizer, batches, compilation).")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=8, help="alternating measurement rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model (compiles)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="run both steps uncompiled")
    p.add_argument("--compare-graphs", action="store_true",
                   help="also print both models' primitive counts (loss + gradient graph)")
    p.add_argument("--loss-rtol", type=float, default=1e-4,
                   help="allowed relative difference of the first losses")
    args = p.parse_args(argv)

    config = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                         n_kv_heads=args.kv_heads, d_ff=args.d_ff, vocab_size=args.vocab,
                         max_seq_len=max(2048, args.seq_len))
    status = fast_blas.status()
    blas = (f"OpenBLAS via shim, OPENBLAS_NUM_THREADS={status.threads}" if status.enabled
            else f"stock ({status.reason})")
    ours, peer = build_models(config, args.seed)
    tokens_per_step = args.batch * args.seq_len
    print(f"mlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}")
    print(f"config: d_model {config.d_model}, layers {config.n_layers}, heads {config.n_heads}/"
          f"{config.n_kv_heads} kv, d_ff {config.d_ff}, vocab {config.vocab_size}, "
          f"{num_parameters(ours) / 1e6:.2f}M params; batch {args.batch} x {args.seq_len} "
          f"= {tokens_per_step} tok/step; AdamW lr {args.lr}; "
          f"{'uncompiled' if args.no_compile else 'mx.compile(state in/out)'}")

    total_steps = args.warmup + args.rounds * args.steps
    batches = make_batches(config, args.batch, args.seq_len, min(total_steps, 16), args.seed)
    check_agreement(ours, peer, batches, args.loss_rtol)
    if args.compare_graphs:
        compare_graphs(ours, peer, batches)

    compile = not args.no_compile
    opt_ours, opt_peer = optim.AdamW(learning_rate=args.lr), optim.AdamW(learning_rate=args.lr)
    runners = [
        Runner("ours", make_train_step(ours, opt_ours, compile=compile),
               [ours.state, opt_ours.state], batches, 0),
        Runner("mlx-lm", make_peer_step(peer, opt_peer, compile=compile),
               [peer.state, opt_peer.state], batches, 1),
    ]
    for r in runners:
        warm = r.run(args.warmup)
        print(f"warmup {r.name}: {args.warmup} steps in {warm:.2f} s (includes compilation)")
    l0, l1 = runners[0].losses[0], runners[1].losses[0]
    print(f"first compiled-step loss: ours {l0:.6f}  mlx-lm {l1:.6f}  |diff| {abs(l0 - l1):.2e}")

    for rnd in range(args.rounds):
        order = runners if rnd % 2 == 0 else runners[::-1]
        line = []
        for r in order:
            elapsed = r.run(args.steps)
            r.tok_per_s.append(args.steps * tokens_per_step / elapsed)
            line.append(f"{r.name} {r.tok_per_s[-1]:8.1f} tok/s")
        print(f"round {rnd + 1}: " + "   ".join(line))

    ours_r, peer_r = runners
    paired = [a / b for a, b in zip(ours_r.tok_per_s, peer_r.tok_per_s, strict=True)]
    med_ours, med_peer = statistics.median(ours_r.tok_per_s), statistics.median(peer_r.tok_per_s)
    print(f"final loss after {len(ours_r.losses)} steps: ours {ours_r.losses[-1]:.4f}  "
          f"mlx-lm {peer_r.losses[-1]:.4f}")
    print(f"\nours   : {med_ours:8.1f} tok/s (median of {args.rounds} rounds)")
    print(f"mlx-lm : {med_peer:8.1f} tok/s")
    # Headline: the median of per-round ratios; each round times both models back to back, so a
    # slow spell of a shared machine cancels out. The ratio of the medians is shown too.
    ratio = statistics.median(paired)
    low, high = (statistics.quantiles(paired, n=4, method="inclusive")[::2] if len(paired) > 1
                 else (paired[0], paired[0]))
    if ratio >= 1.0:
        verdict = "meets"
    elif high >= 1.0:
        verdict = "below, but 1.0 is inside the interquartile range: parity within noise"
    else:
        verdict = "BELOW"
    print(f"ratio ours/mlx-lm: {ratio:.3f} (median of per-round ratios; interquartile "
          f"{low:.3f}-{high:.3f}, range {min(paired):.3f}-{max(paired):.3f}; ratio of medians "
          f"{med_ours / med_peer:.3f}); goal >= 1.0: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
