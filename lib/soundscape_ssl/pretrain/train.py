"""Pretraining entry point: wires data, method, optimizer, DDP, logging and checkpoints.

    torchrun --standalone --nproc_per_node=8 -m soundscape_ssl.pretrain.train --config pretrain.yaml \\
        --epochs 50 --dino.out-dim 65536
    python -m soundscape_ssl.pretrain.train --config demo.json --max-steps 20      # one process, CPU or GPU

`--config` is a JSON or YAML file with `TrainConfig` fields (nested sections as mappings);
each flag `--field-name value` (or `--section.field-name value`) overrides one field
(`--help` lists them; booleans take true/false, tuples several values, None-able fields `none`).
Both go through the one config path (`core.config`): an unknown key or a wrong type is an error.
The engine (`engine.train_one_epoch`) trains; the methods (`dino`, `mae`, `vicreg`) define
losses; this module only connects them.

Behaviour worth knowing:
* Rerunning with the same `out_dir` resumes from `out_dir/checkpoint.pth` at the same step,
  with the same optimizer, centre and teacher state, the same data order and the same
  augmentation draws (see `engine`). The checkpoint is written atomically every
  `checkpoint_every_steps`, at every epoch end, at the end, and after SIGTERM/SIGINT
  (then the process exits with 128 + the signal number).
* Derived values (world size, effective batch, peak lr = base_lr x effective batch / 256,
  steps per epoch, total and warm-up steps) are computed, logged and written to config.json.
* A non-finite loss stops every rank with exit code 3, detected collapse with exit code 4, a
  bad configuration (or tiles and checkpoint that do not fit it) with exit code 2; the last
  good checkpoint is kept.
* Rank 0 alone writes `log.jsonl` (its first record of every start holds the git sha, the
  command line, the full config and the derived values), TensorBoard events under
  `tensorboard/` and the checkpoint. A resumed run first drops the training records (and
  TensorBoard events) of steps after its checkpoint's, which it trains again: each step is
  logged once; the start and stop events of every attempt stay.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .augment import AugmentConfig, Normalization
from .checkpoint import CHECKPOINT_NAME, build_checkpoint, checkpoint_backbone_config, load_checkpoint, save_checkpoint
from .dino import DinoConfig, DinoMethod
from .engine import NonFiniteLossError, StepRecord, train_one_epoch
from .mae import MaeConfig, MaeMethod
from .models import BackboneConfig, SSLMethod
from ..core.cli import CommandParser, run_command
from ..core.config import add_config_options, config_from_options, read_mapping_file
from ..core.provenance import environment_report, to_jsonable, write_config_json
from ..core.stage import atomic_write_text, claim_folder, tf32_matmuls
from .schedules import CosineSchedule, scaled_learning_rate
from .vicreg import VicregConfig, VicregMethod

logger = logging.getLogger(__name__)

METHODS = ("dino", "mae", "vicreg")
EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_COLLAPSE = 4
# Settings that may change between a run and its resumption without changing what is trained.
RESUME_FREE_KEYS = {"method", "model", "dino", "mae", "vicreg", "max_steps", "log_every", "checkpoint_every_steps",
                    "num_workers", "compile", "cpu_threads", "collapse_check_after_steps", "collapse_patience",
                    "out_dir", "store_dir", "dataset_factory"}
# Parameters that are not weights: no weight decay (as in DINO, MAE and timm).
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "mask_token", "last_layer.scale")


@dataclasses.dataclass
class TrainConfig:
    """Everything a pretraining run needs; serialised to config.json and into every checkpoint."""

    method: str = "dino"  # one of METHODS
    store_dir: str = ""  # tile store written by the tiling stage
    out_dir: str = ""  # runs/<run_id>/pretrain/<method>: checkpoint.pth, log.jsonl, config.json
    dataset_factory: str | None = None  # "module:function" (store_dir -> TrainData); None = the tile store
    model: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    dino: DinoConfig = dataclasses.field(default_factory=DinoConfig)
    mae: MaeConfig = dataclasses.field(default_factory=MaeConfig)
    vicreg: VicregConfig = dataclasses.field(default_factory=VicregConfig)
    epochs: int = 100  # the schedules span this many epochs (max_steps does not shorten them)
    schedule_steps: int | None = None  # the schedules span this many steps instead (fixed-budget runs)
    batch_size_per_gpu: int = 64  # tiles per rank per step
    base_lr: float = 5e-4  # peak lr for an effective batch of 256 (linear scaling rule)
    min_lr: float = 1e-6  # cosine schedule's final lr
    warmup_epochs: float = 10.0  # linear lr warm-up from 0
    weight_decay: float = 0.04  # cosine-scheduled from weight_decay to weight_decay_end
    weight_decay_end: float = 0.4  # (DINO's setting; MAE uses a constant 0.05: set both)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # MAE uses (0.9, 0.95)
    clip_grad_norm: float | None = 3.0  # max global gradient norm; None = no clipping
    num_workers: int = 8  # data-loader worker processes per rank
    compile: bool = False  # torch.compile the transformer blocks (GPU; minutes of warm-up)
    # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32". On a CPU with native bf16
    # (cpu_computes_bf16_natively) "bf16" trains ~1.4-2x faster at unchanged kNN; elsewhere it is slower.
    precision: str = "auto"
    device: str = "auto"  # "auto" (CUDA when available), "cuda" or "cpu"
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps in total (smoke tests, demos)
    log_every: int = 20  # steps between log records (and collapse checks)
    checkpoint_every_steps: int = 500  # also written at every epoch end and at the end
    collapse_check_after_steps: int | None = None  # None = after the lr warm-up
    collapse_patience: int = 3  # consecutive log records showing collapse before stopping
    cpu_threads: int | None = None  # torch intra-op threads per process; None = torch's default
    # "band_median": the model sees each tile minus its mel bands' medians, floored at 0 (see
    # tiles.store.remove_background), applied to each view after mixing and gain, on the whole tile;
    # recorded in the checkpoint so every inference path does the same.
    background_removal: str = "none"
    # Train on the tiles with the most in-band activity above their own noise floor
    # (tiles.store.activity_above_floor_db, no label involved): this share of the store; 1 = all.
    activity_top_fraction: float = 1.0
    activity_band_hz: tuple[float, float] = (1000.0, 8000.0)

    def method_config(self) -> DinoConfig | MaeConfig | VicregConfig:
        return getattr(self, self.method)

    def validate(self) -> None:
        """Raise ValueError with a readable message for any inconsistent setting."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.out_dir:
            raise ValueError("out_dir is required")
        if not self.store_dir and not self.dataset_factory:
            raise ValueError("store_dir is required (the tile store to train on)")
        for name in ("epochs", "batch_size_per_gpu", "log_every", "checkpoint_every_steps", "collapse_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule_steps must be >= 1 or null, got {self.schedule_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if not 0.0 < self.activity_top_fraction <= 1.0:
            raise ValueError(f"activity_top_fraction must be in (0, 1], got {self.activity_top_fraction}")
        if not 0.0 <= self.activity_band_hz[0] < self.activity_band_hz[1]:
            raise ValueError(f"activity_band_hz must be (low, high) Hz, got {self.activity_band_hz}")
        if self.num_workers < 0 or self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ValueError("num_workers and warmup_epochs must be >= 0 and base_lr > 0")
        from ..tiles.store import BACKGROUND_REMOVALS  # lazily, like every tiles import here (see tile_store_data)

        if self.background_removal not in BACKGROUND_REMOVALS:
            raise ValueError(f"background_removal must be one of {BACKGROUND_REMOVALS}, "
                             f"got {self.background_removal!r}")
        self.model.validate()
        self.augment.validate()
        method_config = self.method_config()
        if isinstance(method_config, MaeConfig):
            method_config.validate()
        else:
            method_config.validate(self.model.n_frames, self.model.patch_hw[1])


# ----------------------------------------------------------------------------------------------
# Configuration files and command-line flags (through the one config path, core/config.py)


def build_parser() -> argparse.ArgumentParser:
    """`--config FILE` plus one flag per TrainConfig field (`--epochs`, `--dino.out-dim` ...)."""
    parser = CommandParser(
        prog="python -m soundscape_ssl.pretrain.train", description=__doc__.split("\n")[0],
        epilog="Flags override the --config file's values, which override TrainConfig's defaults.")
    parser.add_argument("--config", help="JSON or YAML file of TrainConfig fields (nested sections as mappings), "
                                         "or a run's pretrain/<method>/config.json")
    add_config_options(parser, TrainConfig, title="TrainConfig fields")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `build_parser` arguments: flags over the --config file over defaults."""
    base = read_mapping_file(args.config) if args.config else {}
    if base.get("stage") == "pretrain" and isinstance(base.get("config"), dict):
        base = base["config"]     # a run's own pretrain/<method>/config.json: retrain it, flags changed
    section = f"TrainConfig ({args.config} and flags)" if args.config else "TrainConfig flags"
    return config_from_options(TrainConfig, args, base=base, section=section)


def load_config(path: str | os.PathLike | None = None, flags: list[str] | None = None) -> TrainConfig:
    """TrainConfig from a JSON/YAML file (optional) plus command-line flags (`["--epochs", "5"]`)."""
    args = build_parser().parse_args([*(["--config", str(path)] if path is not None else []), *(flags or [])])
    return config_from_args(args)


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class TrainData:
    """A dataset of normalised tiles (1, n_mels, n_frames) and what describes it."""

    dataset: Dataset
    normalization: dict[str, Any] | None  # {"mean": dB, "std": dB[, "background"]} used to normalise the tiles
    spectrogram_config: dict[str, Any] | None  # the tile store's SpectrogramConfig as a dict


def with_background_removal(data: TrainData, background: str) -> TrainData:
    """`data` with `background` recorded in its normalisation: the methods apply it to each
    augmented view (`augment.Normalization.model_input`), and the checkpoint carries it so that
    every inference path (`tiles.store.normalize_tiles`) makes the same input."""
    from ..tiles.store import input_normalization

    if background == "none":
        return data
    normalization = input_normalization(data.normalization or {"mean": 0.0, "std": 1.0}, background)
    return TrainData(data.dataset, normalization, data.spectrogram_config)


def with_active_tiles(data: TrainData, store_dir: str, top_fraction: float,
                      band_hz: tuple[float, float]) -> TrainData:
    """`data` restricted to the `top_fraction` of the store's tiles with the most in-band activity
    above their noise floor (`tiles.store.activity_above_floor_db`), in tile order; ties broken
    by tile id, so the choice is deterministic. 1.0 keeps everything."""
    if top_fraction >= 1.0:
        return data
    from ..tiles.store import TileStore, store_activity_db

    activity = store_activity_db(TileStore(store_dir), *band_hz)
    if len(activity) != len(data.dataset):
        raise ValueError(f"activity selection needs the tile store's tiles: {len(activity)} tiles in "
                         f"{store_dir}, {len(data.dataset)} in the dataset")
    n_keep = max(1, round(top_fraction * len(activity)))
    keep = np.sort(np.argsort(-activity, kind="stable")[:n_keep])
    logger.info("training on the %d most active of %d tiles (%.0f%%; activity >= %.2f dB above the "
                "floor in %g-%g Hz)", n_keep, len(activity), 100 * top_fraction, float(activity[keep].min()),
                *band_hz)
    return TrainData(Subset(data.dataset, keep.tolist()), data.normalization, data.spectrogram_config)


def tile_store_data(store_dir: str) -> TrainData:
    """The default data: `TileDataset(store_dir)` with the store's normalisation and spectrogram config."""
    from ..tiles.store import TileDataset, TileStore

    store = TileStore(store_dir)
    normalization = {"mean": float(store.normalization["mean"]), "std": float(store.normalization["std"])}
    return TrainData(TileDataset(store_dir, normalize=True), normalization, to_jsonable(store.config))


def resolve_data_factory(spec: str | None) -> Callable[[str], TrainData]:
    """`None` -> `tile_store_data`; "package.module:function" -> that function."""
    if not spec:
        return tile_store_data
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"dataset_factory must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


class ResumableShardSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch shuffle, startable at any batch of the epoch.

    Every rank draws the same permutation of all tiles for an epoch (seeded by seed and epoch),
    keeps the first world_size x (n // world_size) and takes every world_size-th of them from
    its rank on. Each epoch yields whole batches only, so every rank takes the same number of
    steps, and `set_position(epoch, batch)` skips batches without loading them.
    """

    def __init__(self, n_items: int, rank: int, world_size: int, batch_size: int, seed: int) -> None:
        self.n_items, self.rank, self.world_size = n_items, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = (n_items // world_size) // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n_items, generator=generator)
        shard = order[: self.world_size * (self.n_items // self.world_size)][self.rank:: self.world_size]
        used = shard[self.start_batch * self.batch_size: self.steps_per_epoch * self.batch_size]
        return iter(used.tolist())

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_batch) * self.batch_size


# ----------------------------------------------------------------------------------------------
# Wiring


@dataclasses.dataclass
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_preference: str) -> DistributedContext:
    """Rank and device from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_preference == "cuda" or (device_preference == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=device if use_cuda else None)
    return DistributedContext(rank, local_rank, world_size, device)


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles). Without it
    oneDNN emulates bf16: benchmarks/pretrain.py measured bf16 autocast at 0.78x the fp32 steps per
    second with oneDNN capped at AVX512_CORE, and 1.97x uncapped, on one AVX512-BF16 CPU."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def build_method(config: TrainConfig, normalization: Normalization, total_steps: int,
                 steps_per_epoch: int) -> SSLMethod:
    if config.method == "dino":
        return DinoMethod(config.model, config.dino, config.augment, normalization, total_steps, steps_per_epoch)
    if config.method == "mae":
        return MaeMethod(config.model, config.mae, normalization)
    return VicregMethod(config.model, config.vicreg, config.augment, normalization)


