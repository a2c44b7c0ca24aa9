"""MLflow run tracking for rank 0: params, one batched request per step, artifacts, outage buffering.

Rank 0 owns the run (`start_tracker` hands other ranks a `NullTracker`). Every request goes through
an on-disk `Outbox` and is sent from its front, so an unreachable tracking server never stops
training and never loses or reorders data: requests wait in `<run_dir>/mlflow_buffer/pending.jsonl`
and are flushed, in order, by a later call once a back-off delay has passed. Failures are caught,
counted in `stats`, and reported once per outage with the reason.

Usage (rank 0):

    tracker = start_tracker(cfg.tracking, run_dir, cfg, resume=args.resume, rank=rank)
    tracker.log_metrics(step, metrics)                    # one log_batch per step
    tracker.log_artifact(heatmap_png, "routing")          # e.g. a file from heatmap.py
    tracker.log_histograms(step, {"phi": phi, "w": w})
    tracker.close("FINISHED")                             # or "FAILED" / "KILLED"
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional


from .histograms import write_histograms
from .kernel_plot import write_kernel_plot
from .outbox import Outbox

log = logging.getLogger(__name__)

# MLflow 3.x request limits (mlflow.utils.validation): longer param values are rejected or cut by
# the server, bigger batches are rejected outright.
MAX_PARAM_VALUE_CHARS = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_KEY_CHARS = 250

# Distributions whose versions are logged as params (version.<name>).
TRACKED_PACKAGES = ("torch", "megatron-core", "sglang", "mlflow", "transformers", "megatron-vespo")

# MLflow error codes that mean "this request will never be accepted": retrying cannot help, so the
# request is dropped (counted in stats.rejected and logged). Everything else counts as an outage.
_PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST", "ENDPOINT_NOT_FOUND", "NOT_FOUND",
})
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_NONFINITE_METRIC = "tracking/nonfinite_metrics"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_SOURCE_DIR = Path(__file__).resolve().parent  # its git commit is the code this run executes


# URI schemes of MLflow tracking stores (a database URI may carry a driver: postgresql+psycopg2)
TRACKING_SCHEMES = frozenset({"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                              "databricks", "databricks-uc"})


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how a run is tracked (the `tracking` section of the config)."""

    enabled: bool = True
    # Tracking URI (http://host:port, sqlite:///path, ...). None: a local sqlite store in the run
    # directory (<run_dir>/mlflow.db, artifacts in <run_dir>/mlartifacts), so no server is needed.
    uri: Optional[str] = None
    experiment: str = "megatron-vespo"
    # None: the run directory's name.
    run_name: Optional[str] = None
    # Where requests wait while the store is unreachable. None: <run_dir>/mlflow_buffer.
    buffer_dir: Optional[str] = None
    # First retry this long after a failure; the delay doubles per failed retry up to the maximum.
    retry_interval_s: float = 5.0
    max_retry_interval_s: float = 60.0
    # Per HTTP request. MLflow's own retries are switched off (the outbox retries instead), so one
    # log call costs at most about this much while the server hangs.
    request_timeout_s: int = 5

    def __post_init__(self) -> None:
        if self.uri is not None and not self.uri.strip():
            raise ValueError("uri must be a tracking URI or null (local sqlite store), got ''")
        scheme = (self.uri or "").partition("://")[0] if "://" in (self.uri or "") else None
        if scheme is not None and scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ValueError(f"uri={self.uri!r}: MLflow cannot track to {scheme}://; use one of "
                             f"{sorted(TRACKING_SCHEMES)} (or a local path)")
        if not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name")
        if self.run_name is not None and not self.run_name.strip():
            raise ValueError("run_name must be a non-empty name or null")
        if self.buffer_dir is not None and not self.buffer_dir.strip():
            raise ValueError("buffer_dir must be a directory or null")
        if not (math.isfinite(self.retry_interval_s) and self.retry_interval_s > 0):
            raise ValueError(f"retry_interval_s must be finite and > 0, got {self.retry_interval_s}")
        if not (math.isfinite(self.max_retry_interval_s)
                and self.max_retry_interval_s >= self.retry_interval_s):
            raise ValueError(f"max_retry_interval_s must be finite and >= retry_interval_s "
                             f"({self.retry_interval_s}), got {self.max_retry_interval_s}")
        if self.request_timeout_s < 1:
            raise ValueError(f"request_timeout_s must be >= 1, got {self.request_timeout_s}")

    def resolved_uri(self, run_dir: str | os.PathLike) -> str:
        return self.uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


