"""Expert-load heat-map as a PNG in the run directory (matplotlib, imported lazily: optional)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .figures import new_figure, save_png


def write_load_heatmap(load: Tensor, path: str | os.PathLike, title: Optional[str] = None) -> Path:
    """Write `load` ([L, E] token shares, e.g. `algo.routing.load_matrix`) as a heat-map PNG.

    Rows are MoE layers, columns experts; NaN (a layer with no assignments) is drawn grey. The file
    is written to a temporary file in the same directory and renamed over `path`, so a reader never
    sees a partial image. Returns the path written.
    """
    if load.dim() != 2:
        raise ValueError(f"load must be [L, E], got shape {tuple(load.shape)}")
    import matplotlib
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    data = load.detach().to(torch.float64).cpu().numpy()
    num_layers, num_experts = data.shape

    fig = new_figure(max(4.0, 0.25 * num_experts + 2.0), max(3.0, 0.3 * num_layers + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    finite = np.isfinite(data)
    vmax = float(data[finite].max()) if finite.any() else 1.0
    image = ax.imshow(
        np.ma.masked_invalid(data),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=0.0,
        vmax=vmax if vmax > 0 else 1.0,
        origin="upper",
    )
    # one tick per layer / expert at most, never between two (the default locator puts ticks at
    # fractional layers for small counts)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or f"Expert load ({num_layers} layers x {num_experts} experts)")
    fig.colorbar(image, ax=ax, label="token share")
    fig.tight_layout()

    return save_png(fig, path)
