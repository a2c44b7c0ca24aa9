"""Rollout files read lazily: JSONL (`learner.samples`' format) and Parquet, for offline training.

`open_rollout_file(path)` checks the file and returns a reader whose `samples(start, stop)` yields
the samples of rows [start, stop) one at a time, so a trainer holds one rollout batch's group in
transit, never the file.

- JSONL: opening validates every line (the error names the line and the field) and keeps only each
  line's byte offset; reading seeks there and parses again. For files that fit a test or a study.
- Parquet: the format for a paper-size rollout file. One row per sample, list columns for token
  ids, log-probs and the flat routes (`routed_experts` in the smallest unsigned type of the expert
  ids, [tokens x layers x top_k] per row, the two trailing sizes in the schema's metadata), one row
  group per prompt group as the fleet writes them. Opening checks the schema, the sample ids (one
  small column) and which rows carry routes (row-group statistics); each row group is read and
  validated column by column when it is reached, and an error names the row and the field.

A directory holding Parquet files is read as their concatenation in name order (what a run with
`rollout.record: true` writes: one file per rollout batch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .samples import REQUIRED, Sample, SampleError, jsonl_rows, parse_line, route_dtype

ROUTES_KEY = b"megatron_vespo.routes"  # schema metadata: [num_moe_layers, top_k] as JSON


def _schema(route_type=None):
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("group_id", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.int32())),
        ("reward", pa.float64()), ("engine_logprobs", pa.list_(pa.float64())),
        ("policy_version", pa.int64()), ("routed_experts", pa.list_(route_type or pa.uint8())),
        ("metadata", pa.string())])


def _group_table(samples: Sequence[Sample], route_type):
    import pyarrow as pa

    def flat(arrays, dtype):
        values = [np.asarray(a, dtype=dtype).reshape(-1) for a in arrays]
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum([v.size for v in values], out=offsets[1:])
        return offsets, (np.concatenate(values) if values else np.empty(0, dtype))

    def list_column(arrays, dtype, arrow_type):
        offsets, values = flat(arrays, dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=arrow_type))

    routed = [s.routed_experts for s in samples]
    routes = list_column([r if r is not None else np.empty(0) for r in routed],
                         route_type.to_pandas_dtype(), route_type)
    if any(r is None for r in routed):  # rows without routes are null, not empty
        mask = pa.array([r is None for r in routed])
        routes = pa.ListArray.from_arrays(routes.offsets, routes.values, mask=mask)
    return pa.Table.from_arrays([
        pa.array([s.sample_id for s in samples], pa.string()),
        pa.array([s.group_id for s in samples], pa.int64()),
        list_column([s.prompt_ids for s in samples], np.int32, pa.int32()),
        list_column([s.response_ids for s in samples], np.int32, pa.int32()),
        pa.array([float(s.reward) for s in samples], pa.float64()),
        list_column([s.engine_logprobs for s in samples], np.float64, pa.float64()),
        pa.array([s.policy_version for s in samples], pa.int64()),
        routes, pa.array([json.dumps(s.metadata) for s in samples], pa.string())],
        schema=_schema(route_type))


class ParquetSampleWriter:
    """Writes prompt groups to a Parquet rollout file, one row group each, as they come; the file
    appears under its name only when `close()` succeeds (a reader never sees a half-written one).
    Routes are stored in the type of `num_experts` (default: of the first routed sample). As a
    context manager it closes on success and aborts (no file) on any exception."""

    def __init__(self, path: str | os.PathLike, num_experts: Optional[int] = None) -> None:
        self.path, self.num_experts = Path(path), num_experts
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.writer, self.schema, self.route_type = None, None, None

    def write(self, group: Sequence[Sample]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            routed = next((np.asarray(s.routed_experts) for s in group
                           if s.routed_experts is not None), None)
            dtype = route_dtype(self.num_experts) if self.num_experts else (
                np.dtype(routed.dtype) if routed is not None else np.dtype(np.uint8))
            self.route_type = pa.from_numpy_dtype(dtype)
            shape = list(routed.shape[1:]) if routed is not None else None
            self.schema = _schema(self.route_type).with_metadata({ROUTES_KEY: json.dumps(shape)})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(_group_table(group, self.route_type).replace_schema_metadata(
            self.schema.metadata))

    def close(self) -> None:
        if self.writer is None:
            raise ValueError(f"{self.path}: no samples to write")
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ParquetSampleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_parquet_samples(path: str | os.PathLike, groups: Iterable[Sequence[Sample]],
                          num_experts: Optional[int] = None) -> None:
    """Write prompt groups to a Parquet rollout file (`ParquetSampleWriter`)."""
    with ParquetSampleWriter(path, num_experts) as writer:
        for group in groups:
            writer.write(group)


def recorded(groups: Iterable[tuple[int, Sequence[Sample]]], path: str | os.PathLike,
             num_experts: Optional[int] = None) -> Iterator[tuple[int, Sequence[Sample]]]:
    """`groups` passed through, each also written to the Parquet file `path` (`rollout.record`);
    the file is complete once they have run out, and absent if they never do (a generator closed
    early aborts it)."""
    with ParquetSampleWriter(path, num_experts) as writer:
        for offset, group in groups:
            writer.write(group)
            yield offset, group


class JsonlRolloutFile:
    """A JSONL rollout file, validated on opening; samples parsed again when read."""

    def __init__(self, path: Path, vocab_size: Optional[int], num_experts: Optional[int]) -> None:
        self.path, self.vocab_size, self.num_experts = path, vocab_size, num_experts
        self.offsets: list[int] = []
        self.rows_without_routes = 0
        for offset, sample in jsonl_rows(path, vocab_size, num_experts):
            self.offsets.append(offset)
            self.rows_without_routes += sample.routed_experts is None

    @property
    def num_samples(self) -> int:
        return len(self.offsets)

    def samples(self, start: int, stop: int) -> Iterator[Sample]:
        if start >= stop:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offsets[start])
            lines = (line for line in f if line.strip())
            for row in range(start, stop):
                yield parse_line(next(lines), f"{self.path} row {row}", self.vocab_size,
                                 self.num_experts)


class ParquetRolloutFile:
    """One or more Parquet rollout files read row group by row group."""

    def __init__(self, paths: Sequence[Path], vocab_size: Optional[int],
                 num_experts: Optional[int]) -> None:
        import pyarrow.parquet as pq

        self.vocab_size, self.num_experts = vocab_size, num_experts
        self.parts = []  # (path, ParquetFile, first row, route shape)
        self.rows_without_routes = 0
        first, seen = 0, set()
        for path in paths:
            f = pq.ParquetFile(path)
            names = f.schema_arrow.names
            missing = [c for c in (*REQUIRED, "routed_experts") if c not in names]
            if missing:
                raise SampleError(f"{path}: missing column(s) {missing}")
            shape = json.loads((f.schema_arrow.metadata or {}).get(ROUTES_KEY, b"null"))
            ids = f.read(columns=["sample_id"]).column(0).to_pylist()
            for row, sample_id in enumerate(ids):
                if not sample_id:
                    raise SampleError(f"{path} row {row}: field 'sample_id' must be a non-empty string")
                if sample_id in seen:
                    raise SampleError(f"{path} row {row}: duplicate sample_id {sample_id!r}")
                seen.add(sample_id)
            for g in range(f.metadata.num_row_groups):
                group = f.metadata.row_group(g)
                leaf = next(group.column(c) for c in range(group.num_columns)
                            if group.column(c).path_in_schema.startswith("routed_experts."))
                # a row without routes is a null list: the leaf column's statistics count it
                stats = leaf.statistics
                self.rows_without_routes += stats.null_count if stats is not None and \
                    stats.has_null_count else group.num_rows
            self.parts.append((path, f, first, shape))
            first += f.metadata.num_rows
        self.num_samples = first
        if not self.num_samples:
            raise SampleError(f"{paths[0] if paths else 'no Parquet file'}: no samples")

    def samples(self, start: int, stop: int) -> Iterator[Sample]:
        for path, f, first, shape in self.parts:
            row = first
            for g in range(f.metadata.num_row_groups):
                rows = f.metadata.row_group(g).num_rows
                if row + rows > start and row < stop:
                    table = f.read_row_group(g)
                    for i, sample in enumerate(self._group_samples(table, path, row - first, shape)):
                        if start <= row + i < stop:
                            yield sample
                row += rows

    def _group_samples(self, table, path: Path, first_row: int,
                       shape: Optional[list[int]]) -> list[Sample]:
        """The samples of one row group, validated column by column (no per-token objects)."""
        columns = {name: table.column(name).combine_chunks() for name in table.column_names}
        n = table.num_rows

        def lists(name: str):
            col = columns[name]
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)
            return offsets - offsets[0], values[offsets[0]:offsets[-1]]

        def fail(i: int, message: str):
            raise SampleError(f"{path} row {first_row + i}: {message}")

        for name in ("group_id", "reward", "policy_version", "sample_id", "prompt_ids",
                     "response_ids", "engine_logprobs"):
            if columns[name].null_count:
                fail(int(np.flatnonzero(columns[name].is_null().to_numpy(zero_copy_only=False))[0]),
                     f"field {name!r} is null")
        rewards = columns["reward"].to_numpy()
        if not np.isfinite(rewards).all():
            i = int(np.flatnonzero(~np.isfinite(rewards))[0])
            fail(i, f"field 'reward' must be a finite number, got {rewards[i]!r}")
        out = {}
        for name in ("prompt_ids", "response_ids"):
            offsets, values = lists(name)
            lengths = np.diff(offsets)
            if (lengths == 0).any():
                fail(int(np.flatnonzero(lengths == 0)[0]), f"field {name!r} is empty")
            if self.vocab_size is not None and values.size and (
                    values.min() < 0 or values.max() >= self.vocab_size):
                bad = np.flatnonzero((values < 0) | (values >= self.vocab_size))[0]
                fail(int(np.searchsorted(offsets, bad, side="right") - 1),
                     f"field {name!r} has token id {values[bad]} outside the vocabulary "
                     f"[0, {self.vocab_size})")
            out[name] = (offsets, values)
        lp_offsets, logprobs = lists("engine_logprobs")
        response_lengths = np.diff(out["response_ids"][0])
        wrong = np.flatnonzero(np.diff(lp_offsets) != response_lengths)
        if wrong.size:
            i = int(wrong[0])
            fail(i, f"field 'engine_logprobs' has {np.diff(lp_offsets)[i]} entries for "
                    f"{response_lengths[i]} response tokens")
        routes_col = columns["routed_experts"]
        has_routes = ~routes_col.is_null().to_numpy(zero_copy_only=False)
        route_offsets, route_values = lists("routed_experts")
        if has_routes.any():
            if shape is None:
                fail(int(np.flatnonzero(has_routes)[0]), "field 'routed_experts' is set but the "
                     "file's schema does not give its [num_moe_layers, top_k]")
            per_token = shape[0] * shape[1]
            rows = np.diff(out["prompt_ids"][0]) + response_lengths - 1
            wrong = np.flatnonzero(has_routes & (np.diff(route_offsets) != rows * per_token))
            if wrong.size:
                i = int(wrong[0])
                fail(i, f"field 'routed_experts' has {np.diff(route_offsets)[i]} values, not "
                        f"(prompt_len + response_len - 1) x {shape[0]} x {shape[1]} = "
                        f"{rows[i] * per_token}")
            if self.num_experts is not None and route_values.size and \
                    route_values.max() >= self.num_experts:
                bad = int(np.argmax(route_values >= self.num_experts))
                fail(int(np.searchsorted(route_offsets, bad, side="right") - 1),
                     f"field 'routed_experts': routed expert id {route_values[bad]} is outside "
                     f"[0, {self.num_experts})")
        ids = columns["sample_id"].to_pylist()
        groups = columns["group_id"].to_numpy().tolist()
        versions = columns["policy_version"].to_numpy().tolist()
        metadata = columns["metadata"].to_pylist()
        (p_off, prompts), (r_off, responses) = out["prompt_ids"], out["response_ids"]
        samples = []
        for i in range(n):
            routed = None
            if has_routes[i]:
                routed = route_values[route_offsets[i]:route_offsets[i + 1]].reshape(-1, *shape)
            samples.append(Sample(
                ids[i], groups[i], prompts[p_off[i]:p_off[i + 1]], responses[r_off[i]:r_off[i + 1]],
                float(rewards[i]), logprobs[lp_offsets[i]:lp_offsets[i + 1]], versions[i], routed,
                json.loads(metadata[i]) if metadata[i] else {}))
        return samples


def open_rollout_file(path: str | os.PathLike, vocab_size: Optional[int] = None,
                      num_experts: Optional[int] = None):
    """The reader for a .jsonl file, a .parquet file or a directory of .parquet files."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise SampleError(f"{path}: a directory of rollouts must hold .parquet files")
        return ParquetRolloutFile(parts, vocab_size, num_experts)
    if not path.exists():
        raise SampleError(f"{path}: no such rollout file")
    if path.suffix == ".parquet":
        return ParquetRolloutFile([path], vocab_size, num_experts)
    return JsonlRolloutFile(path, vocab_size, num_experts)

