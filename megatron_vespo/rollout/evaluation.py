"""Evaluation on the fleet: every set's prompts, k responses each at the set's sampling, scored by
the task, reduced to the numbers papers report (tasks/eval_sets.py).

`evaluate_sets` runs all sets at once (their requests share the fleet with whatever else runs on it)
and blocks until they are scored. `BackgroundEvaluation` runs it in a thread so the learners keep
training while the fleet evaluates: the caller starts it after the weights it is to judge are on
the servers and waits for it before the next weight update.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from typing import Callable, Optional, Sequence

import numpy as np

from ..tasks.eval_sets import EvalSet, eval_metrics, set_metrics
from .client import RolloutClient, SamplingOptions
from .source import Rewards

logger = logging.getLogger(__name__)


def set_sampling(base: SamplingOptions, eval_set: EvalSet) -> SamplingOptions:
    """The run's sampling (its stop tokens) with the set's temperature, top_p and length."""
    c = eval_set.config
    return replace(base, temperature=c.temperature, top_p=c.top_p,
                   max_new_tokens=c.max_new_tokens or base.max_new_tokens)


def evaluate_sets(fleet, sets: Sequence[EvalSet], rewards: Rewards, sampling: SamplingOptions,
                  max_in_flight: int = 64) -> dict[str, float]:
    """eval/<set>/{avg@k, pass@k, reward, response_tokens, truncated_frac, prompts, seconds} for every
    set, plus eval/mean_avg and eval/mean_pass. A group with an invalid answer is skipped (counted in
    eval/<set>/groups_skipped); a set left with no prompt is left out, with a warning."""
    sets = [s for s in sets if s.prompts]
    if not sets:
        return {}
    share = max(1, max_in_flight // len(sets))
    clients = [RolloutClient(fleet, set_sampling(sampling, s), n=s.config.k, max_in_flight=share,
                             on_invalid="skip") for s in sets]

    async def run_all():
        async def one(client, s):
            start = time.perf_counter()
            samples = await client.generate(s.prompts, progress=False)
            return samples, time.perf_counter() - start
        return await asyncio.gather(*(one(c, s) for c, s in zip(clients, sets)))

    per_set, ks, extra = {}, {}, {}
    for s, client, (samples, seconds) in zip(sets, clients, asyncio.run(run_all())):
        name, k = s.config.name, s.config.k
        extra[f"eval/{name}/groups_skipped"] = float(client.stats.groups_skipped)
        if not samples:
            logger.warning("evaluation set %r: every group was skipped as invalid", name)
            continue
        scores = rewards([x.metadata for x in samples], [x.response_ids for x in samples])
        shape = (len(samples) // k, k)  # sorted by (prompt, response index)
        per_set[name] = {**set_metrics(
            np.asarray(scores, dtype=np.float64).reshape(shape),
            np.array([len(x.response_ids) for x in samples]).reshape(shape),
            np.array([x.metadata["finish_reason"] == "length" for x in samples]).reshape(shape), k),
            "seconds": seconds}
        ks[name] = k
    return {**eval_metrics(per_set, ks), **extra}


class BackgroundEvaluation:
    """One evaluation at a time in a thread (rank 0). `start(step, evaluate)` begins judging the
    weights of `step`; `wait()` returns (step, metrics) of the one running, or None when none is.
    An evaluation that fails (a server died under it) is logged and reported as eval/failed = 1:
    training goes on."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._result: Optional[tuple[int, dict]] = None

    @property
    def running(self) -> bool:
        """One was started and not yet waited for."""
        return self._thread is not None

    @property
    def done(self) -> bool:
        """The running one has finished (wait() returns at once)."""
        return self._thread is not None and not self._thread.is_alive()

    def start(self, step: int, evaluate: Callable[[], dict]) -> None:
        if self._thread is not None:
            raise RuntimeError("an evaluation is still running: wait() for it first")

        def body():
            try:
                self._result = (step, evaluate())
            except Exception as exc:  # noqa: BLE001 - reported, and training goes on
                logger.warning("evaluation of step %d failed: %s: %s", step, type(exc).__name__, exc)
                self._result = (step, {"eval/failed": 1.0})

        self._result = None
        self._thread = threading.Thread(target=body, name=f"eval-step-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> Optional[tuple[int, dict]]:
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        return self._result
