"""Batched generation through the fleet's router: n samples per prompt, with per-token engine
log-probs, weight versions and (MoE) routed experts, surviving the loss of servers mid-batch.

The engine's answer becomes a `Sample` here, the one record a response is from then on up to the
packed micro-batch: token ids and log-probs as arrays, routes decoded straight into uint8, the
weight-version spans, finish reason and latency in its metadata; its reward is the source's to give.

One prompt group is one `/generate` request with `sampling_params.n = n`, so a group is always served
by one server, whole. A request that fails (connection error, HTTP 5xx, timeout, or an aborted
sample) makes the fleet re-check its servers (dead ones leave the router) and is re-sent whole, up
to `max_retries` times. Results are keyed by (group_id, sample_index): every prompt yields exactly n
samples, exactly once, or the batch fails with an error that says why.

What sglang 0.5.23 returns (token-in/token-out, `return_logprob: true`), as measured:
- n > 1: a JSON list of n results; n = 1: a single result object.
- each result: `output_ids` (the response, a matched stop token included) and `meta_info` with
  `finish_reason` ({"type": "length", "length": k} | {"type": "stop", "matched": id} |
  {"type": "abort", "message": ...}), `output_token_logprobs` ([logprob, token_id, text] per
  output token), `weight_version` (the version at the end) and `weight_versions` (spans
  {"version", "start", "end"} over output positions), and `routed_experts` when asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional, Sequence

import aiohttp
import numpy as np
from tqdm import tqdm

from ..learner.samples import Sample
from ..tasks.base import Prompt
from .auth import auth_headers
from .fleet import Fleet
from .routed_experts import decode_routed_experts

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """A group could not be generated (retries exhausted, a client-side error, an invalid answer)."""


class _Retriable(Exception):
    """A failure that another server may not have: the group is re-sent."""


class _InvalidAnswer(Exception):
    """The server answered, but not with n well-formed samples."""


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling (the `rollout.sampling` config section); top_k -1 = no top-k cut."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")

    def sglang_params(self, n: int) -> dict:
        return {"n": n, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "stop_token_ids": list(self.stop_token_ids)}


@dataclass
class RolloutStats:
    """Counters of the latest `generate` call (and any `generate_group` calls since)."""

    groups: int = 0
    samples: int = 0
    tokens_generated: int = 0
    wall_time_s: float = 0.0
    requests_sent: int = 0
    requests_retried: int = 0
    groups_skipped: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.wall_time_s if self.wall_time_s > 0 else 0.0


def parse_weight_version(version: Any) -> int:
    """sglang's weight version string -> int; "default" (weights loaded at start-up) is 0."""
    if version == "default":
        return 0
    try:
        return int(version)
    except (TypeError, ValueError):
        raise RolloutError(f"weight version {version!r} is not an integer (set integer versions when "
                           f"updating weights)") from None


