"""MLflow tracking against a real `mlflow server` (sqlite on /dev/shm) and the default local store.

The server is stopped (SIGKILL) in the middle of a run and restarted on the same store and port:
every step logged during the outage must arrive, in order, exactly once, and no log call may block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_vespo.config import Config, load_config
from megatron_vespo.tracking.heatmap import write_load_heatmap
from megatron_vespo.tracking.histograms import write_histograms
from megatron_vespo.tracking.kernel_plot import write_kernel_plot
from megatron_vespo.algo.kernel import KernelConstants
from megatron_vespo.tracking.mlflow_run import (NullTracker, Tracker, TrackingConfig, fit_param_value,
                                                metric_key, start_tracker, MAX_PARAM_VALUE_CHARS)
from megatron_vespo.tracking.outbox import Outbox
# server, shm_dir: pytest fixtures
from tests.mlflow_server import MlflowServer, artifacts, free_port, server, shm_dir  # noqa: F401

# One log call during an outage: a refused connection, no MLflow retries.
MAX_CALL_S_DURING_OUTAGE = 5.0

def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def step_metrics(step: int) -> dict:
    """A learner step's metric dict, as `Learner.train_step` and offline.py produce them."""
    return {"loss": 0.5 / step, "grad_norm": torch.tensor(1.0 + step), "phi/mean": 0.9 + 0.01 * step,
            "phi/max": 1.2, "phi/nonfinite_frac": 0.0, "reward/mean": 0.1 * step,
            "staleness/versions_behind": float(step % 2), "perf/tokens_per_s_per_rank": 1234.5,
            "moe/router_kl": 1e-3 * step, "data/epoch": 0.0}


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_run_records_params_metrics_and_artifacts(server, shm_dir, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    config = Config()
    tracker = Tracker.start(TrackingConfig(uri=server.url, experiment="basic"), shm_dir, config)
    for step in range(1, 5):
        metrics = step_metrics(step)
        if step == 2:
            metrics["phi/mean"] = float("nan")  # logged, and counted
        tracker.log_metrics(step, metrics)
    heatmap = write_load_heatmap(torch.rand(2, 4), shm_dir / "routing" / "step_00000004.png")
    tracker.log_artifact(heatmap, "routing")
    tracker.log_histograms(4, {"phi": torch.rand(64), "weights/layer0": torch.randn(256)})
    tracker.close()
    assert dataclasses.asdict(tracker.stats) == dict(
        buffered=0, outages=0, failed_requests=0, rejected=0, nonfinite=1, local_errors=0,
        last_flush_s=0.0)

    client = _client(server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == shm_dir.name
    params = run.data.params
    assert params["algorithm.vespo.c1_pos"] == "2.0" and params["algorithm.loss"] == "vespo"
    assert params["train.output_dir"] == config.train.output_dir
    assert params["slurm.job_id"] == "4242"
    assert params["version.mlflow"] == "3.17.2" and params["version.torch"].startswith("2.")
    assert len(params["git.commit"]) == 40 and params["git.dirty"] in ("True", "False")

    assert _history(client, tracker.run_id, "loss") == [(s, 0.5 / s) for s in range(1, 5)]
    assert _history(client, tracker.run_id, "grad_norm") == [(s, 1.0 + s) for s in range(1, 5)]
    phi = _history(client, tracker.run_id, "phi/mean")
    assert [s for s, _ in phi] == [1, 2, 3, 4] and math.isnan(phi[1][1])
    assert _history(client, tracker.run_id, "tracking/nonfinite_metrics") == [
        (1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0)]

    assert artifacts(client, tracker.run_id) == {
        "config.yaml", "plots/phi_kernel.png", "routing/step_00000004.png",
        "histograms/step_00000004.png"}
    local = client.download_artifacts(tracker.run_id, "config.yaml", str(shm_dir / "download"))
    assert load_config(local) == config  # the resolved config, read back whole


def test_outage_buffers_then_flushes_every_step_once_in_order(server, shm_dir):
    cfg = TrackingConfig(uri=server.url, experiment="outage", retry_interval_s=0.5,
                         max_retry_interval_s=1.0, request_timeout_s=2)
    tracker = Tracker.start(cfg, shm_dir / "run", Config())
    for step in range(1, 4):
        tracker.log_metrics(step, step_metrics(step))
    assert tracker.stats.buffered == 0

    server.stop()
    call_s = []
    for step in range(4, 10):
        t0 = time.monotonic()
        tracker.log_metrics(step, step_metrics(step))
        call_s.append(time.monotonic() - t0)
        if step == 6:
            t0 = time.monotonic()
            tracker.log_histograms(step, {"phi": torch.rand(32)})
            call_s.append(time.monotonic() - t0)
        time.sleep(0.3)  # let some retries fall due while the server is still down
    # A run started while the server is down must not block either.
    t0 = time.monotonic()
    late = Tracker.start(cfg, shm_dir / "late", Config())
    late.log_metrics(1, step_metrics(1))
    call_s.append(time.monotonic() - t0)
    assert max(call_s) < MAX_CALL_S_DURING_OUTAGE, call_s
    stats = tracker.stats
    assert stats.outages == 1 and stats.failed_requests >= 2 and stats.buffered == 7
    assert tracker.buffer_path.exists() and late.run_id is None

    server.start()
    time.sleep(cfg.max_retry_interval_s + 0.1)  # the next retry is due
    t0 = time.monotonic()
    tracker.log_metrics(10, step_metrics(10))
    first_call_after_s = time.monotonic() - t0
    stats = tracker.stats
    assert stats.buffered == 0 and not tracker.buffer_path.exists()
    assert stats.rejected == 0 and stats.local_errors == 0 and stats.outages == 1
    assert 0 < stats.last_flush_s <= first_call_after_s
    tracker.close()
    late.close()
    assert late.stats.rejected == 0 and late.stats.local_errors == 0

    client = _client(server.url)
    assert _history(client, tracker.run_id, "loss") == [(s, 0.5 / s) for s in range(1, 11)]
    assert "histograms/step_00000006.png" in artifacts(client, tracker.run_id)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    late_run = client.get_run(late.run_id)
    assert late_run.info.status == "FINISHED" and "algorithm.vespo.c2_neg" in late_run.data.params
    assert _history(client, late.run_id, "loss") == [(1, 0.5)]
    assert artifacts(client, late.run_id) == {"config.yaml", "plots/phi_kernel.png"}


def test_resume_continues_the_same_run(server, shm_dir, monkeypatch):
    cfg = TrackingConfig(uri=server.url, experiment="resume")
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    first = Tracker.start(cfg, shm_dir, Config())
    first.log_metrics(1, step_metrics(1))
    first.close("KILLED")
    assert _client(server.url).get_run(first.run_id).info.status == "KILLED"

    monkeypatch.setenv("SLURM_JOB_ID", "101")  # the resumed job is a new Slurm job
    second = Tracker.start(cfg, shm_dir, Config(), resume=True)
    second.log_metrics(2, step_metrics(2))
    second.close()
    assert second.run_id == first.run_id and second.stats.rejected == 0
    run = _client(server.url).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["slurm.job_id"] == "100" and run.data.tags["resume.slurm.job_id"] == "101"
    assert _history(_client(server.url), first.run_id, "loss") == [(1, 0.5), (2, 0.25)]

    # Steps 3 and 4 logged, then a crash before step 4's checkpoint: the resume from step 3
    # trains step 4 again. MLflow cannot delete the first step 4: the run continues as a new run
    # holding the history up to step 3 once, and the old run points at it.
    third = Tracker.start(cfg, shm_dir, Config(), resume=True, resume_step=2)
    for step in (3, 4):
        third.log_metrics(step, step_metrics(step))
    third.close("KILLED")
    fourth = Tracker.start(cfg, shm_dir, Config(), resume=True, resume_step=3)
    fourth.log_metrics(4, {"loss": 0.75})
    fourth.close()
    client = _client(server.url)
    assert fourth.run_id != first.run_id and fourth.stats.rejected == 0
    assert json.loads((shm_dir / "mlflow_run.json").read_text())["run_id"] == fourth.run_id
    assert _history(client, fourth.run_id, "loss") == [(1, 0.5), (2, 0.25), (3, 0.5 / 3), (4, 0.75)]
    old, new = client.get_run(first.run_id), client.get_run(fourth.run_id)
    assert old.info.status == "KILLED" and old.data.tags["megatron_vespo.rewound_into_run"] == new.info.run_id
    assert new.info.status == "FINISHED" and new.data.tags["megatron_vespo.rewound_to_step"] == "3"
    assert new.data.params == old.data.params and new.data.tags["resume.slurm.job_id"] == "101"

    fresh = Tracker.start(cfg, shm_dir, Config(), resume=False)
    fresh.close()
    assert fresh.run_id not in (first.run_id, fourth.run_id)


def test_default_store_is_a_local_sqlite_file(shm_dir):
    tracker = Tracker.start(TrackingConfig(), shm_dir, Config())
    for step in range(1, 4):
        tracker.log_metrics(step, step_metrics(step))
    tracker.close("FAILED")
    assert tracker.uri == f"sqlite:///{shm_dir / 'mlflow.db'}" and tracker.stats.buffered == 0
    client = _client(tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.params["algorithm.loss"] == "vespo"
    assert _history(client, tracker.run_id, "reward/mean") == [(s, 0.1 * s) for s in range(1, 4)]
    artifacts = shm_dir / "mlartifacts" / tracker.run_id / "artifacts"
    assert (artifacts / "config.yaml").is_file() and (artifacts / "plots" / "phi_kernel.png").is_file()


def test_unreachable_store_never_raises_and_keeps_everything_on_disk(shm_dir):
    port = free_port()
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{port}", request_timeout_s=1)
    tracker = Tracker.start(cfg, shm_dir, dataclasses.replace(Config(), tracking=cfg))
    tracker.log_metrics(1, {"loss": 1.0, "inf": float("inf"), "odd name#": 2.0, "text": "n/a"})
    t0 = time.monotonic()
    tracker.close(wait_s=1.0)
    assert time.monotonic() - t0 < 3.0
    stats = tracker.stats
    assert stats.outages == 1 and stats.rejected == 1 and stats.nonfinite == 1
    # start, params, config, kernel plot, metrics, end: all waiting, in order, for a resume.
    kinds = [r["kind"] for r in Outbox(shm_dir / "mlflow_buffer")._records]
    assert kinds == ["start", "params", "artifact", "artifact", "metrics", "end"]
    metrics = Outbox(shm_dir / "mlflow_buffer")._records[4]
    assert metrics["values"]["odd name_"] == 2.0 and metrics["values"]["inf"] == float("inf")
    # The store comes back after the run: `megatron-vespo tracking flush` sends it all, no learner.
    down = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "tracking", "flush",
                           str(shm_dir), "--wait", "0"], capture_output=True, text=True)
    assert down.returncode == 1 and "6 left in" in down.stdout, down.stdout + down.stderr
    store = MlflowServer(shm_dir / "store", port)
    (shm_dir / "store").mkdir()
    store.start()
    try:
        sent = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "tracking", "flush",
                               str(shm_dir)], capture_output=True, text=True)
        assert sent.returncode == 0 and "sent 6 tracking request(s)" in sent.stdout, sent.stderr
        run_id = json.loads((shm_dir / "mlflow_run.json").read_text())["run_id"]
        run = _client(cfg.uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 1.0
        assert not (shm_dir / "mlflow_buffer" / "pending.jsonl").exists()
    finally:
        store.stop()


def test_outbox_keeps_private_artifact_copies_across_restarts(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("v1")
    box = Outbox(tmp_path / "buf")
    box.append({"kind": "artifact", "path": str(source), "artifact_path": None})
    box.append({"kind": "metrics", "step": 1, "timestamp": 1, "values": {"x": float("nan")}})
    box.settle()
    source.write_text("v2")  # the buffered upload is the file as logged
    again = Outbox(tmp_path / "buf")
    assert len(again) == 2 and Path(again.head(1)[0]["path"]).read_text() == "v1"
    assert math.isnan(again._records[1]["values"]["x"])
    copy = Path(again.head(1)[0]["path"])
    again.pop(1)
    again.settle()
    assert not copy.exists() and len(Outbox(tmp_path / "buf")) == 1
    again.pop(1)
    again.settle()
    assert not again.path.exists()


def test_config_validation_names_the_field():
    for kwargs, field in [(dict(uri=""), "uri"), (dict(experiment=" "), "experiment"),
                          (dict(retry_interval_s=0.0), "retry_interval_s"),
                          (dict(retry_interval_s=10.0, max_retry_interval_s=5.0), "max_retry_interval_s"),
                          (dict(request_timeout_s=0), "request_timeout_s"),
                          (dict(buffer_dir=""), "buffer_dir"), (dict(run_name=""), "run_name")]:
        with pytest.raises(ValueError, match=field):
            TrackingConfig(**kwargs)


def test_keys_params_and_null_tracker(tmp_path):
    assert metric_key("phi/mean") == "phi/mean"
    assert metric_key("a//b/../c#") == "a/b/_/c_"
    long = "x" * (MAX_PARAM_VALUE_CHARS + 10)
    assert len(fit_param_value(long)) == MAX_PARAM_VALUE_CHARS and "truncated" in fit_param_value(long)
    null = start_tracker(TrackingConfig(), tmp_path, Config(), rank=1)
    assert isinstance(null, NullTracker)
    null.log_metrics(1, {"loss": 1.0})
    null.close()
    assert isinstance(start_tracker(TrackingConfig(enabled=False), tmp_path, Config()), NullTracker)
    assert list(tmp_path.iterdir()) == []


def test_plots_write_pngs(tmp_path):
    kernel = write_kernel_plot(KernelConstants(), tmp_path / "k.png")
    hist = write_histograms({"empty": [], "nan": [float("nan")], "w": torch.randn(10)}, tmp_path / "h.png")
    for path in (kernel, hist):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
