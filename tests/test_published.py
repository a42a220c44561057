"""`make figures`: the published set is copied with a README table, and regenerates identically."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from soundscape_ssl.report import catalogue
from soundscape_ssl.report.published import code_commit, publish_figures, published_set

REPO = Path(__file__).resolve().parents[1]
NAMES = ("01_coverage_recorder_by_day", "05_masks_vicreg")


def _run(tmp_path: Path, status: str = "ok") -> Path:
    run = tmp_path / "runs" / "reference"
    (run / "figures").mkdir(parents=True)
    (run / "notebooks").mkdir()
    for name in (*NAMES, "02_tile_statistics"):
        (run / "figures" / f"{name}.png").write_bytes(f"png of {name}".encode())
    for stem, heading in (("01_collection_stats", "# 01 · Collection statistics\n\n**What was recorded.**"),
                          ("05_attention_heads", "# 05 · Attention heads\n\n**Which heads listen?**")):
        (run / "notebooks" / f"{stem}.ipynb").write_text(json.dumps(
            {"cells": [{"cell_type": "markdown", "source": heading.splitlines(True)}]}))
    (run / "manifest.json").write_text(json.dumps({
        "run_id": "reference", "profile": "/x/configs/demo.yaml", "status": status,
        "notebooks": [{"notebook": "01_collection_stats", "status": "ok", "wall_s": 5.0}],
        "environment": {"git_sha": "abc123", "git_dirty": False, "soundscape_ssl": "0.1.0",
                        "packages": {"torch": "2.11.0", "matplotlib": "3.11.2"}}}))
    return run


def test_the_set_is_copied_with_a_table_and_regenerates_identically(tmp_path) -> None:
    run, out = _run(tmp_path), tmp_path / "figures"
    out.mkdir()
    (out / "old_figure.png").write_bytes(b"from an earlier set")
    readme = publish_figures(run, out, names=NAMES)
    assert sorted(p.name for p in out.iterdir()) == ["01_coverage_recorder_by_day.png", "05_masks_vicreg.png",
                                                     "README.md"]
    assert (out / "05_masks_vicreg.png").read_bytes() == b"png of 05_masks_vicreg"
    text = readme.read_text()
    masks = catalogue.entry_for("05_masks_vicreg")
    assert (f"| [05_masks_vicreg](05_masks_vicreg.png) | {masks.question} | {masks.caption} | "
            "05 · Attention heads |") in text
    assert "run `reference` of profile `demo` from the code at git commit\n`abc123` (clean tree" in text
    first = published_set(out)
    publish_figures(run, out, names=NAMES)
    assert published_set(out) == first                      # same run, same files


def test_an_unfinished_or_incomplete_run_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="did not finish"):
        publish_figures(_run(tmp_path / "a", status="failed"), tmp_path / "out", names=NAMES)
    with pytest.raises(FileNotFoundError, match="07_knn_accuracy"):
        publish_figures(_run(tmp_path / "b"), tmp_path / "out", names=(*NAMES, "07_knn_accuracy"))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_recorded_commit_is_the_codes_not_the_figures(tmp_path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "code")
    code = git("rev-parse", "HEAD")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    git("add", "figures")
    git("commit", "-q", "-m", "the published set")
    assert code_commit(tmp_path, git("rev-parse", "HEAD")) == code
    assert code_commit(tmp_path / "not-a-repo", "abc") == "abc"


def test_the_committed_set_matches_its_readme() -> None:
    """figures/ holds exactly the published set, under 10 MB, each listed in its README."""
    folder = REPO / "figures"
    if not (folder / "README.md").is_file():
        pytest.skip("figures/ has not been published yet (make figures)")
    names = sorted(p.stem for p in folder.glob("*.png"))
    assert names == sorted(catalogue.PUBLISHED)
    assert sum((folder / f"{name}.png").stat().st_size for name in names) < 10e6
    readme = (folder / "README.md").read_text()
    for name in names:
        assert f"[{name}]({name}.png)" in readme