def parameter_groups(method: SSLMethod) -> list[dict[str, Any]]:
    """Trainable parameters split into weights (decayed) and biases, norms and embeddings (not decayed)."""
    decay, no_decay = [], []
    for name, parameter in method.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


def compile_for_training(method: SSLMethod) -> None:
    """torch.compile every transformer stack in place (state_dict keys unchanged); one graph per crop width."""
    for name, module in method.named_modules():
        if name.endswith("blocks") and isinstance(module, torch.nn.Sequential):
            module.compile(dynamic=False)


class StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class CollapseDetectedError(RuntimeError):
    """The method's collapse monitor fired for `collapse_patience` consecutive log records."""


class _SignalFlag:
    """Remembers SIGTERM/SIGINT so that training stops after the current step (checkpoint first)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers need the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: stopping after this step and writing the checkpoint",
                       signal.Signals(signum).name)
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts at once

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __call__(self) -> bool:
        return self.signum is not None


class RunLog:
    """Rank 0's JSON-lines log and TensorBoard writer; every method is a no-op on other ranks.

    `start_step` is the step training starts from (the checkpoint's, 0 for a new run): records
    of later steps left by an earlier, interrupted attempt are dropped first, since those steps
    are trained (and logged) again.
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int = 0) -> None:
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        if enabled:
            path = out_dir / "log.jsonl"
            if path.exists():
                drop_records_after(path, start_step)
            self._file = open(path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of steps >= it that an earlier attempt wrote.
                self._tensorboard = SummaryWriter(str(out_dir / "tensorboard"),
                                                  purge_step=start_step + 1)
            except ImportError:
                logger.info("tensorboard is not installed: logging to log.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(to_jsonable(record), sort_keys=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "epoch", "event") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite a log.jsonl (atomically) without its "train" records of steps after `step`, and
    without a torn last line (a kill mid-write); other events stay. Returns the records dropped."""
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if record.get("event") == "train" and int(record.get("step", 0)) > step:
            dropped += 1
            continue
        kept.append(line + "\n")
    if dropped or not text.endswith("\n"):
        atomic_write_text(path, "".join(kept))
        logger.info("%s: dropped %d record(s) after step %d (those steps are trained again)",
                    path, dropped, step)
    return dropped


@dataclasses.dataclass
class TrainSummary:
    """What `run` returns: where the run stopped and why."""

    step: int
    epoch: int
    total_steps: int
    last_loss: float | None
    checkpoint_path: str
    finished: bool  # reached the end of the schedules (not just max_steps)


class _Trainer:
    """State shared by the training loop and its per-step callback."""

    def __init__(self, config: TrainConfig, context: DistributedContext, data: TrainData) -> None:
        self.config, self.context, self.data = config, context, data
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        device = context.device
        self.autocast_dtype = torch.bfloat16 if (
            config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")) else None
        if self.autocast_dtype is not None and device.type == "cpu" and not cpu_computes_bf16_natively():
            logger.warning("precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated, "
                           "slower than fp32: use precision fp32 on this machine")

        self.sampler = ResumableShardSampler(len(data.dataset), context.rank, context.world_size,
                                             config.batch_size_per_gpu, config.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(data.dataset)} tiles do not fill one step of batch_size_per_gpu="
                             f"{config.batch_size_per_gpu} x {context.world_size} ranks")
        self.total_steps = config.schedule_steps or config.epochs * self.steps_per_epoch
        self.end_step = min(self.total_steps, config.max_steps or self.total_steps)
        warmup_steps = min(round(config.warmup_epochs * self.steps_per_epoch), self.total_steps)
        effective_batch = config.batch_size_per_gpu * context.world_size
        peak_lr = scaled_learning_rate(config.base_lr, effective_batch)
        self.lr_schedule = CosineSchedule(peak_lr, config.min_lr, self.total_steps, warmup_steps)
        self.wd_schedule = CosineSchedule(config.weight_decay, config.weight_decay_end, self.total_steps)
        self.collapse_check_after = (warmup_steps if config.collapse_check_after_steps is None
                                     else config.collapse_check_after_steps)
        self.derived = {
            "world_size": context.world_size,
            "effective_batch_size": effective_batch,
            "peak_lr": peak_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": warmup_steps,
            "end_step": self.end_step,
            "n_tiles": len(data.dataset),
            "device": str(device),
            "autocast": str(self.autocast_dtype) if self.autocast_dtype else "none",
            "collapse_check_after_steps": self.collapse_check_after,
        }

        normalization = data.normalization or {"mean": 0.0, "std": 1.0}
        if data.normalization is None:
            logger.warning("the dataset states no normalisation: augmentations treat tile values as dB")
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.method = build_method(config, Normalization(normalization["mean"], normalization["std"],
                                                         normalization.get("background") or "none"),
                                   self.total_steps, self.steps_per_epoch).to(device)
        if context.distributed and device.type == "cuda":
            # VICReg's expander normalises over the global batch, as in its reference code (no-op for DINO/MAE).
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        # Fused AdamW: one kernel for all parameters (CUDA and CPU), instead of several per tensor.
        self.optimizer = torch.optim.AdamW(parameter_groups(self.method), lr=peak_lr, betas=config.adam_betas,
                                           fused=True)
        self.step = 0
        self.resumed_from: int | None = None
        self.log: RunLog | None = None  # opened by `run` once the configuration is known to be usable
        self.last_loss: float | None = None
        self.last_saved_step: int | None = None
        self._window: dict[str, float] = {}
        self._window_start = time.perf_counter()
        self._collapse_streak = 0
        self._progress = None

    # -- checkpoints --------------------------------------------------------------------------

    def resume_if_possible(self) -> None:
        if not self.checkpoint_path.exists():
            return
        checkpoint = load_checkpoint(self.checkpoint_path, map_location=self.context.device)
        if checkpoint["method"] != self.config.method:
            raise ValueError(f"{self.checkpoint_path} was written by method {checkpoint['method']!r}, this run is "
                             f"{self.config.method!r}: use another out_dir")
        if checkpoint_backbone_config(checkpoint, self.checkpoint_path) != self.config.model:
            raise ValueError(f"{self.checkpoint_path} holds a different model ({checkpoint['backbone_config']}): "
                             "use another out_dir")
        if checkpoint["method_config"] != to_jsonable(self.config.method_config()):
            logger.warning("resuming with changed %s settings: %s -> %s", self.config.method,
                           checkpoint["method_config"], to_jsonable(self.config.method_config()))
        changed = {key: (old, new) for key, old in checkpoint["train_config"].items()
                   if key not in RESUME_FREE_KEYS and (new := to_jsonable(getattr(self.config, key, None))) != old}
        if changed:
            logger.warning("resuming with changed settings (schedules may differ from the first run's): %s", changed)
        if checkpoint["world_size"] != self.context.world_size:
            logger.warning("resuming a %d-rank run on %d ranks: the data order after step %d differs",
                           checkpoint["world_size"], self.context.world_size, checkpoint["step"])
        self.method.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = self.resumed_from = int(checkpoint["step"])
        self.last_saved_step = self.step
        logger.info("resumed from %s at step %d (epoch %d)", self.checkpoint_path, self.step, checkpoint["epoch"])

    def save(self) -> None:
        if self.last_saved_step == self.step:
            return
        self.last_saved_step = self.step
        if not self.context.is_main:
            return
        checkpoint = build_checkpoint(
            method=self.config.method, step=self.step, epoch=self.step // self.steps_per_epoch,
            world_size=self.context.world_size, backbone_config=self.config.model,
            method_config=self.config.method_config(), train_config=self.config,
            spectrogram_config=self.data.spectrogram_config, normalization=self.data.normalization,
            model_state=self.method.state_dict(), backbone_state=self.method.export_backbone().state_dict(),
            optimizer_state=self.optimizer.state_dict(), embedding_pooling=self.method.embedding_pooling)
        save_checkpoint(self.checkpoint_path, checkpoint)

    # -- logging and checks -------------------------------------------------------------------

    def _reduced_metrics(self, record: StepRecord) -> dict[str, float]:
        """The method's metrics and the gradient norm, averaged over ranks (so all ranks agree on checks)."""
        names = list(record.metrics) + ["grad_norm"]
        device = self.context.device
        values = torch.stack([value.detach().float().to(device).reshape(())
                              for value in [*record.metrics.values(), record.grad_norm]])
        if self.context.distributed:
            dist.all_reduce(values)
            values /= self.context.world_size
        return dict(zip(names, values.tolist()))

    def on_step(self, record: StepRecord) -> None:
        self.step = record.step
        self.last_loss = record.loss
        window = self._window
        window["steps"] = window.get("steps", 0) + 1
        window["loss"] = window.get("loss", 0.0) + record.loss
        window["data_wait_s"] = window.get("data_wait_s", 0.0) + record.data_wait_s
        if self._progress is not None:
            self._progress.update(1)
        if record.step % self.config.log_every == 0 or record.step == self.end_step:
            self._log_and_check(record)
        if record.step % self.config.checkpoint_every_steps == 0:
            self.save()

    def _log_and_check(self, record: StepRecord) -> None:
        metrics = self._reduced_metrics(record)
        elapsed = time.perf_counter() - self._window_start
        window = self._window
        tiles = window["steps"] * self.config.batch_size_per_gpu * self.context.world_size
        entry = {
            "event": "train", "step": record.step, "epoch": record.epoch,
            "loss": window["loss"] / window["steps"], "lr": record.learning_rate,
            "weight_decay": record.weight_decay, "tiles_per_s": tiles / elapsed,
            "data_wait_fraction": window["data_wait_s"] / elapsed, **metrics,
            "wall_time": time.time(),
        }
        self.log.write(entry)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{entry['loss']:.4f}", tiles_per_s=f"{entry['tiles_per_s']:.1f}")
        self._window, self._window_start = {}, time.perf_counter()

        reason = self.method.collapse_reason(metrics) if record.step > self.collapse_check_after else None
        self._collapse_streak = self._collapse_streak + 1 if reason else 0
        if reason and self._collapse_streak >= self.config.collapse_patience:
            raise CollapseDetectedError(f"{reason} (seen in {self._collapse_streak} consecutive log records up "
                                        f"to step {record.step}; the checkpoint of step {self.last_saved_step} "
                                        "is kept)")

    # -- the loop -----------------------------------------------------------------------------

    def train(self, model: torch.nn.Module, stop_requested: _SignalFlag) -> TrainSummary:
        config, context = self.config, self.context
        loader = DataLoader(self.data.dataset, batch_size=config.batch_size_per_gpu, sampler=self.sampler,
                            drop_last=True, num_workers=config.num_workers,
                            pin_memory=context.device.type == "cuda",
                            persistent_workers=config.num_workers > 0,
                            prefetch_factor=4 if config.num_workers > 0 else None)
        self._progress = tqdm(total=self.end_step, initial=self.step, desc=f"pretrain {config.method}",
                              unit="step", mininterval=10.0, disable=not context.is_main)
        self._window_start = time.perf_counter()
        try:
            while self.step < self.end_step:
                epoch = self.step // self.steps_per_epoch
                self.sampler.set_position(epoch, self.step % self.steps_per_epoch)
                self.step, stopped = train_one_epoch(
                    model, self.method, self.optimizer, loader, epoch=epoch, start_step=self.step,
                    end_step=self.end_step, device=context.device, lr_schedule=self.lr_schedule,
                    wd_schedule=self.wd_schedule, autocast_dtype=self.autocast_dtype,
                    clip_grad_norm=config.clip_grad_norm, seed=config.seed, rank=context.rank,
                    stop_requested=stop_requested, on_step=self.on_step)
                if stopped:
                    self.save()
                    if context.distributed:
                        dist.barrier()  # torchrun kills the others when one exits: let rank 0 finish saving
                    raise StopRequested(stop_requested.signum or signal.SIGTERM)
                if self.step % self.steps_per_epoch == 0:
                    self.save()  # epoch end
            self.save()
        finally:
            self._progress.close()
        if context.distributed:
            dist.barrier()  # nobody exits (and tears down the group) before rank 0 has saved
        return TrainSummary(step=self.step, epoch=self.step // self.steps_per_epoch, total_steps=self.total_steps,
                            last_loss=self.last_loss, checkpoint_path=str(self.checkpoint_path),
                            finished=self.step >= self.total_steps)


def _check_tile_shape(data: TrainData, model: BackboneConfig) -> None:
    sample = data.dataset[0]
    expected = (1, model.n_mels, model.n_frames)
    if tuple(sample.shape) != expected:
        raise ValueError(f"tiles have shape {tuple(sample.shape)} but the model expects {expected}: "
                         "set model.n_mels and model.n_frames to the tile store's")


def run(config: TrainConfig, data_factory: Callable[[str], TrainData] | None = None,
        argv: list[str] | None = None) -> TrainSummary:
    """Pretrain (or resume) as configured; raises on non-finite loss, collapse or a stop signal.

    `data_factory` overrides `config.dataset_factory` (tests pass in-memory data this way).
    """
    config.validate()
    context = setup_distributed(config.device)
    previous_threads = torch.get_num_threads()
    claim = None
    scoped = contextlib.ExitStack()
    try:
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        # TF32 for the fp32 matmuls outside autocast, for this run only: restored when it returns,
        # so that tiling or embedding later in the same process computes in full float32.
        scoped.enter_context(tf32_matmuls(True))
        out_dir = Path(config.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 writes out_dir: a second run on it is refused; a killed run's temporary files go.
        claim = claim_folder(out_dir) if context.is_main else None
        data = (data_factory or resolve_data_factory(config.dataset_factory))(config.store_dir)
        data = with_background_removal(data, config.background_removal)
        data = with_active_tiles(data, config.store_dir, config.activity_top_fraction, config.activity_band_hz)
        _check_tile_shape(data, config.model)
        trainer = _Trainer(config, context, data)
        trainer.resume_if_possible()
        trainer.log = RunLog(out_dir, context.is_main, start_step=trainer.step)
        if config.compile:
            compile_for_training(trainer.method)
        model = trainer.method
        if context.distributed:
            model = DistributedDataParallel(
                trainer.method, device_ids=[context.local_rank] if context.device.type == "cuda" else None,
                broadcast_buffers=False)  # DINO's centre is all-reduced by the method itself
            # Freed when this frame returns, DDP's reducer and gloo's pairs could block the exit now
            # and then (a rank that logged its last step and never exited; cf. pytorch/pytorch#75097):
            # keep them alive, and let `main` end a torchrun rank without running their destructors.
            _KEEP_UNTIL_EXIT.extend([model, trainer])
        environment = environment_report()
        start_record = {
            "event": "start", "git_sha": environment["git_sha"], "git_dirty": environment["git_dirty"],
            "argv": argv, "config": config, "derived": trainer.derived, "resumed_from_step": trainer.resumed_from,
            "environment": environment, "wall_time": time.time(),
        }
        if context.is_main:
            write_config_json(out_dir, "pretrain", config, derived=trainer.derived,
                              git_sha=environment["git_sha"], git_dirty=environment["git_dirty"])
            logger.info("git %s%s; config %s", environment["git_sha"],
                        " (dirty)" if environment["git_dirty"] else "", json.dumps(to_jsonable(config)))
            logger.info("derived: %s", json.dumps(trainer.derived))
        trainer.log.write(start_record)
        try:
            with _SignalFlag() as stop_flag:
                summary = trainer.train(model, stop_flag)
        except (NonFiniteLossError, CollapseDetectedError) as error:
            trainer.log.write({"event": "stopped", "step": trainer.step, "reason": str(error),
                               "wall_time": time.time()})
            raise
        finally:
            trainer.log.close()
        logger.info("stopped at step %d of %d; checkpoint %s", summary.step, summary.total_steps,
                    summary.checkpoint_path)
        return summary
    finally:
        if claim is not None:
            claim.release()
        scoped.close()
        torch.set_num_threads(previous_threads)  # in-process callers (notebooks, tests) keep their setting
        if context.distributed and dist.is_initialized():
            dist.destroy_process_group()


# Objects of a distributed run whose destructors must not run at its end (see `run`).
_KEEP_UNTIL_EXIT: list[Any] = []


def _exit_rank(code: int) -> typing.NoReturn:
    """End a torchrun rank at once: outputs are saved and closed by then (checkpoints are renamed
    into place, the run log is closed); only C++ destructors of the process group are skipped."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (see the module docstring).
    Errors are one line on stderr (`core.cli.run_command`), with training's own exit codes."""
    return run_command("python -m soundscape_ssl.pretrain.train", _main, argv, exit_codes={
        NonFiniteLossError: EXIT_NON_FINITE_LOSS, CollapseDetectedError: EXIT_COLLAPSE,
        # a bad config, a missing tile store, a checkpoint of another model or not ours at all
        ValueError: EXIT_CONFIG_ERROR, FileNotFoundError: EXIT_CONFIG_ERROR})


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 alone reports progress
    config = config_from_args(args)
    config.validate()
    try:
        run(config, argv=argv)
    except StopRequested as stop:
        logger.warning("%s; checkpoint written, rerun the same command to resume", stop)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    exit_code = main()
    if _KEEP_UNTIL_EXIT:
        _exit_rank(exit_code)
    sys.exit(exit_code)
