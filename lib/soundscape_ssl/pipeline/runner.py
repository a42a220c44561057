"""The pipeline driver: execute the numbered notebooks with papermill into `runs/<run_id>/`.

A profile (`configs/<name>.yaml`) holds `shared` parameters given to every notebook that defines
them and one section per notebook (keyed by its number, `"01"`, or its full stem) that overrides
them. Before anything runs, `check_profile` checks the whole profile as data: every key must be a
parameter of its notebook's `parameters` cell (a `shared` key of at least one notebook), every
value must have the type of that parameter's default, `synthetic_archive` must be `SynthConfig`
fields, and parameters that become stage configs inside a notebook (notebook 03's
`method_overrides`) are checked as those configs, all through the one config path
(`core.config`). A misspelled key, an unknown section or a value that is not data stops the run
with one line that names it; profile keys and values never reach a notebook as code.

The driver then prepares the archive (generating and caching the synthetic one when
`archive_dir` is `synthetic`), writes `params.yaml` and `manifest.json`, and runs each notebook
with papermill into `runs/<run_id>/notebooks/` plus an HTML copy; each notebook's record in the
manifest holds `compute`, what its steps ran on as the notebook recorded it (device type,
precision, compile: `core.provenance.record_compute`). A failing notebook stops the
run with a non-zero exit that names the notebook and the cell; the partially executed notebook
stays for inspection. Last, whatever the notebooks' outcome, it writes the run's report
(`runs/<run_id>/report/index.html`, `report.site`) and records it in the manifest.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import tokenize
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..core.cli import UsageError
from ..core.config import ConfigError, config_from_mapping, unknown_key_message
from ..core.provenance import compute_path, environment_report, read_compute, to_jsonable
from ..core.stage import atomic_write_text

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")
PROFILE_KEYS = ("description", "shared", "synthetic_archive", "notebooks")
# Parameters the driver sets for every notebook: `run_dir` always; `archive_dir` from the
# `shared` section's value (a folder, or `synthetic`) resolved once for all notebooks.
RUN_DIR, ARCHIVE_DIR = "run_dir", "archive_dir"


def _check_method_overrides(value: Any, section: str) -> None:
    from ..pretrain.launch import check_method_overrides

    check_method_overrides(value, section)


# Notebook parameters whose value becomes a stage config inside the notebook: checked as that
# config before any notebook runs (name -> check(value, section), raising ConfigError).
NESTED_CONFIG_CHECKS: dict[str, Callable[[Any, str], None]] = {"method_overrides": _check_method_overrides}


class NotebookFailed(RuntimeError):
    """A notebook raised; carries which notebook and which cell, for the exit message.

    `cell_index` counts the code and markdown cells of the executed notebook as papermill wrote
    it (the injected-parameters cell included, papermill's error banner excluded); `exec_count`
    is the `In [N]` a reader sees in JupyterLab or the HTML copy.
    """

    def __init__(self, notebook: str, cell_index: int | None, error: str, output_path: Path,
                 exec_count: int | None = None, cell_source: str = ""):
        self.notebook, self.cell_index, self.error, self.output_path = notebook, cell_index, error, output_path
        self.exec_count, self.cell_source = exec_count, cell_source
        where = f"cell {cell_index}" if cell_index is not None else "an unknown cell"
        if exec_count is not None:
            where += f" (In [{exec_count}])"
        first_line = cell_source.strip().splitlines()[0] if cell_source.strip() else ""
        super().__init__(f"notebook {notebook} failed in {where}: {error}\n"
                         + (f"  the cell starts: {first_line}\n" if first_line else "")
                         + f"  the partially executed notebook is at {output_path}")


def find_repo_root(start: Path | None = None) -> Path:
    """The folder holding `notebooks/` and `configs/`: from `start`, the cwd, or the package's checkout."""
    candidates = [start] if start else [Path.cwd(), Path(__file__).resolve().parents[2]]
    for candidate in candidates:
        for folder in [candidate, *candidate.parents]:
            if (folder / "notebooks").is_dir() and (folder / "configs").is_dir():
                return folder
    raise FileNotFoundError("no folder with notebooks/ and configs/ found above "
                            f"{', '.join(str(c) for c in candidates)}; pass --repo-root")


def load_profile(profile: str, repo_root: Path) -> tuple[dict[str, Any], Path]:
    """A profile by name (`demo` → configs/demo.yaml) or by path; safe YAML only."""
    path = Path(profile)
    if not path.suffix:
        path = repo_root / "configs" / f"{profile}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (repo_root / "configs").glob("*.yaml"))
        raise FileNotFoundError(f"profile {profile!r} not found at {path}; available: {available}")
    try:
        with path.open() as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError([f"profile {path} is not valid YAML: {' '.join(str(error).split())}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"profile {path} must be a mapping, got {type(data).__name__}"])
    unknown = [key for key in data if key not in PROFILE_KEYS]
    if unknown:
        raise ConfigError([unknown_key_message(key, PROFILE_KEYS, f"profile {path}") for key in unknown])
    return data, path


@dataclasses.dataclass(frozen=True)
class NotebookParameter:
    """One assignment of a notebook's `parameters` cell: `name = default  # comment`."""

    name: str
    default: Any
    annotation: Any  # the type a profile value must have: that of the default (see `_annotation_of`)
    comment: str
    line: int


def read_parameters(notebook: Path) -> dict[str, NotebookParameter]:
    """The parameters of `notebook`: the assignments of its one cell tagged `parameters`."""
    import nbformat

    cells = [cell for cell in nbformat.read(notebook, as_version=4).cells
             if "parameters" in cell.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook.name}: expected one cell tagged 'parameters', found {len(cells)}")
    return parse_parameters_cell(cells[0].source, notebook.name)


def parse_parameters_cell(source: str, where: str = "parameters cell") -> dict[str, NotebookParameter]:
    """Parse a parameters cell: only `name = literal` (or `name: type = literal`) statements, each
    with an optional comment on its last line. Anything else is a ValueError naming the line."""
    try:
        tree = ast.parse(source)
        comments = {token.start[0]: token.string.lstrip("#").strip()
                    for token in tokenize.generate_tokens(io.StringIO(source).readline)
                    if token.type == tokenize.COMMENT}
    except (SyntaxError, tokenize.TokenError) as error:
        raise ValueError(f"{where}: the parameters cell is not valid Python: {error}") from None
    parameters: dict[str, NotebookParameter] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name = node.target.id
        else:
            raise ValueError(f"{where}: line {node.lineno} of the parameters cell is not `name = value`")
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{where}: the default of {name} (line {node.lineno}) is not a literal") from None
        parameters[name] = NotebookParameter(name, default, _annotation_of(default),
                                             comments.get(node.end_lineno, ""), node.lineno)
    return parameters


def _annotation_of(default: Any) -> Any:
    """The type a profile value of a parameter must have, from its default: bool, int, float
    (an int is accepted), str, a list (of the default's one element type, if it has one),
    a mapping; anything when the default is None."""
    for kind in (bool, int, float, str):
        if type(default) is kind:
            return kind
    if isinstance(default, (list, tuple)):
        kinds = {type(item) for item in default}
        return list[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float, str) else list
    if isinstance(default, dict):
        return dict[str, Any]
    return Any


def _parameters_class(notebook: Path, parameters: dict[str, NotebookParameter]) -> type:
    """A dataclass whose fields are the notebook's parameters (so the one converter checks them)."""
    fields = [(p.name, p.annotation, dataclasses.field(default_factory=lambda p=p: p.default))
              for p in parameters.values()]
    return dataclasses.make_dataclass(f"Parameters_{notebook.stem}", fields, frozen=True)


def check_profile(profile: Mapping[str, Any], notebooks: list[Path],
                  where: str = "profile") -> dict[str, dict[str, Any]]:
    """Check the whole profile against the notebooks' parameters cells before anything runs.

    Returns {notebook stem: the parameters the profile sets for it (the `shared` keys it defines,
    then its own section), converted to its parameters' types}. Raises ConfigError naming every
    unknown key (with the close match), unknown section, wrong type or bad nested config; `where`
    (e.g. the profile's path) starts the message.
    """
    problems: list[str] = []
    description = profile.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(f"description must be text, got {description!r}")
    shared = _section_mapping(profile, "shared", problems)
    sections = _section_mapping(profile, "notebooks", problems)
    synthetic = _section_mapping(profile, "synthetic_archive", problems)
    if synthetic:
        from ..recordings.synth import SynthConfig

        _collect(problems, config_from_mapping, SynthConfig, synthetic, "synthetic_archive")

    parameters = {notebook: read_parameters(notebook) for notebook in notebooks}
    problems += _shared_problems(shared, parameters)
    by_name = {name: notebook for notebook in notebooks for name in (notebook.name[:2], notebook.stem)}
    for key, values in sections.items():
        if str(key) not in by_name:
            problems.append(unknown_key_message(key, [n.name[:2] for n in notebooks], "notebooks",
                                                what="notebook section"))
        elif values is not None and not isinstance(values, Mapping):
            problems.append(f"notebooks.{key} must be a mapping of parameters, got {values!r}")

    checked: dict[str, dict[str, Any]] = {}
    for notebook, params in parameters.items():
        parts = [("shared", {k: v for k, v in shared.items() if k in params and k not in (RUN_DIR, ARCHIVE_DIR)})]
        parts += [(f"notebooks.{key}", dict(values or {})) for key, values in sections.items()
                  if by_name.get(str(key)) == notebook and isinstance(values or {}, Mapping)]
        checked[notebook.stem] = {}
        for section, values in parts:
            checked[notebook.stem].update(_checked_values(notebook, params, section, values, problems))
    if problems:  # a shared key is checked once per notebook that defines it: say it once
        problems = list(dict.fromkeys(problems))
        raise ConfigError([f"{where}: {problems[0]}", *problems[1:]])
    return checked


def _section_mapping(profile: Mapping[str, Any], key: str, problems: list[str]) -> dict[Any, Any]:
    value = profile.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{key} must be a mapping, got {value!r}")
        return {}
    return dict(value)


def _collect(problems: list[str], check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)`, with a ConfigError's problems added to `problems` (then None)."""
    try:
        return check(*args)
    except ConfigError as error:
        problems.extend(error.problems)
        return None


def _shared_problems(shared: Mapping[str, Any], parameters: Mapping[Path, dict[str, NotebookParameter]]) -> list[str]:
    """A `shared` key must be a parameter of at least one notebook (of the study, not only of the
    selected ones: `--only` must not make a sound profile wrong); archive_dir is the driver's."""
    every = sorted({name for params in parameters.values() for name in params} - {RUN_DIR})
    problems = []
    for key, value in shared.items():
        if key == RUN_DIR:
            problems.append(f"shared.{RUN_DIR} is set by the driver (runs/<run_id>); leave it out")
        elif key == ARCHIVE_DIR and not isinstance(value, str):
            problems.append(f"wrong type for key {ARCHIVE_DIR!r} in shared: expected str (a folder or "
                            f"{SYNTHETIC!r}), got {value!r}")
        elif key not in every:
            problems.append(unknown_key_message(key, every, "shared (the parameters of every notebook)"))
    return problems


def _checked_values(notebook: Path, params: dict[str, NotebookParameter], section: str,
                    values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The values of one profile section for `notebook`, converted to its parameters' types."""
    for key in [k for k in values if k in (RUN_DIR, ARCHIVE_DIR)]:
        problems.append(f"{section}.{key} is set by the driver"
                        + (f"; give {ARCHIVE_DIR} in shared" if key == ARCHIVE_DIR else "; leave it out"))
        del values[key]
    valid = [name for name in params if name not in (RUN_DIR, ARCHIVE_DIR)]
    for key in [k for k in values if k not in params]:
        problems.append(unknown_key_message(key, valid, f"{section} (parameters of {notebook.stem})"))
        del values[key]
    for name in [k for k in values if k in NESTED_CONFIG_CHECKS]:
        _collect(problems, NESTED_CONFIG_CHECKS[name], values[name], f"{section}.{name}")
    converted = _collect(problems, config_from_mapping, _parameters_class(notebook, params), values, section)
    if converted is None:
        return {}
    return {name: to_jsonable(getattr(converted, name)) for name in values}


def list_notebooks(repo_root: Path) -> list[Path]:
    notebooks = sorted(p for p in (repo_root / "notebooks").glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks in {repo_root / 'notebooks'}")
    return notebooks


def select_notebooks(notebooks: list[Path], only: list[str] | None = None,
                     start_from: str | None = None) -> list[Path]:
    """Filter by `--only 01 03` and/or `--from 02` (numbers or full stems)."""
    def number(p: Path) -> str:
        return p.name[:2]

    def matches(p: Path, key: str) -> bool:
        return key in (number(p), p.stem, p.name)

    selected = notebooks
    if start_from:
        starts = [i for i, p in enumerate(notebooks) if matches(p, start_from)]
        if not starts:
            raise UsageError(f"--from {start_from!r} names no notebook; have {[p.stem for p in notebooks]}")
        selected = notebooks[starts[0]:]
    if only:
        missing = [key for key in only if not any(matches(p, key) for p in notebooks)]
        if missing:
            raise UsageError(f"--only {missing} names no notebook; have {[p.stem for p in notebooks]}")
        selected = [p for p in selected if any(matches(p, key) for key in only)]
    return selected


def profile_parameters(profile: str, notebook: str, repo_root: Path | None = None) -> dict[str, Any]:
    """Every parameter of one notebook (its number, e.g. "03", or stem) as a profile sets it: the
    parameters cell's defaults, then the profile's checked values (`check_profile`). Scripts that
    do a notebook's work outside papermill (`benchmarks/species.py`) read a recipe this way."""
    repo_root = find_repo_root(repo_root)
    data, path = load_profile(profile, repo_root)
    notebooks = list_notebooks(repo_root)
    matches = [p for p in notebooks if notebook in (p.name[:2], p.stem)]
    if not matches:
        raise ValueError(f"no notebook {notebook!r}; have {[p.stem for p in notebooks]}")
    checked = check_profile(data, notebooks, where=str(path))
    defaults = {name: parameter.default for name, parameter in read_parameters(matches[0]).items()}
    return {**defaults, **checked.get(matches[0].stem, {})}


def notebook_parameters(checked: Mapping[str, dict[str, Any]], notebook: Path, run_dir: Path,
                        archive_dir: Path) -> dict[str, Any]:
    """What papermill gives `notebook`: its checked profile values (`check_profile`), then the
    run's paths."""
    return {**checked.get(notebook.stem, {}), RUN_DIR: str(run_dir), ARCHIVE_DIR: str(archive_dir)}


def synthetic_archive_dir(synth_fields: dict[str, Any], cache_root: Path) -> Path:
    """The cache folder of a synthetic archive: named by a hash of its resolved config."""
    from ..recordings.synth import GENERATOR_VERSION, SynthConfig

    config = config_from_mapping(SynthConfig, synth_fields, "synthetic_archive")
    # `workers` changes speed, not content, so it stays out of the cache key; the generator's
    # version goes in, so a changed generator never reuses an archive made by an older one.
    content = {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"}
    content["generator_version"] = GENERATOR_VERSION
    digest = hashlib.sha256(json.dumps(to_jsonable(content), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root / f"synth-{digest}"


def prepare_archive(profile: dict[str, Any], runs_root: Path, repo_root: Path) -> Path:
    """The archive the notebooks read: the profile's folder (relative paths from the repository
    root), or the cached synthetic archive."""
    archive = str((profile.get("shared") or {}).get("archive_dir") or SYNTHETIC)
    if archive != SYNTHETIC:
        path = (repo_root / Path(archive).expanduser()).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"archive_dir {path} is not a folder")
        return path
    from ..recordings.synth import SynthConfig, generate_archive

    fields = dict(profile.get("synthetic_archive") or {})
    out_dir = synthetic_archive_dir(fields, runs_root / "_cache")
    marker = out_dir / ".complete"
    if marker.is_file():
        log.info("reusing the cached synthetic archive %s", out_dir)
        return out_dir
    if out_dir.exists():  # an interrupted generation: start that archive again from scratch
        shutil.rmtree(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    log.info("generating the synthetic archive into %s", out_dir)
    generate_archive(tmp_dir, config_from_mapping(SynthConfig, fields, "synthetic_archive"))
    tmp_dir.rename(out_dir)
    atomic_write_text(marker, dt.datetime.now().isoformat() + "\n")
    return out_dir


def default_run_id(profile_path: Path) -> str:
    return f"{profile_path.stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(payload), indent=2) + "\n")


def export_html(notebook_path: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook_path, as_version=4))
    html_path = notebook_path.with_suffix(".html")
    atomic_write_text(html_path, body)
    return html_path


def execute_notebook(notebook: Path, output_path: Path, parameters: dict[str, Any], cwd: Path) -> None:
    """Run one notebook with papermill; raise NotebookFailed naming the cell on any error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(notebook), str(output_path), parameters=parameters, cwd=str(cwd),
            kernel_name="python3", progress_bar=False, log_output=False, request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as error:
        raise NotebookFailed(notebook.stem, error.cell_index, f"{error.ename}: {error.evalue}", output_path,
                             exec_count=error.exec_count, cell_source=_failed_cell_source(output_path)) from None


def _failed_cell_source(output_path: Path) -> str:
    """The source of the cell whose outputs hold the error, read back from the partial notebook."""
    import nbformat

    try:
        executed = nbformat.read(output_path, as_version=4)
    except Exception:  # an unreadable partial notebook must not mask the real failure
        return ""
    for cell in executed.cells:
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return cell.source
    return ""


def run_pipeline(profile: str = "demo", run_id: str | None = None, only: list[str] | None = None,
                 start_from: str | None = None, repo_root: Path | None = None,
                 runs_root: Path | None = None) -> Path:
    """Resolve the profile, prepare the archive and execute the selected notebooks in order.

    Returns the run folder. Rerunning with the same `run_id` reuses the folder, so later notebooks
    can be rerun (`--from 03`) against the products of earlier ones.
    """
    repo_root = find_repo_root(repo_root)
    profile_data, profile_path = load_profile(profile, repo_root)
    notebooks = list_notebooks(repo_root)
    # The whole profile is checked before anything is created or run.
    checked = check_profile(profile_data, notebooks, f"profile {profile_path}")
    selected = select_notebooks(notebooks, only=only, start_from=start_from)
    runs_root = (runs_root or repo_root / "runs").resolve()
    run_id = run_id or default_run_id(profile_path)
    run_dir = runs_root / run_id
    notebooks_out = run_dir / "notebooks"
    notebooks_out.mkdir(parents=True, exist_ok=True)

    manifest_path = run_dir / "manifest.json"
    manifest: dict[str, Any] = {
        "run_id": run_id,
        "profile": str(profile_path),
        "command": sys.argv,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "finished": None,
        "status": "running",
        "environment": environment_report(repo_root),
        "notebooks": [],
    }
    if manifest_path.is_file():  # a rerun into the same folder keeps the earlier notebooks' records
        previous = json.loads(manifest_path.read_text())
        rerun = {p.stem for p in selected}
        manifest["notebooks"] = [n for n in previous.get("notebooks", []) if n.get("notebook") not in rerun]
    _write_json(manifest_path, manifest)

    # Progress bars in batch logs: a line every 10 s rather than every 0.1 s (tqdm reads TQDM_*).
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    t0 = time.perf_counter()
    archive_dir = prepare_archive(profile_data, runs_root, repo_root)
    manifest["archive_dir"] = str(archive_dir)
    manifest["archive_prepare_s"] = round(time.perf_counter() - t0, 2)

    resolved = {
        "profile": str(profile_path),
        "run_id": run_id,
        "run_dir": str(run_dir),
        "archive_dir": str(archive_dir),
        "synthetic_archive": profile_data.get("synthetic_archive") or {},
        "notebooks": {p.stem: notebook_parameters(checked, p, run_dir, archive_dir) for p in selected},
    }
    atomic_write_text(run_dir / "params.yaml", yaml.safe_dump(resolved, sort_keys=False))

    failure: NotebookFailed | None = None
    for notebook in selected:
        record: dict[str, Any] = {"notebook": notebook.stem,
                                  "started": dt.datetime.now().isoformat(timespec="seconds"),
                                  "status": "running"}
        manifest["notebooks"].append(record)
        _write_json(manifest_path, manifest)
        output_path = notebooks_out / notebook.name
        compute_path(run_dir, notebook.name[:2]).unlink(missing_ok=True)   # an earlier attempt's
        start = time.perf_counter()
        log.info("executing %s", notebook.name)
        try:
            execute_notebook(notebook, output_path, resolved["notebooks"][notebook.stem], cwd=repo_root)
            record["status"] = "ok"
        except NotebookFailed as error:
            record.update(status="failed", failed_cell=error.cell_index, failed_exec_count=error.exec_count,
                          error=error.error)
            failure = error
        record["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        record["wall_s"] = round(time.perf_counter() - start, 2)
        # what its steps computed on, as the notebook recorded it (`provenance.record_compute`)
        record["compute"] = read_compute(run_dir, notebook.name[:2])
        if output_path.is_file():
            try:
                record["html"] = str(export_html(output_path).relative_to(run_dir))
            except Exception as error:  # an HTML copy is a convenience; never hide the real outcome
                log.warning("could not export %s to HTML: %s", output_path, error)
        _write_json(manifest_path, manifest)
        if failure:
            break

    manifest["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    manifest["status"] = "failed" if failure else "ok"
    manifest["wall_s"] = round(time.perf_counter() - t0, 2)
    _write_json(manifest_path, manifest)
    report_error = build_run_report(run_dir, manifest, manifest_path)
    if failure:
        raise failure
    if report_error:
        raise report_error
    return run_dir


def build_run_report(run_dir: Path, manifest: dict[str, Any], manifest_path: Path) -> Exception | None:
    """The last step of every run: `RUN_DIR/report/` (`report.site`), a failed run's included (it
    shows what ran). The outcome goes into the manifest as `report`; an error is returned, not
    raised, so that a notebook's failure stays the one reported first."""
    log.info("building the report of %s", run_dir)
    started = time.perf_counter()   # what the report adds to a run, its imports included
    try:
        from ..report.site import build_report

        summary = build_report(run_dir)
    except Exception as error:  # noqa: BLE001 - recorded, then raised by the caller
        log.error("the report of %s failed: %s", run_dir, error)
        manifest["report"] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        _write_json(manifest_path, manifest)
        return error
    manifest["report"] = {"status": "ok", "index": str(summary.index.relative_to(run_dir)),
                          "wall_s": round(time.perf_counter() - started, 2), "n_bytes": summary.n_bytes,
                          "n_clusters": summary.n_clusters, "n_clips": summary.n_clips}
    _write_json(manifest_path, manifest)
    return None
