"""Where the trainer's samples come from: prompts -> fleet -> rewarded, version-stamped Samples.

Two modes (`rollout.mode`):
- sync: one rollout batch of N x mini-batch samples per weight version, generated while the learners
  wait, then consumed as N mini-batches (the paper's staleness N).
- async: a producer thread keeps the fleet busy while the learners train; the staleness buffer's
  admission control keeps every trained sample within `max_staleness` versions of the policy.
  A group whose tokens span a weight update (a partial rollout) is kept as generated ("finish": the
  engine log-probs are those of the policies that really sampled each token) or dropped and its
  prompt generated again ("drop").

Only rank 0 of the learners owns a RolloutSource; the loop broadcasts what it returns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

import aiohttp
import numpy as np

from ..learner.samples import RolloutBatch, Sample
from ..tasks.base import Prompt
from .buffer import BufferClosed, StalenessBuffer
from .client import RolloutClient, SamplingOptions
from .fleet import FleetConfig

logger = logging.getLogger(__name__)

MODES = ("sync", "async")
PARTIAL_ROLLOUT = ("finish", "drop")
WEIGHT_SYNC = ("disk", "distributed")


@dataclass(frozen=True)
class RolloutConfig:
    """The `rollout:` config section."""

    mode: str = "sync"
    n_samples_per_prompt: int = 4  # responses per prompt: one advantage group
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    max_in_flight: int = 64  # concurrent group requests
    # async mode only
    max_staleness: int = 1  # versions a trained sample may lag the policy
    partial_rollout: str = "finish"
    sync_interval: int = 1  # optimizer steps between weight syncs (sync mode: every rollout batch)
    wait_timeout_s: float = 3600.0  # a step waiting longer for its groups fails, naming the state
    # how weights reach the fleet: disk (sharded HF export + /update_weights_from_disk) or
    # distributed (bucketed broadcasts from each pipeline stage's sender; NCCL on GPUs, gloo on CPU)
    weight_sync: str = "disk"
    weight_bucket_mb: int = 512
    # distributed: the address the servers reach the senders on learner rank 0's host at for the
    # weight-update groups (e.g. the InfiniBand interface's); None: the host's name, resolved
    weight_sync_address: Optional[str] = None
    # after every update, compare each server's parameter checksums with the learner's (CPU servers
    # with tp_size 1; costs one hash of the model on the senders and on every server)
    check_weight_update: bool = False
    on_invalid: str = "skip"  # a group with non-finite/misaligned log-probs: skip (counted) or raise
    # write every rollout batch, as it streams to the learners, to RUN_DIR/rollouts/vXXXXXXXX.parquet
    # (the policy version it started at); `train --rollouts RUN_DIR/rollouts` replays them
    record: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("partial_rollout", PARTIAL_ROLLOUT),
                              ("weight_sync", WEIGHT_SYNC), ("on_invalid", ("skip", "raise"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        for name in ("n_samples_per_prompt", "max_in_flight", "sync_interval", "weight_bucket_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.wait_timeout_s > 0:
            raise ValueError(f"wait_timeout_s must be > 0, got {self.wait_timeout_s}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


Rewards = Callable[[Sequence[dict], Sequence[Sequence[int]]], list]


def rewarded(samples: Sequence[Sample], rewards: Rewards) -> list[Sample]:
    """The engine's samples with the task's rewards, scored together (their arrays shared, not
    copied)."""
    scores = rewards([s.metadata for s in samples], [s.response_ids for s in samples])
    return [replace(s, reward=float(r)) for s, r in zip(samples, scores)]


def _sync_iter(agen: AsyncIterator):
    """An async generator's items from synchronous code: each `next` runs a private event loop
    until the next item (the engine keeps generating meanwhile; answers wait in their sockets)."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


