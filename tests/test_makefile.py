"""`make bench` installs the benchmarks' extra and runs every script in benchmarks/ (issue 17.8:
`python benchmarks/tiling.py` after `make setup` failed with ModuleNotFoundError: librosa)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_installs_the_bench_extra_and_runs_every_benchmark_quickly(tmp_path: Path) -> None:
    venv = tmp_path / "venv"  # a dry run (-n) against a fresh venv: every step is printed, none run
    plan = subprocess.run(["make", "-n", "bench", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=60).stdout
    install = [line for line in plan.splitlines() if "pip install" in line and "[test,bench]" in line]
    assert install, plan
    runs = plan[plan.index(install[0]):]
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        assert f"{venv}/bin/python benchmarks/{script.name} " in runs, script.name
    # quick by default: every benchmark gets its small-size arguments
    assert "--repeats 1" in runs and runs.count("--repeats 1") == len(list((REPO / "benchmarks").glob("*.py")))
    full = subprocess.run(["make", "-n", "bench", f"VENV={venv}", "BENCH_QUICK="], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60).stdout
    assert "--repeats 1" not in full
