import subprocess
import sys

from megatron_vespo.cli import main


def test_demo_prints_the_kernel_table_and_constants(capsys):
    assert main(["demo", "--num-seqs", "256"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.vespo.c1_pos = 2.0" in out
    assert "  0.50 |    1.120 |    0.340" in out
    assert " A>=0 |  2.00 |  3.00 |  0.667 |  1.208 |       2.463" in out


def test_demo_rejects_a_bad_override_naming_the_key():
    result = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "demo", "algorithm.vespo.c3=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "algorithm.vespo.c3: unknown key" in result.stderr


def test_stop_writes_the_runs_stop_file_only_in_a_run_directory(tmp_path, capsys):
    """`megatron-vespo stop RUN_DIR`: the trainer takes the file after its step and checkpoints
    (the Slurm time-limit test runs that end to end)."""
    from megatron_vespo.stop_request import take_stop_request

    assert main(["stop", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / ".lock").touch()
    assert main(["stop", str(tmp_path), "--reason", "maintenance at 14:00"]) == 0
    assert take_stop_request(tmp_path / "stop_request") == "maintenance at 14:00"
    assert take_stop_request(tmp_path / "stop_request") is None  # taken once
