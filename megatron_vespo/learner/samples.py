"""Rollout samples: what a learner trains on, and the JSONL file that records them.

A sample is one response to one prompt, as the rollout engine produced it: token ids, the engine's
log-prob of each response token (the behaviour policy mu), the reward, the policy version that
generated it and, for MoE models, the experts the engine routed each token to. Offline training
(`megatron-vespo train CONFIG --rollouts FILE`) replays such files; the rollout fleet writes them
(`rollout.record`).

File format: one JSON object per line with the fields of `Sample` (optional ones may be absent).
Reading validates every line and names the line and field of the first problem. Parquet, the
format for large files, and the lazy readers of both are in `learner.sample_files`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch


# Routes are kept in the smallest unsigned integer type that holds the expert ids (uint8 up to 256
# experts): a Qwen3-30B-A3B token's 48 x 8 routes are 384 bytes, not the 1.5 KB of SGLang's int32
# or the ~12 KB of nested Python lists.
REQUIRED = ("sample_id", "group_id", "prompt_ids", "response_ids", "reward", "engine_logprobs")


@dataclass(frozen=True, eq=False)
class Sample:
    """One prompt + response. Token ids and log-probs are lists or (from the engine and between
    ranks) arrays. engine_logprobs has one entry per response token; routed_experts, if
    present, is an integer array [prompt_len + response_len - 1, num_moe_layers, top_k] (SGLang's
    layout) in the smallest type of the expert ids (`rollout.routed_experts.compact_routes`)."""

    sample_id: str
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    engine_logprobs: list[float]
    policy_version: int = 0
    routed_experts: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def as_record(self) -> dict:
        """The JSON-ready record of the file format."""
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(self).items()}

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return all(_same(getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__)


def _same(a, b) -> bool:
    """Field equality for lists and arrays alike (token ids arrive as either)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is None and b is None or (a is not None and b is not None
                                           and np.array_equal(np.asarray(a), np.asarray(b)))
    return a == b


@dataclass
class RolloutBatch:
    """A rollout batch as a source hands it to the trainer, on rank 0: its `size` samples arrive
    as prompt groups (consecutive samples of one prompt), each with its offset in the batch, in
    any order (as the engine finishes them, or as the file is read). The offset decides the step:
    mini-batch k (of N = staleness) holds offsets [k size/N, (k+1) size/N). `metrics()` gives the
    rollout metrics once the groups have run out."""

    size: int
    groups: Iterator[tuple[int, Sequence[Sample]]]
    metrics: Callable[[], dict] = dict


def route_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned integer type that holds expert ids [0, num_experts)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_experts <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"{num_experts} experts do not fit 32-bit expert ids")


def compact_routes(routes: np.ndarray, num_experts: Optional[int] = None) -> np.ndarray:
    """Integer routes [..., top_k] in `route_dtype` (of `num_experts`, or of the largest id
    present); ids outside [0, num_experts) are an error naming the first one."""
    if routes.size and (routes.dtype.kind not in "iu"):
        raise ValueError(f"routed experts must be integers, got {routes.dtype}")
    low, high = (int(routes.min()), int(routes.max())) if routes.size else (0, -1)
    limit = num_experts if num_experts is not None else high + 1
    if low < 0 or high >= limit:
        raise ValueError(f"routed expert id {low if low < 0 else high} is outside "
                                 f"[0, {limit})")
    return routes.astype(route_dtype(max(limit, 1)), copy=False)


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


def validate_sample(raw: dict, where: str, vocab_size: Optional[int] = None,
                    num_experts: Optional[int] = None) -> Sample:
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
    if routed is not None:
        rows = len(prompt) + len(response) - 1
        try:
            routed = compact_routes(np.asarray(routed), num_experts)
        except (ValueError, TypeError) as e:  # ragged or non-integer lists, ids out of range
            raise SampleError(f"{where}: field 'routed_experts': {e}") from None
        if routed.ndim != 3 or routed.shape[0] != rows:
            raise SampleError(f"{where}: field 'routed_experts' must be [prompt_len + response_len "
                              f"- 1 = {rows}, num_moe_layers, top_k], got shape {routed.shape}")
    if not isinstance(raw.get("metadata", {}), dict):
        raise SampleError(f"{where}: field 'metadata' must be an object")
    return Sample(**{**raw, "reward": float(reward), "routed_experts": routed,
                     "prompt_ids": np.asarray(prompt, dtype=np.int32),
                     "response_ids": np.asarray(response, dtype=np.int32),
                     "engine_logprobs": np.asarray(logprobs, dtype=np.float64)})


