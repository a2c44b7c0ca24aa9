"""The benchmark scripts run end to end with tiny sizes: exit 0, print their table and a verdict.

Each runs as a subprocess (`python benchmarks/<script>.py <small flags>`), as a user would run it.
Only correctness of the plumbing is checked here, never the measured numbers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *flags: str, timeout: float = 120.0) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *flags],
        capture_output=True, text=True, timeout=timeout, cwd=BENCHMARKS.parent,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_loss_throughput_small():
    out = run_script("loss_throughput.py", "--seqs", "8", "--seq-len", "64", "--repeats", "1",
                     "--warmup", "0", "--threads", "1")
    assert re.search(r"^path\s+best ms\s+Mtok/s\s+GB/s\s+vs copy$", out, re.M), out
    for row in ("copy (baseline)", "vespo", "grpo"):
        assert re.search(rf"^{re.escape(row)}\s", out, re.M), out
    assert re.search(r"^piece\s+best ms\s+share$", out, re.M), out
    assert re.search(r"^RESULT vespo loss path / copy bandwidth = [\d.]+ .*: (PASS|FAIL)$", out, re.M), out


@pytest.mark.slow
def test_cp_comm_bytes_small():
    out = run_script("cp_comm_bytes.py", "--cp", "2", "--seqs", "2", "--seq-len", "64")
    assert re.search(r"^cp\s+S\s+T\s+T/rank\s+scheme collectives", out, re.M), out
    assert re.search(r"^cp\s+scheme 2\(n-1\)/n\*24\*S", out, re.M), out
    row = re.search(r"^2\s+2\s+.*all_reduce\[2,3\]float64.*\s(yes|NO)\s+[\d.e+-]+\s+[\d.]+$", out, re.M)
    assert row and row.group(1) == "yes", out  # every rank logged the same collectives
    assert re.search(r"^RESULT min gather/scheme ratio .*: (PASS|FAIL)$", out, re.M), out


def test_route_payload_small():
    out = run_script("route_payload.py", "--prompt", "8", "--response", "24", "--layers", "3",
                     "--repeats", "1")
    for row in ("nested lists (former)", "compact array"):
        assert re.search(rf"^{re.escape(row)}\s", out, re.M), out
    assert re.search(r"^RESULT compact / former: \d+x faster per token, .*: (PASS|FAIL)$", out, re.M), out


@pytest.mark.slow
def test_data_plane_small():
    out = run_script("data_plane.py", "--sequences", "32", "--former-sequences", "8", "--mean", "64",
                     "--longest", "256", "--prompt", "16", "--layers", "2", "--ranks", "2",
                     timeout=300)
    for row in ("current rank 1", "former rank 1"):
        assert re.search(rf"^{re.escape(row)}\s", out, re.M), out
    assert re.search(r"^RESULT current / former per token: \d+x faster .*: (PASS|FAIL); peak RSS .*"
                     r"rank 0 included.*: (PASS|FAIL)$", out, re.M), out


def test_gpu_check_dry_run():
    """The GPU check's plan on a machine without a GPU: every section reports what it would run."""
    out = run_script("gpu_check.py", "--dry-run", timeout=300)
    for section in ("gpu tests", "loss path", "log-prob memory", "MoE train step", "NCCL bucket"):
        assert re.search(rf"^{re.escape(section)}\s+skip\s+.*dry run: would ", out, re.M), out
    assert "dry run: would run the 2 gpu-marked tests" in out, out


@pytest.mark.slow
def test_weight_sync_small():
    out = run_script("weight_sync.py", "--layers", "1", "--bucket-mb", "1", "--hidden", "128",
                     "--vocab", "1024", timeout=300)
    for path in ("stream sync", "former sync", "plain broadcast", "plain relay", "stream sync @ link",
                 "former sync @ link", "plain broadcast @ link", "stream export", "plain write"):
        assert re.search(rf"^EP2 [\d.]+ \S+ {path} r1\s", out, re.M), out
    assert re.search(r"^TP2 .*: streaming peak RSS .* stream sync / plain broadcast at a 200 MB/s link = "
                     r"[\d.]+x .* on loopback [\d.]+x, / broadcast \+ relay [\d.]+x$", out, re.M), out
    assert re.search(r"^RESULT: (PASS|FAIL)$", out, re.M), out


def test_math_verifiers_small():
    out = run_script("math_verifiers.py", "--responses", "16", "--workers", "1", "--timeout", "1")
    assert re.search(r"^math_verify\+fast\s+\d+/\d+", out, re.M), out
    assert re.search(r"^math_verify in process \(plain\)\s", out, re.M), out
    assert "hostile answer: scored 0" in out
    assert re.search(r"^RESULT math_verify\+fast right on \d+/\d+ .*: (PASS|FAIL)$", out, re.M), out
