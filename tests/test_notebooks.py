"""The committed notebooks: clean (no outputs), parameterised for papermill, and runnable end to end."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "no numbered notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; executed copies belong in runs/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_with_run_dir(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(tagged)}"
    assert "run_dir" in tagged[0].source and "archive_dir" in tagged[0].source
    # `!cmd` never fails a notebook; subprocesses must go through subprocess.run(check=True).
    shell_escapes = [c.source for c in nb.cells if c.cell_type == "code"
                     and any(line.lstrip().startswith("!") for line in c.source.splitlines())]
    assert not shell_escapes, f"{path.name}: uses `!` shell escapes"


@pytest.mark.slow
def test_smoke_run_of_every_notebook(smoke_run: Path) -> None:
    """configs/smoke.yaml through the real driver: every notebook executes and leaves its products."""
    import json

    run_dir = smoke_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert [n["notebook"] for n in manifest["notebooks"]] == [p.stem for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        assert (run_dir / "notebooks" / path.name).is_file()
        assert (run_dir / "notebooks" / path.with_suffix(".html").name).is_file()
    assert (run_dir / "params.yaml").is_file()
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    assert "01_coverage_recorder_by_day.png" in figures and "01_coverage_recorder_by_day.pdf" in figures
    assert (run_dir / "inventory" / "files.parquet").is_file()
    # the report is the run's last step, recorded in the manifest
    assert manifest["report"]["status"] == "ok" and (run_dir / "report" / "index.html").is_file()


def _shown_outputs(notebook: dict) -> tuple[int, int]:
    """(images, figures shown as text) among an executed notebook's display outputs."""
    images = texts = 0
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if output.get("output_type") not in ("display_data", "execute_result"):
                continue
            if "image/png" in data:
                images += 1
            elif "".join(data.get("text/plain", "")).startswith("<Figure size"):
                texts += 1
    return images, texts


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_saved_figure_is_shown_as_an_image_in_its_executed_notebook_and_html(smoke_run: Path,
                                                                                  path: Path) -> None:
    """Issue 18.0: figures built without pyplot used to print `<Figure size 1260x760 with 7 Axes>`
    under papermill. Each figure a notebook saves (`NN_*.png`) is one embedded PNG in the executed
    notebook and in its HTML copy; none is shown as text, none twice (pyplot's inline backend
    would add a second copy of a pyplot figure at the end of its cell)."""
    import json

    executed = smoke_run / "notebooks" / path.name
    saved = sorted(p.name for p in (smoke_run / "figures").glob(f"{path.name[:2]}_*.png"))
    images, texts = _shown_outputs(json.loads(executed.read_text()))
    assert saved, f"{path.name} saved no figure in the smoke run"
    assert (images, texts) == (len(saved), 0), f"{path.name}: saved {saved}"
    html = executed.with_suffix(".html").read_text()
    assert html.count('src="data:image/png;base64,') == len(saved)
    assert "&lt;Figure size" not in html


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_parses_cleanly_with_papermill(path: Path, caplog) -> None:
    """papermill's own inspection (`papermill --help-notebook`) reads every parameter: the same
    names, defaults (so types) and comments as the driver's parser; nothing is dropped or misread."""
    import ast
    import logging

    import papermill

    from soundscape_ssl.pipeline.runner import read_parameters

    ours = read_parameters(path)
    with caplog.at_level(logging.WARNING):
        theirs = papermill.inspect_notebook(str(path))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert list(theirs) == list(ours)
    for name, parameter in ours.items():
        default = ast.literal_eval(theirs[name]["default"])
        assert default == parameter.default and type(default) is type(parameter.default), name
        assert theirs[name]["help"] == parameter.comment, name


def _poster_at_smoke_scale(device: str, precision: str) -> dict:
    """configs/poster.yaml with configs/smoke.yaml's sizes laid over it (its archive and every
    notebook value it sets), one process per notebook, the device switch set to `device` and
    `precision`, compile off (minutes of compiling on a CPU)."""
    import yaml

    from soundscape_ssl.core.config import merge_mappings

    poster = yaml.safe_load((REPO / "configs" / "poster.yaml").read_text())
    smoke = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    return merge_mappings(poster, {
        "description": "poster at smoke scale (tests)",
        "shared": {"n_threads": smoke["shared"]["n_threads"], "device": device, "precision": precision,
                   "compile": False},
        "synthetic_archive": smoke["synthetic_archive"],
        # DINO alone: the device switch is what is checked, and poster's VICReg trains through the
        # same settings; one method keeps the run to minutes.
        "notebooks": merge_mappings(smoke["notebooks"], {"02": {"n_processes": 1},
                                                         "03": {"nproc_per_node": 1, "num_workers": 0,
                                                                "methods": ["dino"]}}),
    })


@pytest.mark.slow
def test_poster_profile_honours_the_device_switch(tmp_path_factory) -> None:
    """configs/poster.yaml at smoke scale with `device: cpu` and `precision: bf16` through the real
    driver (notebooks 01-07): every computing notebook's manifest record says it ran on the CPU, and
    those that run the ViT (03 training, 04/06/07 embedding) in bf16, though their defaults differ;
    the log-mel front end (02), the attention maps (05) and BirdNET compute in float32."""
    import json

    import yaml

    from soundscape_ssl.pipeline.runner import run_pipeline

    profile_path = tmp_path_factory.mktemp("profiles") / "poster_cpu.yaml"
    profile_path.write_text(yaml.safe_dump(_poster_at_smoke_scale("cpu", "bf16")))
    run_dir = run_pipeline(str(profile_path), run_id="poster-cpu", repo_root=REPO,
                           runs_root=tmp_path_factory.mktemp("runs"), only=["01", "02", "03", "04", "05", "06", "07"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    compute = {record["notebook"][:2]: record["compute"] for record in manifest["notebooks"]}
    assert compute["01"] is None                                   # 01 reads headers only
    expected_steps = {"02": {"tiling"}, "03": {"dino"}, "05": {"attention dino"},
                      "04": {"embed dino", "embed untrained_dino"}, "06": {"embed dino", "birdnet"},
                      "07": {"embed dino", "birdnet"}}
    for number, steps in expected_steps.items():
        assert set(compute[number]) == steps, number
        for step, record in compute[number].items():
            assert record["device"] == "cpu", (number, step)
            float32_only = number in ("02", "05") or step == "birdnet"
            assert record["precision"] == ("fp32" if float32_only else "bf16"), (number, step)
            assert record["compile"] is False, (number, step)
    assert compute["03"]["dino"]["world_size"] == 1
    assert compute["02"]["tiling"]["tiles_written"] > 0