class RolloutSource:
    """Rank 0's view of rollout: a client on the fleet, the task's prompts and rewards
    (`Task.rewards`)."""

    def __init__(self, cfg: RolloutConfig, client: RolloutClient, prompts: Iterator,
                 rewards: Rewards, prompts_per_step: int):
        self.cfg = cfg
        self.client = client
        self.prompts = prompts
        self.rewards = rewards
        self.prompts_per_step = prompts_per_step
        self.buffer: Optional[StalenessBuffer] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._retry: list[Prompt] = []  # prompts of dropped partial rollouts, served first
        self._dropped_partial = 0
        self._tokens = 0
        self._since = time.perf_counter()

    # -- synchronous mode ------------------------------------------------------------------------
    def rollout_batch(self, num_prompts: int) -> RolloutBatch:
        """The n responses to each of the next `num_prompts` prompts, streamed: each group (offset
        = its prompt's slot x n) as the engine finishes it; a group skipped as invalid gives its
        slot to the next prompt (counted in rollout/groups_skipped). Rollout metrics once done."""
        # The trainer's progress bar reports rollout tokens/s; a second bar per batch would be noise.
        n = self.cfg.n_samples_per_prompt
        requests = list(itertools.islice(self.prompts, num_prompts))
        groups = ((slot * n, rewarded(gens, self.rewards)) for slot, gens in
                  _sync_iter(self.client.stream(requests, replacements=self.prompts)))
        return RolloutBatch(num_prompts * n, groups, self._batch_metrics)

    def _batch_metrics(self) -> dict[str, float]:
        stats = self.client.stats
        return {"rollout/tokens_per_s": stats.tokens_per_s, "rollout/tokens": float(stats.tokens_generated),
                "rollout/seconds": stats.wall_time_s,
                "rollout/requests_retried": float(stats.requests_retried),
                "rollout/groups_skipped": float(stats.groups_skipped)}

    # -- fully asynchronous mode -----------------------------------------------------------------
    def start(self, version: int) -> None:
        """Start the producer thread (async mode); the buffer starts at policy `version`."""
        self.buffer = StalenessBuffer(self.prompts_per_step, self.cfg.max_staleness)
        self.buffer.version = version
        self._thread = threading.Thread(target=lambda: asyncio.run(self._produce()), name="rollout",
                                        daemon=True)
        self._thread.start()

    def _next_prompt(self) -> Prompt:
        if self._retry:
            return self._retry.pop(0)
        return next(self.prompts)

    async def _produce(self) -> None:
        buffer = self.buffer
        running: set[asyncio.Task] = set()
        connector = aiohttp.TCPConnector(limit=self.cfg.max_in_flight)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                while True:
                    version = await asyncio.to_thread(buffer.wait_admit, 0.5)
                    if version is None:
                        if self._error is not None or buffer.closed:
                            break
                        continue
                    task = asyncio.create_task(self._one(session, self._next_prompt(), version))
                    running.add(task)
                    task.add_done_callback(running.discard)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which re-raises it
            self._error = self._error or e
            buffer.close()
        finally:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, prompt: Prompt, version: int) -> None:
        """Generate, reward and queue one group; every outcome frees or fills its slot."""
        buffer = self.buffer
        try:
            gens = await self.client.generate_group(session, prompt)
            if not gens:  # an invalid answer, skipped and counted by the client
                buffer.release()
                return
            if self.cfg.partial_rollout == "drop" and any(len(g.metadata["weight_versions"]) > 1
                                                          for g in gens):
                self._dropped_partial += 1
                self._retry.append(prompt)
                buffer.release()
                return
            # Off the event loop: a verifier's workers take their time, the other groups go on.
            samples = await asyncio.to_thread(rewarded, gens, self.rewards)
        except asyncio.CancelledError:
            buffer.release()
            raise
        except BaseException as e:  # noqa: BLE001 - a dead fleet or a failing reward ends training
            buffer.release()
            self._error = self._error or e
            buffer.close()
            return
        self._tokens += sum(len(g.response_ids) for g in gens)
        # The behaviour policy is the oldest weights that sampled any of the group's tokens.
        buffer.accept(samples, min(version, *(g.policy_version for g in gens)))

    def take(self) -> RolloutBatch:
        """The next step's groups (async mode, already in the buffer) and rollout metrics,
        including the lag histogram."""
        buffer = self.buffer
        before = Counter(buffer.stats.lag_histogram)
        try:
            groups = buffer.take(timeout=self.cfg.wait_timeout_s)
        except BufferClosed:
            raise self._error or RuntimeError("the rollout producer stopped") from None
        if groups is None:
            raise RuntimeError(f"no step's groups after rollout.wait_timeout_s="
                               f"{self.cfg.wait_timeout_s:g}: {buffer.describe()}")
        offsets = np.cumsum([0] + [len(g.samples) for g in groups]).tolist()
        lags = [buffer.version - g.version for g in groups]
        now = time.perf_counter()
        metrics = {"rollout/tokens_per_s": self._tokens / max(now - self._since, 1e-9),
                   "rollout/queue_depth": float(buffer.queue_depth),
                   "rollout/running_groups": float(buffer.running),
                   "rollout/dropped_partial": float(self._dropped_partial),
                   "rollout/dropped_stale": float(buffer.stats.dropped_stale),
                   "rollout/requests_retried": float(self.client.stats.requests_retried),
                   "staleness/lag_mean": sum(lags) / len(lags), "staleness/lag_max": float(max(lags))}
        step_hist = buffer.stats.lag_histogram - before
        metrics.update({f"staleness/lag_hist/{lag}": float(step_hist.get(lag, 0))
                        for lag in range(self.cfg.max_staleness + 1)})
        self._tokens, self._since = 0, now
        return RolloutBatch(offsets[-1], zip(offsets, (g.samples for g in groups)),
                            lambda: metrics)

    def advance(self) -> None:
        """The learners took an optimizer step."""
        self.buffer.advance()

    def stop(self) -> None:
        """End the producer (async mode); in-flight requests are cancelled."""
        if self.buffer is not None:
            self.buffer.close()
        if self._thread is not None:
            self._thread.join(30)
