"""Rollout samples: what a learner trains on, and the JSONL file that records them.

A sample is one response to one prompt, as the rollout engine produced it: token ids, the engine's
log-prob of each response token (the behaviour policy mu), the reward, the policy version that
generated it and, for MoE models, the experts the engine routed each token to. Offline training
(`megatron-vespo train CONFIG --rollouts FILE`) replays such files; the rollout fleet writes them.

File format: one JSON object per line with the fields of `Sample` (optional ones may be absent).
Reading validates every line and names the line and field of the first problem.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

REQUIRED = ("sample_id", "group_id", "prompt_ids", "response_ids", "reward", "engine_logprobs")


@dataclass(frozen=True)
class Sample:
    """One prompt + response. engine_logprobs has one entry per response token; routed_experts, if
    present, is [prompt_len + response_len - 1][num_moe_layers][top_k] (SGLang's layout)."""

    sample_id: str
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    engine_logprobs: list[float]
    policy_version: int = 0
    routed_experts: Optional[list] = None
    metadata: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class SampleError(ValueError):
    """A sample that cannot be trained on; the message names the line/sample and the field."""


def _int_list(value, name: str, where: str, vocab_size: Optional[int]) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise SampleError(f"{where}: field {name!r} must be a list of integers")
    if vocab_size is not None:
        bad = [v for v in value if not 0 <= v < vocab_size]
        if bad:
            raise SampleError(f"{where}: field {name!r} has token id {bad[0]} outside the "
                              f"vocabulary [0, {vocab_size})")
    return value


def validate_sample(raw: dict, where: str, vocab_size: Optional[int] = None) -> Sample:
    """Check one decoded record and build the Sample; raises SampleError naming the field."""
    if not isinstance(raw, dict):
        raise SampleError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise SampleError(f"{where}: missing field(s) {missing}")
    known = {f for f in Sample.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SampleError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    if not isinstance(raw["sample_id"], str) or not raw["sample_id"]:
        raise SampleError(f"{where}: field 'sample_id' must be a non-empty string")
    for name in ("group_id", "policy_version"):
        if name in raw and (not isinstance(raw[name], int) or isinstance(raw[name], bool)):
            raise SampleError(f"{where}: field {name!r} must be an integer")
    prompt = _int_list(raw["prompt_ids"], "prompt_ids", where, vocab_size)
    response = _int_list(raw["response_ids"], "response_ids", where, vocab_size)
    if not prompt:
        raise SampleError(f"{where}: field 'prompt_ids' is empty")
    if not response:
        raise SampleError(f"{where}: field 'response_ids' is empty")
    reward = raw["reward"]
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        raise SampleError(f"{where}: field 'reward' must be a finite number, got {reward!r}")
    logprobs = raw["engine_logprobs"]
    # NaN/inf log-probs are legal here: the loss masks and counts such sequences.
    if not isinstance(logprobs, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in logprobs):
        raise SampleError(f"{where}: field 'engine_logprobs' must be a list of numbers")
    if len(logprobs) != len(response):
        raise SampleError(f"{where}: field 'engine_logprobs' has {len(logprobs)} entries for "
                          f"{len(response)} response tokens")
    routed = raw.get("routed_experts")
    if routed is not None and (not isinstance(routed, list) or len(routed) != len(prompt) + len(response) - 1):
        raise SampleError(f"{where}: field 'routed_experts' must have prompt_len + response_len - 1 = "
                          f"{len(prompt) + len(response) - 1} rows")
    if not isinstance(raw.get("metadata", {}), dict):
        raise SampleError(f"{where}: field 'metadata' must be an object")
    return Sample(**{**raw, "reward": float(reward),
                     "engine_logprobs": [float(v) for v in logprobs]})


def read_samples(path: str | os.PathLike, vocab_size: Optional[int] = None) -> list[Sample]:
    """All samples of a JSONL file, validated; duplicate sample ids are an error."""
    samples, seen = [], set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line, parse_constant=lambda c: float(c))  # NaN/Infinity allowed
            except json.JSONDecodeError as e:
                raise SampleError(f"{where}: not valid JSON ({e.msg})") from None
            sample = validate_sample(raw, where, vocab_size)
            if sample.sample_id in seen:
                raise SampleError(f"{where}: duplicate sample_id {sample.sample_id!r}")
            seen.add(sample.sample_id)
            samples.append(sample)
    if not samples:
        raise SampleError(f"{path}: no samples")
    return samples


def write_samples(path: str | os.PathLike, samples: Iterable[Sample]) -> None:
    """Write atomically (temp file + rename): a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            for s in samples:
                f.write(json.dumps(asdict(s)) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
