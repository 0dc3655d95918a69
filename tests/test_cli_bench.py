"""`fqt-compiler bench` finds and runs the benchmark scripts of the checkout."""
import subprocess
import sys

import pytest

from fqt_compiler.cli import BENCHMARKS, main


def test_bench_subcommand_runs_the_script(which="train"):
    assert which in BENCHMARKS
    out = subprocess.run([sys.executable, "-m", "fqt_compiler.cli", "bench", which, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"bench_{which}.py" in out.stdout and "--quick" in out.stdout


def test_bench_rejects_unknown_benchmark(capsys):
    # in process: a subprocess would spend its time importing torch before argparse runs
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nope"])
    assert exit_info.value.code != 0 and "invalid choice: 'nope'" in capsys.readouterr().err
