"""Report figures (matplotlib, Agg backend: no display needed): a request-latency histogram and a
per-category quality bar chart, one series per backend. Written atomically as PNG."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from mlx_distill.atomic import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def latency_histogram(series: dict[str, Sequence[float]], path: str | os.PathLike) -> None:
    """Request latencies (ms) per backend, shared log-spaced bins when they span > 10x."""
    import numpy as np

    plt = _pyplot()
    values = [v for vs in series.values() for v in vs if v > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        if values:
            low, high = min(values), max(values)
            if high > 10 * low:
                bins = np.geomspace(low, high, 30)
                ax.set_xscale("log")
            else:
                bins = np.linspace(low, high if high > low else low + 1.0, 30)
            for label, latencies in series.items():
                if latencies:
                    ax.hist(latencies, bins=bins, alpha=0.55, label=label)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no requests", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("request latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title("Request latency")
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def category_bars(series: dict[str, dict[str, float | None]], metric: str,
                  path: str | os.PathLike) -> None:
    """``metric`` per category (x) per backend (bars side by side); missing values leave gaps."""
    import numpy as np

    plt = _pyplot()
    categories = sorted({c for per in series.values() for c in per})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(categories) + 2), 4))
    try:
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(categories))
        for i, (label, per) in enumerate(series.items()):
            heights = [per.get(c) if per.get(c) is not None else np.nan for c in categories]
            bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
            # Printed values keep a 0 visible; a missing value gets no label.
            ax.bar_label(bars, ["" if np.isnan(h) else f"{h:.2f}" for h in heights],
                         fontsize=7)
        ax.set_xticks(x, categories, rotation=20, ha="right")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per category")
        if series:
            ax.legend()
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