@dataclass
class TrackerStats:
    """What tracking could not do cleanly; all zero in a healthy run."""

    buffered: int = 0         # requests waiting in the outbox now
    outages: int = 0          # periods in which the store was unreachable
    failed_requests: int = 0  # requests (first tries and retries) that failed transiently
    rejected: int = 0         # requests or values the store or the tracker refused for good
    nonfinite: int = 0        # NaN/inf metric values logged (NaN kept; MLflow stores inf as +-1.8e308)
    local_errors: int = 0     # plots, buffer writes and other local steps that failed
    last_flush_s: float = 0.0  # duration of the last flush of a backlog after an outage


def metric_key(name: str) -> str:
    """`name` made acceptable as an MLflow metric or param key: characters outside
    [A-Za-z0-9_ - . : / space] become '_', empty/'.'/'..' path segments are dropped or replaced."""
    key = _BAD_KEY_CHARS.sub("_", str(name))
    segments = ["_" if s in (".", "..") else s for s in key.split("/") if s]
    return ("/".join(segments) or "_")[:MAX_KEY_CHARS]


def fit_param_value(value: Any) -> str:
    """str(value), cut to MLflow's param limit with a marker saying how long it was."""
    text = str(value)
    if len(text) <= MAX_PARAM_VALUE_CHARS:
        return text
    marker = f"...[truncated from {len(text)} chars]"
    return text[:MAX_PARAM_VALUE_CHARS - len(marker)] + marker


