"""``mlx-distill demo``: the pipeline stages that exist so far, end to end, offline.

Train a byte-level BPE tokenizer on the bundled text, train the toy student on it for a few hundred
steps, save an mlx-lm-compatible checkpoint, reload it with our loader and with mlx-lm (logits must
agree), and generate a continuation.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

from mlx_distill import fast_blas
from mlx_distill.checkpoint import load_checkpoint, save_checkpoint
from mlx_distill.config import load_size_config
from mlx_distill.model import Model, num_parameters
from mlx_distill.train import lm_batches, make_train_step

BUNDLED_CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


def run_demo(
    out_dir: Path, steps: int = 300, vocab_size: int = 512, batch_size: int = 16,
    seq_len: int = 64, lr: float = 3e-3, seed: int = 0, prompt: str = "The student",
    size: str = "toy",
) -> dict:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from mlx_distill.generate import generate_text
    from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

    started = time.perf_counter()
    out_dir = Path(out_dir)
    blas = fast_blas.status()
    print(f"[1/5] fast BLAS: {'on' if blas.enabled else 'off'} ({blas.reason})")

    tok_dir = out_dir / "tokenizer"
    train_tokenizer([BUNDLED_CORPUS], vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    ids = np.array(tokenizer.encode(BUNDLED_CORPUS.read_text(encoding="utf-8")), dtype=np.int32)
    print(f"[2/5] tokenizer: vocab {vocab_size}, corpus {ids.size:,} tokens -> {tok_dir}")

    size_config = load_size_config(size)
    config = dataclasses.replace(size_config.model, vocab_size=vocab_size)
    mx.random.seed(seed)
    model = Model(config)
    mx.eval(model.parameters())
    schedule = optim.cosine_decay(lr, steps, end=lr * 0.1)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step = make_train_step(model, optimizer)
    batches = lm_batches(ids, batch_size, seq_len, seed=seed)
    losses = []
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=f"[3/5] train {size} ({num_parameters(model):,} params)",
              unit="step", mininterval=0.5) as bar:
        for _ in range(steps):
            loss = step(*next(batches))
            mx.eval(loss, model.state, optimizer.state)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    tok_per_s = steps * batch_size * seq_len / (time.perf_counter() - t0)
    print(f"      loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}, {tok_per_s:,.0f} tok/s")

    ckpt = save_checkpoint(model, out_dir / "student", tokenizer_dir=tok_dir,
                           extra_meta={"demo": {"steps": steps, "final_loss": losses[-1]}})
    reloaded = load_checkpoint(ckpt)
    peer, _ = mlx_lm_load_model(ckpt)
    probe = mx.array(ids[None, :seq_len])
    diff_ours = float(mx.abs(reloaded(probe) - model(probe)).max())
    diff_peer = float(mx.abs(peer(probe) - model(probe)).max())
    print(f"[4/5] checkpoint {ckpt}: reload max |Δlogit| ours {diff_ours:.2e}, "
          f"mlx-lm {diff_peer:.2e}")

    text = generate_text(reloaded, tokenizer, prompt, max_tokens=60, temperature=0.0)
    print(f"[5/5] greedy continuation of {prompt!r}:\n      {prompt}{text}")
    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.1f} s; outputs in {out_dir}")
    return {"losses": losses, "checkpoint": ckpt, "text": text,
            "reload_diff": diff_ours, "mlx_lm_diff": diff_peer}


def _main(args) -> int:
    out = args.out or Path("runs") / _dt.datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    result = run_demo(Path(out), steps=args.steps, seed=args.seed, prompt=args.prompt)
    if result["losses"][-1] >= result["losses"][0] or max(
        result["reload_diff"], result["mlx_lm_diff"]
    ) > 1e-4:
        print("demo check failed: loss did not fall or reloaded logits differ")
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the pipeline end to end on the bundled text (offline, ~1 minute)",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, help="output dir (default runs/demo-<timestamp>)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="The student", help="prompt for the final generation")
    p.set_defaults(func=_main)
