"""What produced a product: configs written beside it, git state, package versions, hardware.

Every stage writes a `config.json` beside its products (`write_config_json`); the pipeline
driver writes a `manifest.json` per run from `environment_report()`. A notebook states what its
steps computed on (`record_compute`: device type, precision, compile, read from the products
themselves where they say it); the driver copies that into the manifest (`read_compute`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__
from .stage import atomic_write_text

# Packages whose versions decide whether a result can be reproduced.
TRACKED_PACKAGES = (
    "torch", "torchaudio", "torchvision", "timm", "numpy", "pandas", "pyarrow", "soundfile",
    "scipy", "scikit-learn", "umap-learn", "matplotlib", "papermill", "nbconvert", "tqdm", "pyyaml",
)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, numpy scalars and timestamps to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


def write_config_json(out_dir: str | os.PathLike, stage: str, config: Any, **extra: Any) -> Path:
    """Write `config.json` beside a stage's products (atomically): the stage, its config and the
    package version."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "stage": stage,
        "package_version": __version__,
        "config": to_jsonable(config),
        **{k: to_jsonable(v) for k, v in extra.items()},
    }
    return atomic_write_text(out_dir / "config.json",
                             json.dumps(payload, indent=2, sort_keys=True) + "\n")


def git_state(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit sha and whether the work tree differs from it; None values outside a git checkout."""
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return {"git_sha": sha, "git_dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_report() -> dict[str, Any]:
    """CPU, thread and accelerator facts; torch is imported lazily so this stays cheap without it."""
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    try:
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda"] = torch.version.cuda
        report["cuda_available"] = torch.cuda.is_available()
        report["torch_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        report["torch"] = None
    return report


def environment_report(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    return {
        "soundscape_ssl": __version__,
        **git_state(repo_dir),
        "packages": package_versions(),
        "hardware": hardware_report(),
    }


# ----------------------------------------------------------------------------------------------
# What a notebook computed on

COMPUTE_DIR = "compute"    # RUN_DIR/compute/<notebook number>.json
PRECISIONS = ("fp32", "bf16")


def compute_path(run_dir: str | os.PathLike, notebook: str) -> Path:
    return Path(run_dir) / COMPUTE_DIR / f"{notebook}.json"


def record_compute(run_dir: str | os.PathLike, notebook: str, step: str, *, device: str, precision: str,
                   compile: bool = False, **details: Any) -> dict[str, Any]:
    """Add one step's compute to RUN_DIR/compute/<notebook>.json, {step: {device, precision,
    compile, ...}}: the device *type* it ran on ("cpu", "cuda"), the precision its arithmetic used
    ("fp32" or "bf16"), whether it was compiled, and any `details` (e.g. tiles written). Values
    come from what the step reports or its products record, never from what was asked for.
    Returns the step's record."""
    device_type = str(device).split(":")[0]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    record = {"device": device_type, "precision": precision, "compile": bool(compile),
              **to_jsonable(details)}
    path = compute_path(run_dir, notebook)
    steps = read_compute(run_dir, notebook) or {}
    steps[step] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(steps, indent=2) + "\n")
    return record


def read_compute(run_dir: str | os.PathLike, notebook: str) -> dict[str, Any] | None:
    """The steps a notebook recorded (`record_compute`), or None when it recorded none."""
    path = compute_path(run_dir, notebook)
    return json.loads(path.read_text()) if path.is_file() else None
