"""The published figure set: `figures/` at the top of the repository, made by `make figures`.

`make figures` reruns the demo's reference run from scratch (`runs/reference`, profile demo) and
then `soundscape-ssl figures runs/reference --out figures` copies the curated PNGs
(`catalogue.PUBLISHED`) and writes `figures/README.md`: a table of figure, the question it
answers, one line on what it shows and its notebook, and which run, profile and commit made
them. Nothing in it depends on the time or the machine's name, and the figures are written
deterministically (`figures.save_figure`), so regenerating the set at the same commit gives the
same files.

The commit recorded is the code's: the newest commit at or before the run's HEAD that changed
anything outside `figures/`. Committing a regenerated set does not change it, so the README of
a set regenerated at that later commit reads the same.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from ..core.stage import atomic_write_text, file_sha256
from . import catalogue
from .site import notebook_infos, read_manifest

logger = logging.getLogger(__name__)

README = "README.md"
PUBLISHED_DIR = "figures"


def code_commit(repo_root: Path, head: str) -> str:
    """The newest commit at or before `head` that changed anything outside figures/ (`head`
    itself when git cannot say)."""
    try:
        found = subprocess.run(["git", "rev-list", "-1", head, "--", ".", f":(exclude){PUBLISHED_DIR}"],
                               cwd=repo_root, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return head
    return found or head


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def publish_figures(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    names: Sequence[str] = catalogue.PUBLISHED, repo_root: str | os.PathLike | None = None
                    ) -> Path:
    """Copy the figures `names` of `run_dir` into `out_dir` and write its README.md; returns the
    README. PNGs in `out_dir` that are not in the set are removed (the folder is the set)."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "ok":
        raise ValueError(f"{run_dir} did not finish ({manifest.get('status')}): publish figures of a finished run")
    missing = [name for name in names if not (run_dir / "figures" / f"{name}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir / 'figures'} lacks {missing}: not the reference run of this commit?")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(set(out_dir.glob("*.png")) - {out_dir / f"{name}.png" for name in names}):
        logger.info("removing %s: not in the published set", stale)
        stale.unlink()
    titles = {info.key: info.title for info in notebook_infos(run_dir, manifest)}
    rows = []
    for name in names:
        source, target = run_dir / "figures" / f"{name}.png", out_dir / f"{name}.png"
        if not target.is_file() or file_sha256(target) != file_sha256(source):
            shutil.copyfile(source, target)
        entry = catalogue.entry_for(name)
        if entry is None:
            raise ValueError(f"{name} is published but has no entry in report/catalogue.py")
        key = catalogue.notebook_key(name)
        rows.append(f"| [{name}]({name}.png) | {_cell(entry.question)} | {_cell(entry.caption)} | "
                    f"{_cell(titles.get(key, key))} |")
    environment = manifest.get("environment", {})
    head = environment.get("git_sha") or "unknown"
    commit = code_commit(Path(repo_root), head) if repo_root and head != "unknown" else head
    state = {True: "with uncommitted changes", False: "clean tree"}.get(environment.get("git_dirty"), "tree state unknown")
    profile = Path(str(manifest.get("profile", ""))).stem
    total_mb = sum((out_dir / f"{name}.png").stat().st_size for name in names) / 1e6
    text = "\n".join([
        "# Figures",
        "",
        "The published figure set of the study: one or two figures per notebook of the demo's reference run",
        "(the whole study on the embedded synthetic archive, on a CPU). Every figure a run makes, with",
        "its question and caption, is in that run's report (`runs/<run_id>/report/index.html`).",
        "",
        f"Made by run `{manifest.get('run_id', run_dir.name)}` of profile `{profile}` from the code at git commit",
        f"`{commit}` ({state} when the run started), soundscape-ssl {environment.get('soundscape_ssl', '?')},",
        f"torch {environment.get('packages', {}).get('torch', '?')}, matplotlib "
        f"{environment.get('packages', {}).get('matplotlib', '?')}; {len(names)} PNGs, {total_mb:.1f} MB.",
        "Regenerate them with `make figures` (it reruns the reference run from scratch, about 11 minutes on",
        "2 CPU cores); the same commit gives the same files.",
        "",
        "| figure | the question it answers | what it shows | notebook |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    readme = out_dir / README
    atomic_write_text(readme, text)
    logger.info("published %d figures (%.1f MB) into %s", len(names), total_mb, out_dir)
    return readme


def published_set(out_dir: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} of a published folder (README included): what regeneration must reproduce."""
    out_dir = Path(out_dir)
    return {path.name: file_sha256(path) for path in sorted(out_dir.glob("*")) if path.is_file()}

