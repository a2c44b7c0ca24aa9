"""What both staleness studies (`run.py`: the GRU, `product.py`: the product loop) share: the sweep's
command-line lists, the CSV files, and the mean +- spread of a cell over seeds."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import numpy as np


def comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def sweep_parser(doc: str, quick: dict[str, str], losses: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with the sweep's options: --quick (the `quick` preset), --losses, --ns, --seeds."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"losses {quick['losses']}, N in "
                   f"{{{quick['ns']}}}, seeds {quick['seeds']}")
    p.add_argument("--losses", help=f"comma-separated from {','.join(losses)}")
    p.add_argument("--ns", help="comma-separated staleness values N")
    p.add_argument("--seeds", help="comma-separated seeds")
    return p


def resolve_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, preset: dict[str, str],
                  losses: Sequence[str]) -> argparse.Namespace:
    """Fill args.losses, args.ns and args.seeds from `preset` (comma-separated strings) where unset,
    then parse them (losses named in `losses`); every N must divide args.steps."""
    for key in ("losses", "ns", "seeds"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.losses = comma_list(args.losses)
    unknown = sorted(set(args.losses) - set(losses))
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {list(losses)}")
    args.ns = [int(s) for s in comma_list(args.ns)]
    args.seeds = [int(s) for s in comma_list(args.seeds)]
    bad = [n for n in args.ns if n < 1 or args.steps % n]
    if bad:
        parser.error(f"--steps {args.steps} must be a positive multiple of every N; not of {bad}")
    return args


def mean_spread(values: Sequence[float]) -> str:
    """"0.123" for one seed, "0.123+-0.045" (mean, sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f}+-{np.std(values, ddof=1):.3f}"


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows with possibly different keys; columns are their union in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path
