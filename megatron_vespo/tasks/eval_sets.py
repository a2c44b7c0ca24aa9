"""Evaluation sets and the numbers papers report for them.

A set is a prompt file scored k times per prompt at its own sampling settings (the paper: avg@32 on
AIME at temperature 1.0, avg@16 on AMC, avg@4 on MATH-500); k = 1 at temperature 0 is the greedy
single-response evaluation. A response is correct when its reward is 1 (the tasks' full score).

For a set of P prompts with n responses each, c_p of them correct:
  avg@n  = mean_p c_p / n                          (the mean accuracy of one sample)
  pass@k = mean_p 1 - C(n - c_p, k) / C(n, k)       (Chen et al. 2021's unbiased estimator; with
                                                     k = n: the fraction of prompts solved at least once)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .base import Prompt


@dataclass(frozen=True)
class EvalSetConfig:
    """One entry of `task.eval_sets`.

    name: the metric prefix (eval/<name>/...). path: a prompt file in the task's format (the same
    fields as task.data; the math task needs one, the synthetic task generates its prompts). k: responses per prompt. temperature / top_p: sampling for this set.
    max_new_tokens: None = rollout.sampling.max_new_tokens. limit: the first `limit` usable prompts
    (None: all).
    """

    name: str = ""
    path: Optional[str] = None
    k: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r}: a non-empty metric name without '/'")
        if self.k < 1:
            raise ValueError(f"eval set {self.name!r}: k must be >= 1, got {self.k}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"eval set {self.name!r}: temperature must be finite and >= 0, "
                             f"got {self.temperature}")
        if self.temperature == 0 and self.k > 1:
            raise ValueError(f"eval set {self.name!r}: k={self.k} at temperature 0 scores one greedy "
                             f"response k times; use k=1 or a temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval set {self.name!r}: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval set {self.name!r}: max_new_tokens must be >= 1, "
                             f"got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval set {self.name!r}: limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class EvalSet:
    """A set's settings and its prompts, ready for the fleet."""

    config: EvalSetConfig
    prompts: list[Prompt]


def check_unique_names(sets: Sequence[EvalSetConfig]) -> None:
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"eval_sets: names must be unique, repeated: {repeated}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k responses drawn without replacement from n, c of them
    correct, is correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def set_metrics(rewards: np.ndarray, response_tokens: np.ndarray, truncated: np.ndarray,
                k: int) -> dict[str, float]:
    """The metrics of one set. rewards, response_tokens, truncated: [P, n] (P prompts, n responses
    each, n >= k). Keys: avg@n, pass@k, reward (mean), response_tokens (mean), truncated_frac,
    prompts."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < k or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be [prompts >= 1, n >= k={k}], got {rewards.shape}")
    n = rewards.shape[1]
    correct = (rewards >= 1.0).sum(axis=1)
    return {f"avg@{n}": float(correct.mean() / n),
            f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct])),
            "reward": float(rewards.mean()),
            "response_tokens": float(np.mean(response_tokens)),
            "truncated_frac": float(np.mean(truncated)),
            "prompts": float(rewards.shape[0])}


def eval_metrics(per_set: dict[str, dict[str, float]], ks: dict[str, int]) -> dict[str, float]:
    """eval/<name>/<metric> for every set, plus eval/mean_avg and eval/mean_pass: each set's avg@k
    and pass@k averaged over the sets (the single number papers rank checkpoints by)."""
    out = {f"eval/{name}/{key}": value for name, m in per_set.items() for key, value in m.items()}
    if per_set:
        out["eval/mean_avg"] = float(np.mean([m[f"avg@{ks[name]}"] for name, m in per_set.items()]))
        out["eval/mean_pass"] = float(np.mean([m[f"pass@{ks[name]}"] for name, m in per_set.items()]))
    return out