class RolloutClient:
    """Generates n samples per prompt through `fleet`'s router. `max_in_flight` bounds the number
    of concurrent group requests; `on_invalid` is "raise" (default) or "skip" for answers with
    non-finite log-probs or misaligned lengths ("skip" drops the whole group, logged and counted)."""

    def __init__(self, fleet: Fleet, sampling: SamplingOptions, n: int = 1, return_routed_experts: bool = False,
                 num_moe_layers: int = 0, max_in_flight: int = 64, on_invalid: str = "raise",
                 num_experts: Optional[int] = None):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if return_routed_experts and num_moe_layers < 1:
            raise ValueError(f"num_moe_layers must be >= 1 with return_routed_experts, got {num_moe_layers}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if on_invalid not in ("raise", "skip"):
            raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
        self.fleet = fleet
        self.sampling = sampling
        self.n = n
        self.return_routed_experts = return_routed_experts
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts  # routed expert ids must lie in [0, num_experts)
        self.max_in_flight = max_in_flight
        self.on_invalid = on_invalid
        self.stats = RolloutStats()
        self._health_lock: Optional[asyncio.Lock] = None
        self._per_server: dict[str, int] = {}  # requests in flight per server URL (direct mode)

    def _payload(self, prompt: Prompt) -> dict:
        payload = {"input_ids": list(prompt.prompt_ids), "sampling_params": self.sampling.sglang_params(self.n),
                   "return_logprob": True}
        if self.return_routed_experts:
            payload["return_routed_experts"] = True
        return payload

    async def _post(self, session: aiohttp.ClientSession, payload: dict) -> tuple[Any, float]:
        """One /generate call -> (decoded body, seconds). _Retriable for what a healthy server
        would not do; RolloutError for a request the server rejects (4xx: resending cannot help)."""
        base = self._target()
        url = base + "/generate"
        timeout = aiohttp.ClientTimeout(total=self.fleet.cfg.request_timeout_s)
        start = time.perf_counter()
        self.stats.requests_sent += 1
        self.stats.in_flight += 1
        self._per_server[base] = self._per_server.get(base, 0) + 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            async with session.post(url, json=payload, timeout=timeout, headers=auth_headers()) as r:
                text = await r.text()
                if r.status >= 500:
                    raise _Retriable(f"HTTP {r.status} from {url}: {text[:300]}")
                if r.status != 200:
                    raise RolloutError(f"HTTP {r.status} from {url}: {text[:500]}")
                try:
                    return json.loads(text), time.perf_counter() - start
                except ValueError:
                    raise _InvalidAnswer(f"not JSON: {text[:300]}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _Retriable(f"{type(e).__name__} from {url}: {e}") from None
        finally:
            self.stats.in_flight -= 1
            self._per_server[base] -= 1

    def _target(self) -> str:
        """Where a /generate goes: the router, except with routed experts. sglang-router 0.3.2
        drops the `return_routed_experts` field, so those requests go to the servers directly,
        the one with the fewest requests in flight first (the fleet's health checks still apply)."""
        if not self.return_routed_experts:
            return self.fleet.router_url
        urls = self.fleet.worker_urls
        if not urls:
            raise _Retriable("no healthy rollout server left")
        return min(urls, key=lambda u: self._per_server.get(u, 0))

    async def _check_health(self) -> None:
        """fleet.check_health off the event loop, one at a time (a dying server fails many
        requests at once; each waits for the same check instead of probing in parallel)."""
        if self._health_lock is None:
            self._health_lock = asyncio.Lock()
        async with self._health_lock:
            removed = await asyncio.to_thread(self.fleet.check_health)
        if removed:
            logger.warning("removed dead rollout servers %s; %d left", removed, len(self.fleet.worker_urls))

    async def generate_group(self, session: aiohttp.ClientSession, prompt: Prompt) -> list[Sample]:
        """n samples for one prompt (one request), re-sent whole on a retriable failure; [] if the
        answer was invalid and on_invalid is "skip"."""
        retries = self.fleet.cfg.max_retries
        for attempt in range(retries + 1):
            try:
                body, latency = await self._post(session, self._payload(prompt))
                gens = self._parse(prompt, body, latency)
            except _Retriable as e:
                if attempt == retries:
                    raise RolloutError(f"group {prompt.group_id}: failed {retries + 1} times; "
                                       f"last: {e}") from None
                self.stats.requests_retried += 1
                logger.warning("group %d: %s; checking the fleet, retry %d/%d", prompt.group_id, e,
                               attempt + 1, retries)
                await self._check_health()
                await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))  # a transient error gets time to pass
                continue
            except _InvalidAnswer as e:
                if self.on_invalid == "raise":
                    raise RolloutError(f"group {prompt.group_id}: invalid answer: {e}") from None
                logger.warning("group %d: invalid answer, group skipped: %s", prompt.group_id, e)
                self.stats.groups_skipped += 1
                return []
            self.stats.groups += 1
            self.stats.samples += len(gens)
            self.stats.tokens_generated += sum(len(g.response_ids) for g in gens)
            return gens
        raise AssertionError("unreachable")

    def _parse(self, prompt: Prompt, body: Any, latency: float) -> list[Sample]:
        results = body if isinstance(body, list) else [body]
        if len(results) != self.n:
            raise _InvalidAnswer(f"{len(results)} results for n={self.n}")
        try:
            prompt_ids = np.asarray(prompt.prompt_ids, dtype=np.int32)  # shared by the group
            return [self._parse_one(prompt, prompt_ids, i, r, latency) for i, r in enumerate(results)]
        except (KeyError, TypeError, IndexError) as e:
            raise _InvalidAnswer(f"malformed result ({type(e).__name__}: {e}): {str(body)[:300]}") from None

    def _parse_one(self, prompt: Prompt, prompt_ids: np.ndarray, index: int, result: dict,
                   latency: float) -> Sample:
        meta = result["meta_info"]
        finish = meta["finish_reason"]["type"]
        if finish == "abort":  # the server dropped it (shutdown, pause in abort mode, overload)
            raise _Retriable(f"sample {index} aborted: {meta['finish_reason'].get('message', '')}")
        response = list(result["output_ids"])
        logprob_rows = meta["output_token_logprobs"]
        if len(logprob_rows) != len(response):
            raise _InvalidAnswer(f"sample {index}: {len(response)} output ids but "
                                 f"{len(logprob_rows)} log-probs")
        if [row[1] for row in logprob_rows] != response:
            raise _InvalidAnswer(f"sample {index}: log-prob token ids do not match output_ids")
        logprobs = [row[0] for row in logprob_rows]
        if not all(lp is not None and math.isfinite(lp) for lp in logprobs):
            raise _InvalidAnswer(f"sample {index}: non-finite log-prob in {logprobs}")
        routed = None
        if self.return_routed_experts:
            if "routed_experts" not in meta:
                raise RolloutError("routed experts were requested but the server did not return them: "
                                   "start the servers with ServerOptions(enable_routed_experts=True) "
                                   "(--enable-return-routed-experts)")
            try:
                routed = decode_routed_experts(meta["routed_experts"],
                                               len(prompt.prompt_ids) + len(response) - 1,
                                               self.num_moe_layers, self.num_experts)
            except ValueError as e:  # a payload of the wrong size, expert ids out of range
                raise _InvalidAnswer(f"sample {index}: {e}") from None
        spans = [[parse_weight_version(s["version"]), s["start"], s["end"]]
                 for s in meta.get("weight_versions") or []]
        if not spans:  # sglang leaves the spans out when the version is not tracked per token
            spans = [[parse_weight_version(meta["weight_version"]), 0, len(response)]]
        # The behaviour version is the one the sample started with; the reward is the source's to
        # give (NaN until then: an unscored sample cannot reach the advantages unnoticed).
        return Sample(f"{prompt.group_id}-{index}", prompt.group_id, prompt_ids,
                      np.asarray(response, dtype=np.int32), math.nan,
                      np.asarray(logprobs, dtype=np.float64), spans[0][0], routed,
                      {**prompt.metadata, "finish_reason": finish, "latency_s": latency,
                       "weight_versions": spans})

    async def stream(self, prompts: Sequence[Prompt],
                     replacements: Optional[Iterator[Prompt]] = None,
                     progress: bool = False) -> AsyncIterator[tuple[int, list[Sample]]]:
        """(slot, the n samples of prompt `prompts[slot]`) for every prompt, as the groups complete
        (at most max_in_flight requests at a time). A group skipped as invalid is yielded empty,
        or, with `replacements`, its slot is given the next replacement prompt (at most
        len(prompts) times per call). Ends with a fleet health check, so that a server that died
        during the batch (even if the router's own retries hid it) is out before the next one."""
        self.stats = RolloutStats()
        self._health_lock = asyncio.Lock()  # bound to this call's event loop
        gate = asyncio.Semaphore(self.max_in_flight)
        start = time.perf_counter()
        budget = len(prompts)  # replacements allowed

        async def one(session, slot: int, prompt: Prompt):
            async with gate:
                return slot, prompt, await self.generate_group(session, prompt)

        connector = aiohttp.TCPConnector(limit=self.max_in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = {asyncio.create_task(one(session, i, p)) for i, p in enumerate(prompts)}
            try:
                with tqdm(total=len(prompts), desc="rollout", unit="group", disable=not progress) as bar:
                    while tasks:
                        done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            slot, prompt, gens = task.result()
                            self.stats.wall_time_s = time.perf_counter() - start
                            if not gens and replacements is not None:
                                if budget == 0:
                                    raise RolloutError(f"{self.stats.groups_skipped} groups skipped "
                                                       f"as invalid for {len(prompts)} prompts")
                                budget -= 1
                                tasks.add(asyncio.create_task(
                                    one(session, slot, next(replacements))))
                                continue
                            bar.update(1)
                            bar.set_postfix(tok_s=f"{self.stats.tokens_per_s:.0f}",
                                            retried=self.stats.requests_retried)
                            yield slot, gens
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        self.stats.wall_time_s = time.perf_counter() - start
        await self._check_health()

    async def generate(self, prompts: Sequence[Prompt], progress: bool = True) -> list[Sample]:
        """n samples for every prompt (groups skipped as invalid left out), sorted by (group_id,
        sample_index)."""
        ids = [p.group_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError("group_id must be unique within a batch")
        results: dict[tuple[int, int], Sample] = {}
        async for _, gens in self.stream(prompts, progress=progress):
            for index, g in enumerate(gens):
                key = (g.group_id, index)
                if key in results:
                    raise RolloutError(f"sample {key} generated twice")
                results[key] = g
        expected = self.n * (len(prompts) - self.stats.groups_skipped)
        if len(results) != expected:
            raise RolloutError(f"{len(results)} samples for {len(prompts)} prompts x n={self.n} "
                               f"({self.stats.groups_skipped} groups skipped)")
        return [results[k] for k in sorted(results)]

    def generate_batch(self, prompts: Sequence[Prompt], progress: bool = True) -> list[Sample]:
        """`generate` from synchronous code (starts and closes its own event loop)."""
        return asyncio.run(self.generate(prompts, progress))
