"""Histogram grid of named 1-D value sets (weights, phi, gradients, ...) as one PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .figures import new_figure, save_png


def as_array(values: Any) -> np.ndarray:
    """A float64 1-D numpy copy of a tensor, array or sequence (torch imported only if passed)."""
    if hasattr(values, "detach"):  # torch.Tensor: leave autograd, device and dtype behind
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def write_histograms(values: Mapping[str, Any], path: str | os.PathLike,
                     title: Optional[str] = None, bins: int = 50) -> Path:
    """Write one histogram per entry of `values` (name -> 1-D tensor/array) into a grid PNG.

    Non-finite entries cannot be binned; they are left out of the bars and their count is printed
    in the panel title, so they are never hidden. Returns the path written.
    """
    if not values:
        raise ValueError("values is empty: nothing to plot")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    cols = min(3, len(values))
    rows = math.ceil(len(values) / cols)
    fig = new_figure(4.0 * cols, 3.0 * rows)
    for i, (name, raw) in enumerate(values.items()):
        data = as_array(raw)
        finite = data[np.isfinite(data)]
        ax = fig.add_subplot(rows, cols, i + 1)
        if finite.size:
            ax.hist(finite, bins=bins, color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        label = f"{name} (n={data.size}"
        label += f", {data.size - finite.size} non-finite)" if finite.size < data.size else ")"
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)
