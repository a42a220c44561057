"""The papermill driver: profile resolution, notebook selection, manifest, failure reporting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from soundscape_ssl.core.config import ConfigError
from soundscape_ssl.pipeline import runner as pipeline

REPO = Path(__file__).resolve().parents[1]


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
    notebooks = pipeline.list_notebooks(toy_repo)
    checked = pipeline.check_profile(profile, notebooks)
    first, third = notebooks[0], notebooks[2]
    run_dir, archive = Path("/r"), Path("/a")
    assert pipeline.notebook_parameters(checked, first, run_dir, archive)["value"] == 11
    params = pipeline.notebook_parameters(checked, third, run_dir, archive)
    assert params == {"value": 7, "run_dir": "/r", "archive_dir": "/a"}


def test_unknown_profile_and_keys_are_clear_errors(toy_repo: Path) -> None:
    with pytest.raises(FileNotFoundError, match="available: \\['toy'\\]"):
        pipeline.load_profile("nope", toy_repo)
    (toy_repo / "configs" / "bad.yaml").write_text("shard: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'shard' in profile .*bad.yaml: did you mean 'shared'?"):
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


# -- the profile check: every key a parameter of its notebook, every value data of its type ---------


def _parameters_notebook(path: Path, source: str) -> Path:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


@pytest.fixture()
def study(tmp_path: Path) -> list[Path]:
    """Two notebooks shaped like the study's: shared parameters, own ones, a nested config."""
    first = _parameters_notebook(tmp_path / "01_first.ipynb", (
        'run_dir = "runs/dev"   # set by the driver\narchive_dir = ""\nn_threads = 2   # threads\n'
        'seed = 0\nsites_csv = ""'))
    third = _parameters_notebook(tmp_path / "03_pretrain.ipynb", (
        'run_dir = "runs/dev"\narchive_dir = ""\nn_threads = 2\nseed = 0\nmethods = ["dino", "mae"]\n'
        'base_lr = 5e-4\ncompile = False\nmethod_overrides = {}   # per-method TrainConfig fields\n'
        'extra = None'))
    return [first, third]


def test_parameters_cell_is_parsed_with_names_defaults_types_and_comments() -> None:
    params = pipeline.parse_parameters_cell(
        'a = 1  # one: the first\nb: float = 2.0\nc = "x"  # a "quoted" word\nd = [1, 2]\ne = {}\n'
        'f = None\ng = True\nh = ["x", 1]\ni = [\n    1,\n    2,\n]  # spread over lines')
    assert {n: p.default for n, p in params.items()} == {"a": 1, "b": 2.0, "c": "x", "d": [1, 2], "e": {},
                                                        "f": None, "g": True, "h": ["x", 1], "i": [1, 2]}
    assert {n: p.annotation for n, p in params.items()} == {
        "a": int, "b": float, "c": str, "d": list[int], "e": dict[str, Any], "f": Any, "g": bool, "h": list,
        "i": list[int]}
    assert params["a"].comment == "one: the first" and params["c"].comment == 'a "quoted" word'
    assert params["i"].comment == "spread over lines" and params["b"].comment == ""
    with pytest.raises(ValueError, match="line 2 of the parameters cell is not `name = value`"):
        pipeline.parse_parameters_cell("a = 1\nimport os")
    with pytest.raises(ValueError, match="the default of a \\(line 1\\) is not a literal"):
        pipeline.parse_parameters_cell("a = len('x')")


def test_profile_values_are_checked_converted_and_shared_keys_go_where_defined(study: list[Path]) -> None:
    profile = {"shared": {"archive_dir": "synthetic", "n_threads": 4, "sites_csv": "sites.csv"},
               "notebooks": {"03": {"base_lr": 1, "method_overrides": {"mae": {"epochs": 2}}},
                             "01_first": {"seed": 5}}}
    checked = pipeline.check_profile(profile, study)
    assert checked["01_first"] == {"n_threads": 4, "sites_csv": "sites.csv", "seed": 5}
    assert checked["03_pretrain"] == {"n_threads": 4, "base_lr": 1.0, "method_overrides": {"mae": {"epochs": 2}}}
    assert isinstance(checked["03_pretrain"]["base_lr"], float)  # the notebook gets its default's type


