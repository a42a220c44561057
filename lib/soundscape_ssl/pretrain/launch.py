"""Launching work from a notebook: checked configs, a torchrun command, a checked streamed subprocess.

`write_train_configs` turns a notebook's settings and per-method overrides into one validated
`train_config.json` per method (through the one config path, `core.config`), so a typo fails the
cell before anything trains; `training_environment` says how CPU children must be started.
`torchrun_command` builds the launch (of training, or of tiling with `tiling.command_arguments`).
`!torchrun ...` in a notebook never fails it; `run_streaming` does: it streams the child's output
line by line into the cell (so a papermill log shows progress) and raises
`subprocess.CalledProcessError` on a non-zero exit, naming what the exit code means.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..core.config import ConfigError, check_keys, config_from_mapping, merge_mappings, unknown_key_message
from ..core.provenance import to_jsonable
from ..core.stage import atomic_write_text

# Exit codes of `python -m soundscape_ssl.pretrain.train` (see its module docstring).
TRAIN_EXIT_MEANINGS = {
    2: "bad configuration or data",
    3: "the loss became NaN or infinite",
    4: "representation collapse detected",
    128 + 2: "interrupted (SIGINT); rerun to resume from checkpoint.pth",
    128 + 15: "terminated (SIGTERM); rerun to resume from checkpoint.pth",
}


def write_train_config(out_dir: str | os.PathLike, settings: Mapping[str, Any],
                       section: str = "TrainConfig") -> Path:
    """Write the TrainConfig fields of one run to `out_dir/train_config.json` (validated first).

    `settings` holds TrainConfig fields, nested sections as mappings (`{"model": {"arch": ...}}`),
    converted by the one config path (`core.config`); `section` names them in its errors.
    Validation here turns a typo into an error in the notebook cell, not in a subprocess log.
    """
    return _write_train_config(out_dir, _train_config(settings, section))


def write_train_configs(pretrain_dir: str | os.PathLike, methods: Sequence[str], settings: Mapping[str, Any],
                        method_overrides: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """One validated `train_config.json` per method, in `pretrain_dir/<method>/`: {method: path}.

    Each method's config is `settings` (TrainConfig fields shared by every method), then its
    `method` and `out_dir`, then `method_overrides[method]` laid over them (nested sections
    merged key by key). An unknown method, an unknown field or a wrong type is a ConfigError
    naming it; every config is checked before any file is written.
    """
    from .train import METHODS

    check_keys({method: None for method in methods}, METHODS, "methods")
    pretrain_dir = Path(pretrain_dir)
    configs = {method: method_train_config(method, settings, method_overrides, pretrain_dir / method)
               for method in methods}
    return {method: _write_train_config(pretrain_dir / method, config) for method, config in configs.items()}


def train_settings_from_parameters(store_dir: str | os.PathLike, *, arch: str, depth: int, epochs: int,
                                   max_steps: int, batch_size_per_gpu: int, base_lr: float,
                                   warmup_epochs: float, device: str, num_workers: int, compile: bool,
                                   precision: str, seed: int, n_threads: int, background_removal: str, dino_out_dim: int,
                                   dino_local_crops: int, mae_mask_ratio: float, mae_masking: str,
                                   **_other_parameters: Any) -> dict[str, Any]:
    """The TrainConfig fields every method shares, from notebook 03's parameters (nested sections
    as mappings; 0 for `depth` and `max_steps` means "the architecture's" and "all epochs").

    Notebook 03 and `benchmarks/species.py` both call it, so a profile's recipe trains the same
    way in either; the notebook's other parameters (methods, launch settings) are ignored here.
    """
    return {
        "store_dir": str(store_dir), "model": {"arch": arch, "depth": depth or None},
        "epochs": epochs, "max_steps": max_steps or None, "batch_size_per_gpu": batch_size_per_gpu,
        "base_lr": base_lr, "warmup_epochs": warmup_epochs, "device": device, "num_workers": num_workers,
        "compile": compile, "precision": precision, "seed": seed, "cpu_threads": n_threads, "background_removal": background_removal,
        "dino": {"out_dim": dino_out_dim, "local_crops": dino_local_crops},
        "mae": {"mask_ratio": mae_mask_ratio, "masking": mae_masking},
    }


def method_train_config(method: str, settings: Mapping[str, Any], method_overrides: Mapping[str, Any] | None,
                        out_dir: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Any:
    """One method's validated TrainConfig: `settings`, its method and out_dir, its entry of
    `method_overrides`, then `extra` (e.g. a fixed budget's steps), nested sections merged."""
    check_method_overrides(method_overrides or {})
    merged = merge_mappings({**settings, "method": method, "out_dir": str(out_dir)},
                            (method_overrides or {}).get(method) or {})
    return _train_config(merge_mappings(merged, extra or {}), f"{method} settings")


def _train_config(settings: Mapping[str, Any], section: str) -> Any:
    from .train import TrainConfig

    config = config_from_mapping(TrainConfig, settings, section)
    config.validate()
    return config


def _write_train_config(out_dir: str | os.PathLike, config: Any) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "train_config.json"
    atomic_write_text(path, json.dumps(to_jsonable(config), indent=2, sort_keys=True) + "\n")
    return path


def check_method_overrides(method_overrides: Any, section: str = "method_overrides") -> None:
    """Raise ConfigError unless `method_overrides` maps method names to (partial) TrainConfig
    fields; the profile check of `soundscape-ssl run` and `write_train_configs` both use it."""
    from .train import METHODS, TrainConfig

    if not isinstance(method_overrides, Mapping):
        raise ConfigError([f"{section} must be a mapping of method name to TrainConfig fields, "
                           f"got {method_overrides!r}"])
    problems = [unknown_key_message(method, METHODS, section) for method in method_overrides if method not in METHODS]
    for method, fields in method_overrides.items():
        try:
            config_from_mapping(TrainConfig, fields or {}, f"{section}.{method}")
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)


