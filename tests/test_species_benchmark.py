"""benchmarks/species.py end to end on a sliver of the real data: pool, budget, scores, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.realdata
def test_species_benchmark_trains_scores_and_reports_paired_differences(tmp_path):
    if not (DATA / "labelled" / "xeno-canto-phoebe-10sp" / "labels.csv").is_file():
        pytest.skip(f"{DATA / 'labelled'} not present")
    out = tmp_path / "species"
    command = [sys.executable, str(REPO / "benchmarks" / "species.py"), "--data", str(DATA), "--out", str(out),
               "--pool-max-files", "4", "--steps", "2", "--methods", "vicreg", "--sets", "xeno-canto-phoebe-10sp",
               "--no-birdnet", "--n-bootstrap", "40", "--set", "vicreg.log_every=1",
               "--hold-out", "xeno-canto-phoebe-10sp"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "species.json").read_text())
    assert result["methods"]["vicreg"]["steps"] == 2 and result["methods"]["vicreg"]["stopped"] is None
    assert result["overrides"]["vicreg"]["log_every"] == 1            # --set reached the config
    assert (out / "vicreg" / "checkpoint.pth").is_file() and (out / "untrained_vicreg.pth").is_file()
    scored = result["sets"]["xeno-canto-phoebe-10sp"]
    assert scored["grouping"] == "recordist" and scored["n_labels"] == 10 and scored["n_recordings"] == 100
    # The held-out set's 100 recordings never reached the pool, whose store is named for it.
    pool = result["pool"]
    assert pool["held_out_sets"] == ["xeno-canto-phoebe-10sp"] and pool["n_files_held_out"] == 100
    assert scored["in_pool"] is False and pool["n_files"] == 4
    tiled = pd.read_parquet(out / "pool" / "tiles_first4_without_xeno-canto-phoebe-10sp" / "index.parquet")
    assert not tiled["relpath"].str.startswith("labelled/xeno-canto-phoebe-10sp/").any()
    vicreg = scored["methods"]["vicreg"]
    assert vicreg["pooling"] == "band"                                 # the pooling VICReg trained
    # A paired difference is the space's score minus the reference's, on the same windows.
    assert vicreg["vs_logmel"]["knn"] == pytest.approx(vicreg["knn"] - scored["logmel"]["knn"], abs=2e-4)
    assert vicreg["vs_untrained"]["knn"] == pytest.approx(vicreg["knn"] - vicreg["untrained"]["knn"], abs=2e-4)
    low, high = vicreg["vs_logmel"]["knn_interval"]
    assert low <= high and 0.0 <= vicreg["vs_logmel"]["knn_share_not_better"] <= 1.0
    assert set(vicreg["other_poolings"]) == {"mean", "cls", "band_active"}
    active = vicreg["other_poolings"]["band_active"]                   # paired against the trained pooling
    assert active["vs_trained_pooling"]["knn"] == pytest.approx(active["knn"] - vicreg["knn"], abs=2e-4)
    assert active["vs_logmel"]["knn"] == pytest.approx(active["knn"] - scored["logmel"]["knn"], abs=2e-4)

    # --compare pairs two finished runs without training; a run against itself differs by nothing.
    compare = [sys.executable, str(REPO / "benchmarks" / "species.py"), "--n-bootstrap", "40", "--compare"]
    done = subprocess.run([*compare, str(out), str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    paired = json.loads(done.stdout.strip().splitlines()[-1])
    assert paired["benchmark"] == "species_compare" and list(paired["sets"]) == ["xeno-canto-phoebe-10sp"]
    same = paired["sets"]["xeno-canto-phoebe-10sp"]["vicreg"]
    assert same["run"]["knn"] == vicreg["knn"] and same["reference_run"] == same["run"]
    assert same["difference"]["knn"] == 0 and same["difference"]["knn_interval"] == [0, 0]
    assert "27 recordists" in same["interval_method"]
    # --pooling pairs another pooling of both checkpoints: here band_active, which neither trained.
    done = subprocess.run([*compare, str(out), str(out), "--pooling", "band_active"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    active_pair = json.loads(done.stdout.strip().splitlines()[-1])["sets"]["xeno-canto-phoebe-10sp"]["vicreg"]
    assert active_pair["pooling"] == active_pair["reference_pooling"] == "band_active"
    assert active_pair["trained_pooling"] == active_pair["reference_trained_pooling"] == "band"
    assert active_pair["run"]["knn"] == active["knn"] and active_pair["difference"]["knn"] == 0
    done = subprocess.run([*compare, str(out), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"species.py: no species.json in {tmp_path}: --compare, --table and --rescore take folders this script wrote"]

    # --rescore scores the finished run again without training, on its own windows and bootstrap
    # (taken from its command), and keeps the training record: a space scored before is unchanged.
    rescore = [sys.executable, str(REPO / "benchmarks" / "species.py"), "--data", str(DATA), "--sets",
               "xeno-canto-phoebe-10sp", "--rescore", str(out)]
    done = subprocess.run(rescore, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again == json.loads((out / "species.json").read_text())
    assert again["methods"] == result["methods"] and again["command"] == result["command"]
    assert again["rescored"]["command"][-2:] == ["--rescore", str(out)] and "git_sha" in again["rescored"]
    rescored = again["sets"]["xeno-canto-phoebe-10sp"]
    assert rescored["in_pool"] is False                              # the run's held-out set stays held out
    assert rescored["methods"]["vicreg"] == vicreg and rescored["logmel"] == scored["logmel"]
    assert "40 resamples" in rescored["interval_method"]             # the run's --n-bootstrap, not the default


def _species_json(run: Path, *, knn: float, logmel_knn: float, nmi: float | None = 0.3, in_pool: bool = True) -> None:
    """A species.json as the script writes it, with one VICReg space scored on one labelled set."""
    space = {"pooling": "band", "knn": knn, "nmi": nmi, "untrained": {"knn": 0.17},
             "vs_logmel": {"knn": round(knn - logmel_knn, 4), "knn_interval": [-0.012, 0.134]}}
    run.mkdir(parents=True)
    (run / "species.json").write_text(json.dumps({
        "benchmark": "species", "methods": {"vicreg": {"steps": 12000, "stopped": None}},
        "sets": {"phoebe": {"logmel": {"knn": logmel_knn, "nmi": 0.297}, "in_pool": in_pool,
                            "methods": {"vicreg": space}}}}))


def test_compare_pooling_is_one_the_runs_scored(tmp_path):
    _species_json(tmp_path / "r12", knn=0.374, logmel_knn=0.313)
    _species_json(tmp_path / "r13", knn=0.389, logmel_knn=0.313)
    compare = [sys.executable, str(REPO / "benchmarks" / "species.py"), "--compare", str(tmp_path / "r13"),
               str(tmp_path / "r12"), "--pooling"]
    done = subprocess.run([*compare, "band_active"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"species.py: {tmp_path / 'r13'} did not score vicreg with band_active pooling on phoebe: "
        "score it with --rescore first"]
    done = subprocess.run([*compare, "band_max"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "species.py: --pooling 'band_max' is not one of mean, cls, band, band_active"]
    # Without --compare there is nothing for --pooling to choose.
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "species.py"), "--table", str(tmp_path / "r12"),
                           "--pooling", "band"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "give it with --compare" in done.stderr


def test_table_prints_finished_runs_as_markdown_and_json(tmp_path):
    _species_json(tmp_path / "r12", knn=0.374, logmel_knn=0.313)
    _species_json(tmp_path / "r13", knn=0.389, logmel_knn=0.313, nmi=None, in_pool=False)
    table = [sys.executable, str(REPO / "benchmarks" / "species.py"), "--table"]
    done = subprocess.run([*table, str(tmp_path / "r12"), str(tmp_path / "r13"), "--sets", "phoebe,acro"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    *markdown, last = done.stdout.strip().splitlines()
    assert markdown[0] == "phoebe: log-mel statistics kNN 0.313, NMI 0.297"
    assert markdown[-2] == ("| `r12` | vicreg · band | 0.374 (+0.061 [-0.01, +0.13]) | 0.300 | 0.170 "
                            "| not scored |  |  |")
    assert markdown[-1].startswith(
        "| `r13` | vicreg · band | 0.389 (+0.076 [-0.01, +0.13], held out of the pool) |  | 0.170 |")
    result = json.loads(last)
    assert result["benchmark"] == "species_table" and result["sets"] == ["phoebe", "acro"]
    assert [row["run"] for row in result["rows"]] == ["r12", "r13"] and result["logmel_differs"] == []

    # Runs whose log-mel scores differ scored different windows: the reference line says so.
    _species_json(tmp_path / "other_windows", knn=0.4, logmel_knn=0.35)
    done = subprocess.run([*table, str(tmp_path / "r12"), str(tmp_path / "other_windows")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and "scored different windows" in done.stdout.splitlines()[0]

    # A folder the script did not write is one line and exit 1, and two reports at once are refused.
    done = subprocess.run([*table, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"species.py: no species.json in {tmp_path}: --compare, --table and --rescore take folders this script wrote"]
    done = subprocess.run([*table, str(tmp_path / "r12"), "--compare", str(tmp_path / "r12"), str(tmp_path / "r13")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "give one" in done.stderr
