"""Matplotlib (Agg) drawing shared by the W&B sink (heatmap images) and the offline comparison report."""

from __future__ import annotations

import io
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 10,
                     "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8})


def as_matrix(rows: Sequence[Sequence]) -> np.ndarray:
    """Nested list (strings such as "nan" allowed) -> float array."""
    return np.array([[float(v) if v is not None else np.nan for v in row] for row in rows], dtype=float)


def draw_heatmap(ax, matrix: np.ndarray, title: str, vmin: Optional[float] = None, vmax: Optional[float] = None,
                 xlabel: str = "head", ylabel: str = "layer", cmap: str = "viridis"):
    """Layer x head heatmap with integer ticks and the values written in the cells when they fit."""
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(False)
    rows, cols = matrix.shape
    ax.set_xticks(range(0, cols, max(1, cols // 16)))
    ax.set_yticks(range(0, rows, max(1, rows // 16)))
    if rows * cols <= 64:
        lo, hi = im.get_clim()
        for (i, j), v in np.ndenumerate(matrix):
            shade = (v - lo) / (hi - lo) if hi > lo else 0.0
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if shade < 0.6 else "black")
    return im


def heatmap_image(rows: Sequence[Sequence], key: str):
    """A nested-list matrix rendered as a PIL image (for wandb.Image)."""
    from PIL import Image

    matrix = as_matrix(rows)
    size = (max(3.5, 1.6 + 0.35 * matrix.shape[1]), max(2.2, 1.2 + 0.3 * matrix.shape[0]))
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    fig.colorbar(draw_heatmap(ax, matrix, key, xlabel="expert" if key.startswith("moe/") else "head"), ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (W&B's smoothing)."""
    out, acc, norm = np.empty_like(values, dtype=float), 0.0, 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out