def training_environment(device: str, threads: int) -> dict[str, str]:
    """Extra environment for training children: `cpu_training_environment(threads)` when they
    train on the CPU (device "cpu", or "auto" where torch sees no CUDA device), else nothing."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return cpu_training_environment(threads) if on_cpu else {}


def training_compute(out_dir: str | os.PathLike) -> dict[str, Any]:
    """{device, precision, compile, world_size} of the training run in `out_dir`, from the
    `config.json` its rank 0 wrote (the derived device and autocast, not the settings asked for)."""
    record = json.loads((Path(out_dir) / "config.json").read_text())
    derived = record["derived"]
    return {"device": derived["device"], "precision": "bf16" if derived["autocast"] == "torch.bfloat16" else "fp32",
            "compile": bool(record["config"]["compile"]), "world_size": derived["world_size"]}


def torchrun_command(module: str, module_args: Sequence[str], nproc_per_node: int = 1, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "soundscape-ssl") -> list[str]:
    """`python -m torch.distributed.run ... -m MODULE ARGS`: standalone on one node, c10d rendezvous on many.

    torchrun is invoked through the current interpreter so the notebook's environment is the
    one that trains, whatever `torchrun` on PATH would be.
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"nproc_per_node and nnodes must be >= 1, got {nproc_per_node}, {nnodes}")
    command = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        command += ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        if not rdzv_endpoint:
            raise ValueError("a multi-node launch needs rdzv_endpoint=HOST:PORT of the first node")
        command += [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return command + ["-m", module, *module_args]


def cpu_training_environment(threads: int) -> dict[str, str]:
    """Environment for CPU training children: thread counts fixed, idle OpenMP threads sleeping.

    OMP_WAIT_POLICY must be set before torch is imported, hence in the child's environment:
    spinning OpenMP workers cut CPU training throughput 3-10x on a shared 2-core machine
    (measured with benchmarks/pretrain.py).
    """
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def run_streaming(command: Sequence[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                  echo: Callable[[str], None] = print,
                  exit_meanings: dict[int, str] | None = None) -> None:
    """Run `command`, echoing each output line as it comes; raise CalledProcessError on failure."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, env=full_env, cwd=cwd) as process:
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            echo(line)
            tail = (tail + [line])[-40:]
        code = process.wait()
    if code != 0:
        meaning = (exit_meanings or {}).get(code, "")
        raise subprocess.CalledProcessError(
            code, list(command), output="\n".join(tail),
            stderr=f"exit {code}: {meaning}" if meaning else None)
