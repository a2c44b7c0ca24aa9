"""Matplotlib figures for tracking artifacts: an Agg-backed figure and an atomic PNG write.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas, never through pyplot,
so no global state is touched and plotting is safe off the main thread and without a display.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure with its own Agg canvas (imported lazily: matplotlib is heavy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG through a temporary file renamed over `path`, so a reader (or an
    artifact upload running later) never sees a partial image. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