def read_samples(path: str | os.PathLike, vocab_size: Optional[int] = None,
                 num_experts: Optional[int] = None) -> list[Sample]:
    """All samples of a JSONL file (or of a Parquet one, `learner.sample_files`), validated (token
    ids against `vocab_size`, routed expert ids against `num_experts` when given); duplicate
    sample ids are an error."""
    if Path(path).suffix == ".parquet" or Path(path).is_dir():
        from .sample_files import open_rollout_file

        rollouts = open_rollout_file(path, vocab_size, num_experts)
        return list(rollouts.samples(0, rollouts.num_samples))
    return [sample for _, sample in jsonl_rows(path, vocab_size, num_experts)]


def parse_line(line: str | bytes, where: str, vocab_size: Optional[int] = None,
               num_experts: Optional[int] = None) -> Sample:
    """One JSONL record, validated (`validate_sample`); errors name `where`."""
    try:
        raw = json.loads(line, parse_constant=float)  # NaN/Infinity allowed
    except json.JSONDecodeError as e:
        raise SampleError(f"{where}: not valid JSON ({e.msg})") from None
    return validate_sample(raw, where, vocab_size, num_experts)


def jsonl_rows(path: str | os.PathLike, vocab_size: Optional[int] = None,
               num_experts: Optional[int] = None) -> Iterator[tuple[int, Sample]]:
    """(byte offset of its line, sample) for every record of a JSONL file, validated; a duplicate
    sample id or a file without samples is an error naming the line."""
    seen: set[str] = set()
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            sample = parse_line(line, where, vocab_size, num_experts)
            if sample.sample_id in seen:
                raise SampleError(f"{where}: duplicate sample_id {sample.sample_id!r}")
            seen.add(sample.sample_id)
            yield start, sample
    if not seen:
        raise SampleError(f"{path}: no samples")


def write_samples(path: str | os.PathLike, samples: Iterable[Sample]) -> None:
    """Write atomically (temp file + rename): a reader never sees a half-written file. A `.parquet`
    path gets the Parquet format, one row group per run of samples of one group."""
    path = Path(path)
    if path.suffix == ".parquet":
        from .sample_files import write_parquet_samples

        write_parquet_samples(path, (list(run) for _, run in itertools.groupby(
            samples, key=lambda s: s.group_id)))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            for s in samples:
                f.write(json.dumps(s.as_record()) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def samples_to_columns(samples: Sequence[Sample], **per_sample: torch.Tensor) -> dict:
    """Samples as flat columns (`parallel.transport` moves them as bytes): token ids [sum L],
    engine log-probs [sum R], routes [sum (L - 1), layers, k] when every sample has them,
    per-sample lengths, rewards, groups, versions, ids (UTF-8, newline-separated), plus any
    given [S] tensors. Metadata stays behind (training does not read it)."""
    prompt = torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.int64)
    response = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.int64)
    tokens = np.concatenate([np.concatenate([np.asarray(s.prompt_ids, dtype=np.int64),
                                             np.asarray(s.response_ids, dtype=np.int64)])
                             for s in samples]) if samples else np.empty(0, np.int64)
    columns = {
        "prompt_lengths": prompt, "response_lengths": response,
        "tokens": torch.from_numpy(tokens.astype(np.int32)),
        "engine_logprobs": torch.from_numpy(np.concatenate(
            [np.asarray(s.engine_logprobs, dtype=np.float64) for s in samples] or [np.empty(0)])),
        "rewards": torch.tensor([s.reward for s in samples], dtype=torch.float64),
        "group_ids": torch.tensor([s.group_id for s in samples], dtype=torch.int64),
        "policy_versions": torch.tensor([s.policy_version for s in samples], dtype=torch.int64),
        "sample_ids": torch.frombuffer(bytearray("\n".join(s.sample_id for s in samples).encode()),
                                       dtype=torch.uint8),
        **per_sample,
    }
    if samples and all(s.routed_experts is not None for s in samples):
        columns["routes"] = torch.from_numpy(np.concatenate([np.asarray(s.routed_experts)
                                                             for s in samples]))
    return columns


def columns_to_samples(columns: dict) -> list[Sample]:
    """The samples of `samples_to_columns`, their arrays views of the columns (one Python object
    per sample, none per token)."""
    prompt, response = columns["prompt_lengths"].tolist(), columns["response_lengths"].tolist()
    ids = bytes(columns["sample_ids"].numpy()).decode().split("\n") if prompt else []
    tokens, logprobs = columns["tokens"].numpy(), columns["engine_logprobs"].numpy()
    routes = columns["routes"].numpy() if "routes" in columns else None
    rewards, groups = columns["rewards"].tolist(), columns["group_ids"].tolist()
    versions = columns["policy_versions"].tolist()
    out, t, r, q = [], 0, 0, 0
    for i, (p, n) in enumerate(zip(prompt, response)):
        out.append(Sample(ids[i], groups[i], tokens[t:t + p], tokens[t + p:t + p + n], rewards[i],
                          logprobs[r:r + n], versions[i],
                          None if routes is None else routes[q:q + p + n - 1]))
        t, r, q = t + p + n, r + n, q + p + n - 1
    return out
