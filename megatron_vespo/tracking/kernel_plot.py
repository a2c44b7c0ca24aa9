"""Plot of the VESPO kernel phi(W) = W^c1 * exp(c2 * (1 - W)) for the configured constants.

One curve per advantage sign, each with its mode W* = c1/c2 and peak value marked, and the anchor
phi(1) = 1 (on-policy samples keep unit weight) drawn on both. Logged as a run artifact so the
kernel a run trained with is visible next to its metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..algo.kernel import KernelConstants, kernel_mode, kernel_peak, log_phi
from .figures import new_figure, save_png


def kernel_curve(c1: float, c2: float, w: torch.Tensor) -> torch.Tensor:
    """phi(w) through the training code's own log-space formula (w > 0)."""
    return torch.exp(log_phi(torch.log(w), c1, c2))


def write_kernel_plot(constants: KernelConstants, path: str | os.PathLike,
                      w_max: Optional[float] = None) -> Path:
    """Write phi(W) for A >= 0 and A < 0 as a PNG at `path`; returns the path.

    The W axis runs to `w_max`, by default far enough past both modes and past W = 1 to show the
    exponential tail (max(3, 2.5 * largest mode)).
    """
    curves = {
        "A >= 0": (constants.c1_pos, constants.c2_pos, "tab:blue"),
        "A < 0": (constants.c1_neg, constants.c2_neg, "tab:red"),
    }
    modes = [kernel_mode(c1, c2) for c1, c2, _ in curves.values()]
    w_max = w_max if w_max is not None else max(3.0, 2.5 * max(modes))
    if not w_max > 0:
        raise ValueError(f"w_max must be > 0, got {w_max}")
    w = torch.linspace(w_max / 2000, w_max, 2000, dtype=torch.float64)

    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for label, (c1, c2, color) in curves.items():
        ax.plot(w.numpy(), kernel_curve(c1, c2, w).numpy(), color=color,
                label=f"{label}: c1={c1:g}, c2={c2:g}")
        mode, peak = kernel_mode(c1, c2), kernel_peak(c1, c2)
        ax.plot([mode], [peak], marker="^", color=color, linestyle="none")
        ax.annotate(f"mode W*={mode:.3g}\nphi={peak:.3g}", (mode, peak), textcoords="offset points",
                    xytext=(6, 4), fontsize=8, color=color)
    ax.plot([1.0], [1.0], marker="o", color="black", linestyle="none", label="phi(1) = 1")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlim(0.0, w_max)
    peaks = [kernel_peak(c1, c2) for c1, c2, _ in curves.values()]
    ax.set_ylim(0.0, 1.3 * max(peaks + [1.0]))  # headroom for the mode annotations
    ax.set_xlabel("sequence importance weight W = pi / mu")
    ax.set_ylabel("phi(W)")
    ax.set_title("VESPO kernel phi(W) = W^c1 exp(c2 (1 - W))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
