"""Training metrics: a JSON-lines log, a loss-curve PNG, and the progress bar.

``metrics.jsonl`` holds one object per line. Train lines: ``{"kind": "train", "step", "loss",
"ce", "kd", "n_tokens", "n_kd_tokens", "lr", "grad_norm", "tok_per_s", "skipped", "time"}``
(``loss``/``ce`` are means over supervised tokens, ``kd`` over tokens with a teacher distribution,
``grad_norm`` the pre-clip norm of the averaged gradient, ``tok_per_s`` processed positions per
second over all ranks, ``skipped`` true for a non-finite step that was not applied). Eval lines:
``{"kind": "eval", "step", "val_loss", "val_ce", "val_kd", "val_tokens", "best"}``.
Floats are written with full precision (``repr``), so a resumed run can be compared exactly.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the restored step are dropped atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything after it is unreliable
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps ``<= step`` (what the restored checkpoint has seen)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(_line(r) for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()


def _line(record: dict[str, Any]) -> str:
    # NaN/Inf are not JSON: a skipped step's loss is written as null.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    return json.dumps(clean) + "\n"


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Train loss (and its CE / KD parts) per step, validation loss per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], label="train loss", lw=1.2)
        ax.plot(steps, [r["ce"] for r in train], label="train CE", lw=0.8, alpha=0.7)
        if any(r.get("n_kd_tokens") for r in train):
            ax.plot(steps, [r["kd"] for r in train], label="train KD", lw=0.8, alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                label="val loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


class Progress:
    """tqdm bar (step, loss parts, tok/s, ETA) on rank 0; nothing elsewhere or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", desc="train",
                            mininterval=0.5, dynamic_ncols=True, file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        parts = {"loss": record.get("loss"), "ce": record.get("ce")}
        if record.get("n_kd_tokens"):
            parts["kd"] = record.get("kd")
        post = {k: ("nan" if v is None else f"{v:.3f}") for k, v in parts.items()}
        post["tok/s"] = f"{record.get('tok_per_s', 0):,.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