@functools.lru_cache(maxsize=4)
def git_state(directory: str | os.PathLike) -> Optional[tuple[str, bool]]:
    """(commit, dirty) of the git working tree holding `directory`; None outside a repository or
    without git. Dirty means tracked files differ from the commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None


def environment_params() -> dict[str, str]:
    """Slurm job id (when in a job), git commit of this package's source tree, package versions."""
    params: dict[str, str] = {}
    if os.environ.get("SLURM_JOB_ID"):
        params["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    state = git_state(_SOURCE_DIR)
    if state is not None:
        params["git.commit"], params["git.dirty"] = state[0], str(state[1])
    for dist in TRACKED_PACKAGES:
        try:
            params[f"version.{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            params[f"version.{dist}"] = "not installed"
    return params


def run_params(config: Any) -> dict[str, str]:
    """Params of a run: the flattened resolved config plus `environment_params()`."""
    from ..config import flatten  # config imports this module for TrackingConfig

    params = {key: value for key, value in flatten(config).items()}
    params.update(environment_params())
    return {metric_key(k): fit_param_value(v) for k, v in params.items()}


def _is_permanent(error: BaseException) -> bool:
    if isinstance(error, _Unsendable):
        return True
    return getattr(error, "error_code", None) in _PERMANENT_ERRORS


def _reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


class _Unsendable(Exception):
    """A request that can never be sent (no run exists for it, its artifact file is gone)."""


class Tracker:
    """Rank 0's handle on one MLflow run. Build it with `Tracker.start` (or `start_tracker`).

    Public methods never raise because tracking failed; they raise ValueError only for invalid
    arguments. `stats` says what went wrong.
    """

    RUN_FILE = "mlflow_run.json"

    def __init__(self, cfg: TrackingConfig, run_dir: str | os.PathLike) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)  # holds the run id file and local artifacts
        self.uri = cfg.resolved_uri(self.run_dir)
        self.artifact_dir = self.run_dir / "tracking"  # local files this tracker writes and logs
        self.run_id: Optional[str] = None
        self._stats = TrackerStats()
        self._client: Any = None
        self._experiment_id: Optional[str] = None
        self._outbox = Outbox(cfg.buffer_dir or self.run_dir / "mlflow_buffer")
        self._outage_since: Optional[float] = None
        self._outage_sent = 0
        self._delay = cfg.retry_interval_s
        self._next_retry = 0.0
        self._warned: set[str] = set()
        self._closed = False
        stored = self._stored_run()
        if stored is not None and stored.get("tracking_uri") == self.uri:
            self.run_id = stored["run_id"]  # buffered requests of an earlier session go to its run

    # ----------------------------------------------------------------------------------- start
    @classmethod
    def start(cls, cfg: TrackingConfig, run_dir: str | os.PathLike, config: Any,
              resume: bool = False, resume_step: Optional[int] = None) -> "Tracker":
        """Create (or, with `resume`, continue from step `resume_step`) the run and log params,
        the resolved config and the phi kernel plot. `config` is the project `Config` (any
        dataclass works; the kernel plot needs `config.algorithm.vespo`). Returns at once if the
        store is unreachable: everything waits in the outbox."""
        tracker = cls(cfg, run_dir)
        if tracker.uri.startswith(("http://", "https://")):
            # MLflow retries a failed HTTP request 7 times with exponential back-off (~4 minutes)
            # and waits 120 s for a response; the outbox retries instead, so an outage costs a
            # log call one connection attempt. Read by MLflow at every request.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout_s)
        tracker._outbox.append({"kind": "start", "resume": bool(resume), "step": resume_step})
        tracker._outbox.append({"kind": "params", "params": tracker._local(run_params, config) or {}})
        tracker._pump()
        config_file = tracker._local(tracker._write_config, config)
        if config_file is not None:
            tracker.log_artifact(config_file)
        kernel = getattr(getattr(config, "algorithm", None), "vespo", None)
        if kernel is not None:
            tracker.log_kernel_plot(kernel)
        return tracker

    def _write_config(self, config: Any) -> Path:
        path = self.artifact_dir / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..config import dump_config  # config imports this module for TrackingConfig

        path.write_text(dump_config(config))
        return path

    # ------------------------------------------------------------------------------ public API
    @property
    def stats(self) -> TrackerStats:
        return dataclasses.replace(self._stats, buffered=len(self._outbox))

    @property
    def buffer_path(self) -> Path:
        return self._outbox.path

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log one step's metrics as one request. Values are anything `float()` takes (floats,
        numpy scalars, 0-d tensors); NaN and inf are logged and counted in `stats.nonfinite` and
        in the step's `tracking/nonfinite_metrics`; a value that is not a number is rejected
        (counted, warned once per key), never silently dropped."""
        if self._refuse_after_close("log_metrics"):
            return
        values: dict[str, float] = {}
        nonfinite = 0
        for name, raw in metrics.items():
            key = self._key(name)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                self._stats.rejected += 1
                self._warn_once(f"value:{key}", "metric %r: %r is not a number; not logged", key, raw)
                continue
            if not math.isfinite(value):
                nonfinite += 1
            values[key] = value
        self._stats.nonfinite += nonfinite
        values[_NONFINITE_METRIC] = float(nonfinite)
        self._outbox.append({"kind": "metrics", "step": int(step),
                             "timestamp": int(time.time() * 1000), "values": values})
        self._pump()

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file or directory into the run's artifacts (under `artifact_path`). If the
        store is down, a copy is buffered, so later changes to `path` do not affect the upload."""
        if self._refuse_after_close("log_artifact"):
            return
        self._outbox.append({"kind": "artifact", "path": str(Path(path).resolve()),
                             "artifact_path": artifact_path})
        self._pump()

    def log_kernel_plot(self, constants: Any) -> Optional[Path]:
        """Plot phi for `constants` (a `KernelConstants`) and log it as `plots/phi_kernel.png`
        (`start` already does this for `config.algorithm.vespo`). Returns the local PNG, or None
        if plotting failed (counted in `stats.local_errors`)."""
        if self._refuse_after_close("log_kernel_plot"):
            return None
        plot = self._local(write_kernel_plot, constants, self.artifact_dir / "phi_kernel.png")
        if plot is not None:
            self.log_artifact(plot, "plots")
        return plot

    def log_histograms(self, step: int, values: Mapping[str, Any], artifact_path: str = "histograms",
                       bins: int = 50) -> Optional[Path]:
        """Plot name -> 1-D tensor/array (weights, phi, ...) as one histogram grid PNG
        (`<artifact_path>/step_XXXXXXXX.png`) and log it. Returns the local PNG, or None if
        plotting failed (counted in `stats.local_errors`)."""
        if self._refuse_after_close("log_histograms"):
            return None
        path = self.artifact_dir / artifact_path / f"step_{int(step):08d}.png"
        written = self._local(write_histograms, values, path, f"step {step}", bins)
        if written is not None:
            self.log_artifact(written, artifact_path)
        return written

    def close(self, status: str = "FINISHED", wait_s: float = 0.0) -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED) after flushing the outbox,
        retrying for up to `wait_s` seconds if the store is down. Whatever cannot be sent stays
        in the buffer file and is sent when the run is resumed."""
        if status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {_RUN_STATUSES}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        self._outbox.append({"kind": "end", "status": status})
        if self.flush(wait_s):
            log.warning("MLflow: %d tracking request(s) not sent; they stay in %s and are sent "
                        "when this run directory is resumed or flushed (megatron-vespo tracking "
                        "flush)", len(self._outbox), self._outbox.path)

    def flush(self, wait_s: float = 0.0) -> int:
        """Send what the outbox holds (an earlier session's buffered requests included), retrying
        for up to `wait_s` seconds while the store is down; returns how many are left."""
        deadline = time.monotonic() + wait_s
        self._pump(force=True)
        while len(self._outbox) and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            self._pump(force=True)
        return len(self._outbox)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ------------------------------------------------------------------------- sending, retries
    def _pump(self, force: bool = False) -> None:
        """Send what is due, then make the buffer file match what is left. Never raises."""
        try:
            self._drain(force)
        except Exception as error:  # a local failure (a bug, a full disk): tracking must not stop training
            self._stats.local_errors += 1
            self._warn_once(f"drain:{type(error).__name__}", "MLflow tracking error: %s", _reason(error))
        try:
            self._outbox.settle()
        except OSError as error:
            self._stats.local_errors += 1
            self._warn_once("buffer", "cannot write the tracking buffer %s (%s); unsent requests "
                            "are kept in memory", self._outbox.path, _reason(error))

    def _drain(self, force: bool) -> None:
        if not len(self._outbox):
            return
        if self._outage_since is not None and not force and time.monotonic() < self._next_retry:
            return
        flush_start = time.monotonic()
        merge = True
        while len(self._outbox):
            batch = self._outbox.head(MAX_METRICS_PER_BATCH, merge)
            try:
                self._send(batch)
            except Exception as error:
                if not _is_permanent(error):
                    self._failed(error)
                    return
                if len(batch) > 1:
                    merge = False  # resend one record at a time to find the one refused
                    continue
                self._stats.rejected += 1
                log.warning("MLflow refused a %s request for good, dropped: %s",
                            batch[0]["kind"], _reason(error))
                self._outbox.pop(1)
                merge = True
                continue
            self._outbox.pop(len(batch))
            self._outage_sent += len(batch)
        if self._outage_since is not None:
            self._stats.last_flush_s = time.monotonic() - flush_start
            log.warning("MLflow tracking is back after %.1f s; %d buffered request(s) sent in %.2f s",
                        time.monotonic() - self._outage_since, self._outage_sent,
                        self._stats.last_flush_s)
            self._outage_since = None

    def _failed(self, error: BaseException) -> None:
        """A transient failure: start (or extend) the outage and schedule the next retry."""
        self._stats.failed_requests += 1
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since, self._outage_sent = now, 0
            self._stats.outages += 1
            self._delay = self.cfg.retry_interval_s
            log.warning("MLflow tracking at %s is unavailable (%s); buffering requests in %s and "
                        "retrying with back-off", self.uri, _reason(error), self._outbox.path)
        else:
            self._delay = min(2 * self._delay, self.cfg.max_retry_interval_s)
        self._next_retry = now + self._delay

    def _send(self, batch: list[dict[str, Any]]) -> None:
        if self._client is None:  # created on first use: a bad URI fails a send, not the caller
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        kind = batch[0]["kind"]
        if kind == "start":
            self._open_run(batch[0]["resume"], batch[0].get("step"))
            return
        if self.run_id is None:
            raise _Unsendable(f"no MLflow run exists for a buffered {kind} request")
        if kind == "metrics":
            self._send_metrics(batch)
        elif kind == "params":
            self._send_params(batch[0]["params"])
        elif kind == "artifact":
            record = batch[0]
            if not os.path.exists(record["path"]):
                raise _Unsendable(f"artifact {record['path']} does not exist")
            if os.path.isdir(record["path"]):
                self._client.log_artifacts(self.run_id, record["path"], record["artifact_path"])
            else:
                self._client.log_artifact(self.run_id, record["path"], record["artifact_path"])
        elif kind == "end":
            self._client.set_terminated(self.run_id, status=batch[0]["status"])
        else:
            raise _Unsendable(f"unknown request kind {kind!r}")

    def _send_metrics(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, record["timestamp"], record["step"])
                   for record in batch for key, value in record["values"].items()]
        # A single step with more than the batch limit goes out in chunks; a chunk resent after a
        # failure is deduplicated by the store (same key, timestamp, step and value).
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH],
                                   synchronous=True)

    def _send_params(self, params: dict[str, str]) -> None:
        """Log the params the run lacks. A resumed run whose params changed (a new Slurm job, an
        extended schedule) keeps the first values, as MLflow requires; the new ones become tags
        `resume.<key>`."""
        from mlflow.entities import Param, RunTag

        existing = self._client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(f"resume.{k}", v) for k, v in params.items()
                   if k in existing and existing[k] != v]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_BATCH], synchronous=True)
        for i in range(0, len(changed), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=changed[i:i + MAX_PARAMS_PER_BATCH],
                                   synchronous=True)

    def _open_run(self, resume: bool, step: Optional[int]) -> None:
        """Continue the stored run (resume; from `step`, when given) or create one and record
        its id in the run dir."""
        if resume and self.run_id is not None:
            try:
                self._client.get_run(self.run_id)
            except Exception as error:
                if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s is gone from %s; starting a new run", self.run_id, self.uri)
            else:
                if step is not None and self._logged_after(step):
                    self._rewind(step)
                else:
                    self._client.update_run(self.run_id, status="RUNNING")
                return
        elif resume:
            log.warning("MLflow: no run of %s recorded in %s; starting a new run", self.uri,
                        self.run_dir / self.RUN_FILE)
        self._create_run({})
        self._record_run()

    def _logged_after(self, step: int) -> bool:
        """Whether the run holds a step after `step` (every step logs _NONFINITE_METRIC)."""
        return any(m.step > step for m in self._client.get_metric_history(self.run_id, _NONFINITE_METRIC))

    def _rewind(self, step: int) -> None:
        """Continue in a new run holding the old run's params, tags and metric history up to
        `step`. MLflow cannot delete logged values: continuing the old run would show every step
        after `step` twice, once from the attempt the checkpoint does not continue. The old run is
        ended KILLED and tagged with its successor; its artifacts stay with it."""
        from mlflow.entities import Metric, RunTag

        old = self._client.get_run(self.run_id)
        tags = {k: v for k, v in old.data.tags.items() if not k.startswith("mlflow.")}
        self._create_run({**tags, "megatron_vespo.rewound_from_run": old.info.run_id,
                          "megatron_vespo.rewound_to_step": str(step)})
        self._send_params(old.data.params)  # the new run lacks them all
        kept = [Metric(m.key, m.value, m.timestamp, m.step) for key in old.data.metrics
                for m in self._client.get_metric_history(old.info.run_id, key) if m.step <= step]
        for i in range(0, len(kept), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=kept[i:i + MAX_METRICS_PER_BATCH],
                                   synchronous=True)
        self._client.log_batch(old.info.run_id, tags=[RunTag("megatron_vespo.rewound_into_run",
                                                             self.run_id)], synchronous=True)
        self._client.set_terminated(old.info.run_id, status="KILLED")
        self._record_run()  # only now: a resume cut short before this forks the old run again
        log.warning("MLflow: run %s had steps after step %d, which this resume trains again; it "
                    "continues as run %s with the history up to step %d (MLflow cannot delete "
                    "logged values)", old.info.run_id, step, self.run_id, step)

    def _create_run(self, tags: dict[str, str]) -> None:
        """A new run in the experiment (not yet recorded in the run dir)."""
        experiment_id = self._experiment()
        tags = {**tags, "megatron_vespo.run_dir": str(self.run_dir)}
        state = git_state(_SOURCE_DIR)
        if state is not None:
            tags["mlflow.source.git.commit"] = state[0]
        run = self._client.create_run(experiment_id, run_name=self.cfg.run_name or self.run_dir.name,
                                      tags=tags)
        self.run_id = run.info.run_id

    def _record_run(self) -> None:
        """This tracker's run is the run directory's (`RUN_FILE`)."""
        record = {"run_id": self.run_id, "experiment_id": self._experiment(), "tracking_uri": self.uri}
        path = self.run_dir / self.RUN_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        found = self._client.get_experiment_by_name(self.cfg.experiment)
        if found is None:
            # The default local store keeps artifacts beside its database, not in the cwd.
            location = None if self.cfg.uri else (self.run_dir / "mlartifacts").as_uri()
            try:
                self._experiment_id = self._client.create_experiment(self.cfg.experiment,
                                                                     artifact_location=location)
            except Exception as error:  # another run created it between our get and create
                if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                self._experiment_id = self._client.get_experiment_by_name(
                    self.cfg.experiment).experiment_id
        else:
            self._experiment_id = found.experiment_id
        return self._experiment_id

    # -------------------------------------------------------------------------------- helpers
    def _stored_run(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads((self.run_dir / self.RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _key(self, name: str) -> str:
        key = metric_key(name)
        if key != name:
            self._warn_once(f"key:{name}", "metric name %r is logged as %r (MLflow key rules)", name, key)
        return key

    def _local(self, fn: Any, *args: Any) -> Any:
        """Run a local step (plot, YAML, git); on failure count and warn, return None."""
        try:
            return fn(*args)
        except Exception as error:
            self._stats.local_errors += 1
            log.warning("MLflow tracking: %s failed: %s", getattr(fn, "__name__", fn), _reason(error))
            return None

    def _refuse_after_close(self, what: str) -> bool:
        if self._closed:
            self._warn_once(f"closed:{what}", "MLflow tracker is closed; %s ignored", what)
        return self._closed

    def _warn_once(self, tag: str, message: str, *args: Any) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning(message, *args)


class NullTracker:
    """The tracker of non-zero ranks and of runs with tracking disabled: accepts every call,
    logs nothing, so callers need no rank checks."""

    run_id = None
    stats = TrackerStats()

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        pass

    def log_kernel_plot(self, constants: Any) -> None:
        return None

    def log_histograms(self, step: int, values: Mapping[str, Any], artifact_path: str = "histograms",
                       bins: int = 50) -> None:
        return None

    def close(self, status: str = "FINISHED", wait_s: float = 0.0) -> None:
        if status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {_RUN_STATUSES}, got {status!r}")

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pass


def start_tracker(cfg: TrackingConfig, run_dir: str | os.PathLike, config: Any, *,
                  resume: bool = False, resume_step: Optional[int] = None,
                  rank: int = 0) -> Tracker | NullTracker:
    """`Tracker.start` on rank 0 with tracking enabled; a `NullTracker` everywhere else."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return Tracker.start(cfg, run_dir, config, resume, resume_step)