@pytest.mark.parametrize("profile, message", [
    ({"notebooks": {"01": {"n_thredas": 3}}},
     "unknown key 'n_thredas' in notebooks.01 (parameters of 01_first): did you mean 'n_threads'?"),
    ({"notebooks": {"3": {"seed": 1}}},
     "unknown notebook section '3' in notebooks: did you mean '03'? valid notebook sections: 01, 03"),
    ({"notebooks": {3: {"seed": 1}}}, "unknown notebook section 3 in notebooks"),
    ({"shared": {"n_thredas": 3}},
     "unknown key 'n_thredas' in shared (the parameters of every notebook): did you mean 'n_threads'?"),
    ({"notebooks": {"01": {"_ = open('/tmp/x','w').write('x'); y": 1}}},
     "unknown key \"_ = open('/tmp/x','w').write('x'); y\" in notebooks.01"),
    ({"notebooks": {"03": {"base_lr": "fast"}}},
     "wrong type for key 'base_lr' in notebooks.03: expected float, got 'fast'"),
    ({"notebooks": {"03": {"methods": ["dino", 3]}}},
     "wrong type for key 'methods[1]' in notebooks.03: expected str, got 3"),
    ({"notebooks": {"03": {"compile": "yes"}}},
     "wrong type for key 'compile' in notebooks.03: expected true or false, got 'yes'"),
    ({"notebooks": {"03": {"method_overrides": {"dino": {"dino": {"teacher_momentun": 0.9}}}}}},
     "unknown key 'teacher_momentun' in notebooks.03.method_overrides.dino.dino: did you mean 'teacher_momentum'?"),
    ({"notebooks": {"03": {"method_overrides": {"byol": {}}}}},
     "unknown key 'byol' in notebooks.03.method_overrides; valid keys: dino, mae, vicreg"),
    ({"notebooks": {"01": {"run_dir": "/elsewhere"}}}, "notebooks.01.run_dir is set by the driver"),
    ({"notebooks": {"01": {"archive_dir": "/a"}}}, "notebooks.01.archive_dir is set by the driver; give "
                                                   "archive_dir in shared"),
    ({"shared": {"archive_dir": 3}}, "wrong type for key 'archive_dir' in shared: expected str"),
    ({"synthetic_archive": {"dayz": 2}}, "unknown key 'dayz' in synthetic_archive: did you mean 'days'?"),
    ({"notebooks": {"01": {"seed": "2024-05-24"}}}, "wrong type for key 'seed' in notebooks.01: expected int"),
    ({"notebooks": ["01"]}, "notebooks must be a mapping, got ['01']"),
    ({"notebooks": {"01": ["seed"]}}, "notebooks.01 must be a mapping of parameters, got ['seed']"),
])
def test_profile_problems_are_named(study: list[Path], profile: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pipeline.check_profile(profile, study, "profile p.yaml")
    assert str(caught.value).startswith("profile p.yaml: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_problem_of_a_profile_is_reported_at_once(study: list[Path]) -> None:
    profile = {"shared": {"n_threads": "2"}, "notebooks": {"01": {"sed": 1}, "03": {"compile": 1}}}
    with pytest.raises(ConfigError) as caught:
        pipeline.check_profile(profile, study)
    assert len(caught.value.problems) == 3  # the shared key once, though two notebooks define it


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_committed_profile_passes_the_check(profile: str) -> None:
    data, path = pipeline.load_profile(profile, REPO)
    checked = pipeline.check_profile(data, pipeline.list_notebooks(REPO), str(path))
    assert set(checked) == {p.stem for p in pipeline.list_notebooks(REPO)}


def test_a_misspelled_profile_key_stops_the_run_before_any_notebook(toy_repo: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """issue 13, done when: the run stops before any notebook, naming the key and the close match."""
    (toy_repo / "configs" / "typo.yaml").write_text(yaml.safe_dump({"notebooks": {"03": {"valeu": 2}}}))
    executed: list[str] = []
    monkeypatch.setattr(pipeline, "execute_notebook", lambda notebook, *a, **k: executed.append(notebook.stem))
    with pytest.raises(ConfigError, match="unknown key 'valeu' in notebooks.03 \\(parameters of 03_third\\): "
                                          "did you mean 'value'\\?"):
        pipeline.run_pipeline("typo", run_id="r", repo_root=toy_repo, runs_root=tmp_path / "runs")
    assert executed == [] and not (tmp_path / "runs").exists()  # nothing ran, nothing was created


COMPUTING = ("02", "03", "04", "05", "06", "07")     # the notebooks that compute with torch
RUNS_THE_VIT = ("03", "04", "06", "07")              # those that also take precision and compile


def test_the_poster_device_switch_reaches_every_notebook_that_computes() -> None:
    """`shared.device` (with precision and compile) in configs/poster.yaml is a parameter of each
    notebook it must reach, so it arrives there as `cuda`; a notebook's own section overrides it."""
    data, path = pipeline.load_profile("poster", REPO)
    notebooks = pipeline.list_notebooks(REPO)
    checked = {stem[:2]: values for stem, values in pipeline.check_profile(data, notebooks, str(path)).items()}
    for number in COMPUTING:
        assert checked[number]["device"] == "cuda", number
    for number in RUNS_THE_VIT:
        assert (checked[number]["precision"], checked[number]["compile"]) == ("auto", True), number
    overridden = {**data, "notebooks": {**data["notebooks"], "05": {"device": "cpu"}}}
    checked = pipeline.check_profile(overridden, notebooks, str(path))
    assert [values["device"] for stem, values in checked.items() if stem[:2] in COMPUTING] == \
        ["cuda", "cuda", "cuda", "cpu", "cuda", "cuda"]


def test_the_manifest_records_what_each_notebook_computed_on(toy_repo: Path, tmp_path: Path) -> None:
    """A notebook's `record_compute` calls reach its manifest record; an earlier attempt's record of
    a notebook is not carried into a rerun that records nothing."""
    notebook = toy_repo / "notebooks" / "03_third.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "from soundscape_ssl.core import provenance\n"
        "if value == 7:\n"
        "    provenance.record_compute(run_dir, '03', 'step', device='cuda:3', precision='bf16', compile=True)"))
    nbformat.write(nb, notebook)
    run_dir = pipeline.run_pipeline("toy", run_id="r", repo_root=toy_repo, runs_root=tmp_path / "runs",
                                    only=["03"])
    record = json.loads((run_dir / "manifest.json").read_text())["notebooks"][-1]
    assert record["compute"] == {"step": {"device": "cuda", "precision": "bf16", "compile": True}}
    toy = yaml.safe_load((toy_repo / "configs" / "toy.yaml").read_text())
    (toy_repo / "configs" / "two.yaml").write_text(yaml.safe_dump({**toy, "notebooks": {"03": {"value": 2}}}))
    run_dir = pipeline.run_pipeline("two", run_id="r", repo_root=toy_repo, runs_root=tmp_path / "runs",
                                    only=["03"])
    assert json.loads((run_dir / "manifest.json").read_text())["notebooks"][-1]["compute"] is None
