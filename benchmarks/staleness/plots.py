"""One PNG per staleness N: held-out accuracy and the batch's W spread against the step, per loss.

Thin lines are single seeds, thick lines the mean over seeds (on the steps every seed evaluated).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from megatron_vespo.tracking.figures import new_figure, save_png


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def curves_png(cells: dict[tuple[str, int, int], list[dict]], n: int, path: Path,
               title: str = "held-out greedy accuracy") -> Path:
    """cells: (loss, N, seed) -> step rows (`trainer.train_cell`'s; the score under "acc", titled
    `title`); plots those with N = n."""
    fig = new_figure(11, 4)
    acc_ax, w_ax = fig.subplots(1, 2)
    by_loss: dict[str, list[list[dict]]] = defaultdict(list)
    for (loss, cell_n, _seed), rows in sorted(cells.items()):
        if cell_n == n:
            by_loss[loss].append(rows)
    for i, (loss, runs) in enumerate(sorted(by_loss.items())):
        color = f"C{i}"
        accs = [_series(rows, "acc") for rows in runs]
        for steps, acc in accs:
            acc_ax.plot(steps, acc, color=color, alpha=0.3, linewidth=0.8)
        length = min(len(a) for _, a in accs)
        acc_ax.plot(accs[0][0][:length], np.mean([a[:length] for _, a in accs], 0), color=color,
                    linewidth=2, label=f"{loss} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        for rows in runs:
            steps, std = _series(rows, "is/log_w_std")
            w_ax.plot(steps, std, color=color, alpha=0.5, linewidth=0.6)
    acc_ax.set(title=f"{title}, N = {n}", xlabel="optimizer step", ylabel=title,
               ylim=(0, 1))
    acc_ax.legend(loc="upper left", fontsize=8)
    w_ax.set(title=f"std of log W within the mini-batch, N = {n}", xlabel="optimizer step",
             ylabel="std log W")
    fig.tight_layout()
    return save_png(fig, path)
