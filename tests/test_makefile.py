"""`make bench` installs the benchmarks' extra and runs every script in benchmarks/ (issue 17.8:
`python benchmarks/tiling.py` after `make setup` failed with ModuleNotFoundError: librosa)."""

from __future__ import annotations

import shutil
import re
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
    # quick by default: every benchmark gets its small-size arguments (BENCH_ARGS_<name>), none without
    makefile = (REPO / "Makefile").read_text()
    full = subprocess.run(["make", "-n", "bench", f"VENV={venv}", "BENCH_QUICK="], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60).stdout
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        assert f"BENCH_ARGS_{script.stem} :=" in makefile, script.name
        quick_line = next(line for line in re.split(r" && |\n", runs) if f"benchmarks/{script.name} " in line)
        full_line = next(line for line in re.split(r" && |\n", full) if f"benchmarks/{script.name} " in line)
        assert len(quick_line.split()) > len(full_line.split()), script.name


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_figures_reruns_the_reference_run_from_scratch_then_publishes(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    plan = subprocess.run(["make", "-n", "figures", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=60).stdout.splitlines()
    steps = [line for line in plan if "reference" in line]
    assert steps == ["rm -rf runs/reference",
                     f"{venv}/bin/soundscape-ssl run --profile demo --run-id reference",
                     f"{venv}/bin/soundscape-ssl figures runs/reference --out figures"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_runs_the_prepared_script_without_installing_and_ci_runs_its_dry_run(tmp_path: Path) -> None:
    """`make gpu-check` is benchmarks/gpu_check.sh and nothing else (no `setup`: a GPU node may be
    offline); CI (.ci/run) runs its CPU dry run, so the script cannot rot; bad arguments stop it."""
    venv = tmp_path / "venv"
    plan = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", f"VENV={venv}", "GPU_CHECK_ARGS=--device cpu --tiny"],
                          cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert plan == ["benchmarks/gpu_check.sh  --device cpu --tiny"]
    assert 'make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"' in (REPO / ".ci" / "run").read_text()
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert "pip install" not in script.read_text()
    refused = subprocess.run([str(script), "--device", "tpu"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--device must be cpu or cuda" in refused.stderr
