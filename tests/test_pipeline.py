"""The papermill driver: profile resolution, notebook selection, manifest, failure reporting."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from soundscape_ssl.pipeline import runner as pipeline


def _notebook(path: Path, *sources: str) -> None:
    cells = [nbformat.v4.new_code_cell("run_dir = ''\narchive_dir = ''\nvalue = 1")]
    cells[0].metadata["tags"] = ["parameters"]
    cells += [nbformat.v4.new_code_cell(src) for src in sources]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "configs").mkdir()
    archive = tmp_path / "archive"
    archive.mkdir()
    _notebook(repo / "notebooks" / "01_first.ipynb",
              "from pathlib import Path\nPath(run_dir, 'first.txt').write_text(str(value))")
    _notebook(repo / "notebooks" / "02_second.ipynb", "x = 1", "raise ValueError('planted failure')")
    _notebook(repo / "notebooks" / "03_third.ipynb", "y = 2")
    profile = {"shared": {"archive_dir": str(archive), "value": 7},
               "notebooks": {"01": {"value": 11}}}
    (repo / "configs" / "toy.yaml").write_text(yaml.safe_dump(profile))
    return repo


def test_select_notebooks_only_and_from(toy_repo: Path) -> None:
    notebooks = pipeline.list_notebooks(toy_repo)
    assert [p.stem for p in notebooks] == ["01_first", "02_second", "03_third"]
    assert [p.stem for p in pipeline.select_notebooks(notebooks, start_from="02")] == ["02_second", "03_third"]
    assert [p.stem for p in pipeline.select_notebooks(notebooks, only=["01", "03_third"])] == ["01_first", "03_third"]
    with pytest.raises(ValueError, match="names no notebook"):
        pipeline.select_notebooks(notebooks, only=["09"])


def test_section_overrides_shared(toy_repo: Path) -> None:
    profile, _ = pipeline.load_profile("toy", toy_repo)
    first, third = pipeline.list_notebooks(toy_repo)[0], pipeline.list_notebooks(toy_repo)[2]
    run_dir, archive = Path("/r"), Path("/a")
    assert pipeline.notebook_parameters(profile, first, run_dir, archive)["value"] == 11
    params = pipeline.notebook_parameters(profile, third, run_dir, archive)
    assert params["value"] == 7 and params["run_dir"] == "/r" and params["archive_dir"] == "/a"


def test_unknown_profile_and_keys_are_clear_errors(toy_repo: Path) -> None:
    with pytest.raises(FileNotFoundError, match="available: \\['toy'\\]"):
        pipeline.load_profile("nope", toy_repo)
    (toy_repo / "configs" / "bad.yaml").write_text("shard: {}\n")
    with pytest.raises(ValueError, match="unknown top-level keys"):
        pipeline.load_profile("bad", toy_repo)


@pytest.mark.slow
def test_failing_notebook_names_the_cell_and_keeps_partial_output(toy_repo: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(pipeline.NotebookFailed) as caught:
        pipeline.run_pipeline("toy", run_id="r1", repo_root=toy_repo, runs_root=runs)
    error = caught.value
    assert error.notebook == "02_second"
    assert "planted failure" in str(error)
    run_dir = runs / "r1"
    # parameters, injected parameters, `x = 1`, then the failing cell
    assert (error.cell_index, error.exec_count) == (3, 4)
    assert error.cell_source == "raise ValueError('planted failure')"
    assert "the cell starts: raise ValueError" in str(error)
    partial = nbformat.read(run_dir / "notebooks" / "02_second.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" for c in partial.cells for o in c.get("outputs", []))
    assert (run_dir / "first.txt").read_text() == "11"           # 01 ran with its own section's value
    assert (run_dir / "notebooks" / "01_first.html").is_file()
    assert not (run_dir / "notebooks" / "03_third.ipynb").exists()  # nothing runs after a failure
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [(n["notebook"], n["status"]) for n in manifest["notebooks"]] == [("01_first", "ok"), ("02_second", "failed")]
    assert manifest["notebooks"][1]["failed_cell"] == error.cell_index
    assert "torch" in manifest["environment"]["packages"]
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params["notebooks"]["03_third"]["value"] == 7

    # A rerun of one notebook into the same run keeps the earlier records.
    pipeline.run_pipeline("toy", run_id="r1", only=["03"], repo_root=toy_repo, runs_root=runs)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert [n["notebook"] for n in manifest["notebooks"]] == ["01_first", "02_second", "03_third"]


def test_cli_exit_code_names_notebook(toy_repo: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from soundscape_ssl.pipeline import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "execute_notebook", _fail_in_cell_3)
    code = cli.main(["run", "--profile", "toy", "--run-id", "r2", "--repo-root", str(toy_repo), "--only", "01"])
    assert code == 1
    assert "notebook 01_first failed in cell 3" in capsys.readouterr().err


def _fail_in_cell_3(notebook: Path, output_path: Path, parameters: dict, cwd: Path) -> None:
    raise pipeline.NotebookFailed(notebook.stem, 3, "RuntimeError: boom", output_path)
