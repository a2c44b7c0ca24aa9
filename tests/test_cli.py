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
