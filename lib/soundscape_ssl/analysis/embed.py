"""Embeddings from a pretrained backbone: every tile of a tile store, or every span of audio files.

Two entry points share one forward path (normalise, backbone, pool):

* `embed_store(store_dir, checkpoint, out_dir)`: every tile of a finished tile store, row i =
  tile_id i of the store's index. Resumable and shardable like the tiling stage, and for the
  same reasons, on the same runner (`core.stage`): the work is a fixed plan of chunks of
  `chunk_tiles` consecutive tiles (it depends on the store and the config, never on the world
  size); chunk k belongs to rank k % world_size (RANK / WORLD_SIZE from torchrun; no process
  group is needed); a chunk is written to `chunks/chunk-K.npy` atomically, then its done marker
  `chunks/chunk-K.done`, and a rerun skips it once the marker matches the file; whoever finds
  every chunk done assembles the final arrays and writes `config.json` last. Output folder::

      plan.json                 what is being computed: store, checkpoint sha256, poolings ...
      chunks/chunk-000000.npy   (rows, sum of the poolings' widths) per chunk (removed at the end)
      chunks/chunk-000000.done  its done marker (size and sha256 of the chunk)
      embeddings_mean.npy       (n_tiles, embed_dim): the mean of the final patch tokens
      embeddings_cls.npy        (n_tiles, embed_dim): the final class token
      embeddings_band.npy       (n_tiles, rows * embed_dim): per-frequency-band means (if asked)
      config.json               written last: a folder without it is unfinished

  Read the arrays back with `load_embeddings(out_dir, pooling)` (a memory map).

* `embed_audio_files(paths, checkpoint, out_path)` (the `soundscape-ssl embed --audio` command):
  arbitrary audio files, e.g. a scientist's labelled clips. Each file is read through the one
  audio reader (`soundscape_ssl.core.audio`), resampled to the checkpoint's model rate and cut
  by the one window rule: every `tile_s` span (hop `tile_hop_s`) from 0 s; a span that runs past
  the end of the audio is zero-padded to a full tile, flagged (`padded`, `valid_s`) and kept
  when at least half of it is audio (so a file of 2 s gives one row for 3 s tiles, one of
  1 s none). The log-mel front end, the float16 rounding of the stored tiles and the
  normalisation are those the backbone was trained with (all three come from the checkpoint),
  so a span of a file that was also tiled into the training store gets that tile's embedding.
  Writes `EMB.npy`, `EMB.csv` (row, path, relpath, offset_s, valid_s, padded),
  `EMB.skipped.csv` (files or spans that gave no row, and files read only up to a break, with a
  reason) and `EMB.json` (provenance). Bad files are logged and skipped, bad spans too (a
  decoder error costs only the spans it touches); when nothing at all could be embedded, the
  outputs are written with zero rows and `NothingEmbedded` is raised.

Choices:

* Pooling, default "checkpoint": the pooling the checkpoint's method trained (its recorded
  `embedding_pooling`: VICReg's and DINO's `pooling`, MAE's mean of the patch tokens), so a
  scientist who embeds their own clips gets the space the method learned without knowing its
  internals; "mean" for older checkpoints that record none. All poolings come from the
  same final tokens, so each costs no compute, only disk: float32 is 1.5 KiB per tile for a
  ViT-Ti's "mean" or "cls", 2.3 % of the 64 KiB float16 tile it summarises. Which pooling is
  better depends on the method and is an open question of the study: for MAE the mean of the
  patch tokens measured far better than the class token (kNN 0.60 against 0.47, NMI 0.31
  against 0.09, DESIGN.md), while the class token is what DINO's head trains. "band" keeps the
  mean over time of each frequency row of patch tokens (8 rows x 192 = 1,536 dims for a ViT-Ti,
  6 KiB per tile): where in frequency a song lies, which a mean over all patches blurs. On the
  Acrocephalus set it raised a CPU-trained VICReg's kNN accuracy from 0.46 (mean) to 0.58
  (notebook 07). "band_active" is "band" over the tile's active time columns only (mean
  model input at or above the tile's median column): a short call is not averaged with the
  background around it. `pooling` is one name, "both" (mean, cls), "all" (every pooling) or a
  comma list. Storing several lets every later step compare them without a second pass over the
  archive. `EMB.npy` of the audio command holds the first pooling asked for (POOLINGS order).
* Output dtype, default float32. float16 would halve a file that is already small next to the
  tile store and is read by KMeans / UMAP in float32 anyway; float32 keeps the CPU (fp32)
  results exact and rules out float16 overflow. float16 is available for very large archives
  (values are checked: an overflow is an error, not a silent inf).
* Precision: bf16 autocast on CUDA (as in training), fp32 on CPU. Embeddings are deterministic
  for a given store, checkpoint, config, batch size and device type; the precision is pinned in
  `plan.json`, so a resume never mixes bf16 and fp32 chunks.
* Normalisation: the checkpoint's (the statistics the backbone was trained with), through
  `tiles.normalize_tiles` exactly as `TileDataset` applies them in training, on the float16 dB
  values as stored, followed by the background removal the checkpoint was trained with (if any).
  `normalization="store"` uses the store's own statistics instead (needed for checkpoints trained
  on in-memory data, which carry none); the background removal still follows the checkpoint.
* Throughput on GPU: reader threads read contiguous batches of float16 tiles ahead of the
  model (see `_prefetched`) into pinned host memory, non-blocking copies take them to the GPU,
  normalisation runs there, and finished chunks are copied back and written by a background
  thread while the GPU goes on, so the main loop never waits for the disk and synchronises with
  the GPU only once (to time the first batch). `compile=True` wraps the forward in
  `torch.compile`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..core.audio import DEFAULT_BLOCK_S, AudioFile, AudioOpenError, WindowLoss, read_windows
from ..recordings.archive import DEFAULT_EXTENSIONS, list_audio_files, probe_recording
from ..pretrain.checkpoint import load_backbone
from ..pretrain.models import SpectrogramViT
from ..core.cli import CommandParser, run_command
from ..core.config import add_config_options, config_from_options
from ..core.provenance import to_jsonable
from ..core.stage import (StagePlan, StageRun, atomic_save_npy, atomic_write, atomic_write_text,
                          file_sha256, reserve_space, resolve_device, resolve_rank,
                          tf32_matmuls)
from ..pretrain.pooling import parse_poolings
from ..tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig
from ..tiles.store import TileStore, input_normalization, normalize_tiles

logger = logging.getLogger(__name__)

STAGE = "embed"
AUDIO_STAGE = "embed_audio"
PRECISIONS = ("auto", "bf16", "fp32")
CHECKPOINT_POOLING = "checkpoint"
OUTPUT_DTYPES = ("float32", "float16")
NORMALIZATIONS = ("checkpoint", "store")
CHUNKS_DIR = "chunks"
CONFIG_FILE = "config.json"
# Audio formats looked for in folders given to the audio command (any file named explicitly is tried).
AUDIO_EXTENSIONS = tuple(DEFAULT_EXTENSIONS) + (".ogg", ".oga", ".aif", ".aiff")


@dataclass(frozen=True)
class EmbedConfig:
    """How tiles are embedded. Serialisable with `dataclasses.asdict`; see the module docstring."""

    pooling: str = "checkpoint"      # "checkpoint": the pooling the checkpoint's method trained
                                     # (its `embedding_pooling`; "mean" when it records none);
                                     # or "mean" (patch tokens), "cls" (class token), "band"
                                     # (per-frequency-row means), "band_active" (the same over
                                     # active columns), "both" (mean, cls), "all" or
                                     # a comma list such as "mean,band"
    batch_size: int = 512            # tiles per forward pass
    chunk_tiles: int = 8192          # tiles per resumable unit of work (store mode)
    device: str = "auto"             # "auto" (CUDA when available), "cpu", "cuda" (cuda:LOCAL_RANK)
    precision: str = "auto"          # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    output_dtype: str = "float32"    # dtype of the written arrays: "float32" or "float16"
    normalization: str = "checkpoint"  # statistics: "checkpoint" (training's) or "store" (store mode)
    num_workers: int = 4             # tile-reading threads (store mode); 0 reads in the main thread
    compile: bool = False            # torch.compile the forward pass (GPU; a minute of warm-up)

    def __post_init__(self) -> None:
        if self.pooling != CHECKPOINT_POOLING:
            parse_poolings(self.pooling)  # a clear error for an unknown name, at construction
        if self.batch_size <= 0 or self.chunk_tiles <= 0:
            raise ValueError(f"batch_size and chunk_tiles must be positive, got "
                             f"{self.batch_size}, {self.chunk_tiles}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {self.output_dtype!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.normalization!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @property
    def poolings(self) -> tuple[str, ...]:
        """The poolings computed, in POOLINGS order (resolve "checkpoint" with `for_checkpoint`)."""
        if self.pooling == CHECKPOINT_POOLING:
            raise ValueError('pooling "checkpoint" names no pooling until a checkpoint is known: '
                             "use EmbedConfig.for_checkpoint(metadata)")
        return parse_poolings(self.pooling)

    def for_checkpoint(self, metadata: dict[str, Any]) -> "EmbedConfig":
        """This config with pooling "checkpoint" replaced by the pooling the checkpoint's method
        trained (`embedding_pooling`), or "mean" for a checkpoint that records none."""
        if self.pooling != CHECKPOINT_POOLING:
            return self
        recorded = metadata.get("embedding_pooling")
        if recorded is None:
            logger.info("the checkpoint records no trained pooling (older checkpoint): embedding "
                        "the mean of the patch tokens")
        return dataclasses.replace(self, pooling=recorded or "mean")


def pooling_dims(model: SpectrogramViT, poolings: Sequence[str]) -> dict[str, int]:
    """{pooling: width} in the given order: embed_dim for "mean" and "cls", rows x embed_dim
    for the band poolings."""
    return {name: int(model.pooling_dim(name)) for name in poolings}


def split_poolings(values: np.ndarray, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """(rows, sum of widths) concatenated poolings -> {pooling: (rows, width)} views."""
    bounds = np.cumsum([0, *dims.values()])
    if values.shape[-1] != bounds[-1]:
        raise ValueError(f"{values.shape[-1]} columns do not hold poolings of widths {dims}")
    return {name: values[..., start:stop] for name, start, stop in zip(dims, bounds[:-1], bounds[1:])}


def embeddings_file_name(pooling: str) -> str:
    """File name of one pooling's array in a store-mode output folder."""
    return f"embeddings_{pooling}.npy"


def resolve_compute(config: EmbedConfig) -> tuple[torch.device, str]:
    """(device, precision) for this process: "auto" device is CUDA when available (cuda:LOCAL_RANK
    under torchrun, made the current device); "auto" precision is bf16 on CUDA, fp32 elsewhere."""
    device = resolve_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)    # this rank's GPU is also where pinning and events go
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return device, precision


# ----------------------------------------------------------------------------------------------
# The forward pass shared by both modes


class TileEmbedder:
    """Normalise dB tiles, run the backbone (bf16 autocast or fp32), concatenate the poolings.

    The forward path of both modes (and of the benchmark's model-only baseline); the model is
    moved to `device` and put in eval mode.
    """

    def __init__(self, model: SpectrogramViT, device: torch.device, precision: str,
                 poolings: Sequence[str], normalization: dict[str, float], compile: bool) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.poolings = tuple(poolings)
        self.normalization = input_normalization(normalization)
        self.embed_dim = int(model.embed_dim)
        self.pooling_dims = pooling_dims(model, self.poolings)
        self.output_dim = sum(self.pooling_dims.values())
        self._pooled = torch.compile(self._pooled_eager) if compile else self._pooled_eager

    def _autocast(self):
        """bf16 autocast on the device when that is the precision, else nothing."""
        return (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None else contextlib.nullcontext())

    def _pooled_eager(self, tiles: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            pooled = self.model.embed(tiles)
        return torch.cat([getattr(pooled, name).float() for name in self.poolings], dim=1)

    @torch.inference_mode()
    def __call__(self, tiles_db: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, n_frames) dB tiles (float16 as stored) on the device -> (B, output_dim)
        float32: the poolings side by side, in `poolings` order (`split_poolings` separates them).

        Normalised by `tiles.normalize_tiles`, the function training's `TileDataset` uses, outside
        the compiled region so that its arithmetic is exactly training's. Float32 operations are
        float32, not TF32 (whatever the process's switches were; restored after), so that "fp32"
        on a GPU matches the CPU.
        """
        with tf32_matmuls(False):
            return self._pooled(normalize_tiles(tiles_db, self.normalization).unsqueeze(1))

    @torch.inference_mode()
    def token_grid(self, tiles_db: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, n_frames) dB tiles -> (B, rows, columns, embed_dim) float32 final patch
        tokens (`SpectrogramViT.token_grid`), normalised and computed as `__call__`'s poolings are
        (never compiled: a search re-ranks a few hundred tiles)."""
        with tf32_matmuls(False), self._autocast():
            tiles = normalize_tiles(tiles_db, self.normalization).unsqueeze(1)
            return self.model.token_grid(self.model.forward_features(tiles)).float()


class _LoadedCheckpoint(NamedTuple):
    model: SpectrogramViT
    metadata: dict[str, Any]
    identity: dict[str, Any]     # what config.json records about the checkpoint


def _load_checkpoint(checkpoint: str | os.PathLike) -> _LoadedCheckpoint:
    """The backbone and identity of a checkpoint; `load_backbone` says what a path that is not
    one is (missing, a folder, audio, text, a refused pickle ...)."""
    path = Path(checkpoint).resolve()
    model, metadata = load_backbone(path, map_location="cpu")
    identity = {
        "path": str(path),
        "sha256": file_sha256(path),
        **{key: metadata.get(key) for key in ("method", "step", "epoch", "package_version", "git",
                                              "backbone_config", "spectrogram_config",
                                              "normalization")},
    }
    return _LoadedCheckpoint(model, metadata, identity)


def _check_tile_shape(model: SpectrogramViT, tile_shape: tuple[int, int], source: str) -> None:
    expected = (model.config.n_mels, model.config.n_frames)
    if tuple(tile_shape) != expected:
        raise ValueError(f"{source} has {tile_shape[0]} x {tile_shape[1]} tiles but the backbone "
                         f"was built for {expected[0]} x {expected[1]}")


def _to_output(values: np.ndarray, output_dtype: str, where: str) -> np.ndarray:
    """float32 embeddings -> the output dtype; non-finite rows are reported, float16 overflow refused."""
    finite = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
    if not finite.all():
        logger.warning("%s: %d of %d rows have NaN/inf embeddings (kept, to keep rows aligned)",
                       where, int(np.sum(~finite)), len(values))
    if output_dtype == "float32":
        return np.ascontiguousarray(values, dtype=np.float32)
    converted = values.astype(np.float16)
    overflow = np.isfinite(values) & ~np.isfinite(converted)
    if overflow.any():
        raise ValueError(f"{where}: {int(overflow.sum())} embedding values exceed the float16 range "
                         "(max 65504); use output_dtype='float32'")
    return converted


# ----------------------------------------------------------------------------------------------
# Store mode


@dataclass
class EmbedSummary:
    """What one `embed_store` call did (per rank). Times in seconds."""

    out_dir: str
    rank: int
    world_size: int
    n_tiles: int
    n_chunks: int
    chunks_assigned: int
    chunks_already_done: int
    chunks_written: int
    tiles_embedded: int
    finished: bool                   # the final arrays and config.json exist
    device: str
    precision: str
    setup_s: float                   # checkpoint load and hash, store open, plan
    first_batch_s: float             # loop start to the first batch embedded (reader start-up,
                                     # torch.compile), included in embed_s
    first_batch_tiles: int
    embed_s: float                   # the streaming loop, up to the last chunk on disk
    assemble_s: float                # final arrays (0 when another rank or an earlier run did it)
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One resumable unit of store-mode work, written to `chunk_path(out_dir, chunk_id)`."""

    chunk_id: int
    start: int                       # tile ids [start, stop)
    stop: int


def plan_chunks(n_tiles: int, chunk_tiles: int) -> list[Chunk]:
    """The fixed split of tile ids [0, n_tiles) into chunks of `chunk_tiles` (the last may be short)."""
    return [Chunk(k, start, min(start + chunk_tiles, n_tiles))
            for k, start in enumerate(range(0, n_tiles, chunk_tiles))]


def chunk_path(out_dir: str | os.PathLike, chunk_id: int) -> Path:
    return Path(out_dir) / CHUNKS_DIR / f"chunk-{chunk_id:06d}.npy"


def _store_plan(store: TileStore, loaded: _LoadedCheckpoint, config: EmbedConfig, precision: str,
                normalization: dict[str, float], n_chunks: int) -> dict[str, Any]:
    """plan.json: everything the bytes of the result depend on, and its fingerprint."""
    description = {
        "stage": STAGE,
        "store": {"path": str(store.store_dir.resolve()),
                  "fingerprint": store.metadata.get("fingerprint"), "n_tiles": len(store)},
        "checkpoint_sha256": loaded.identity["sha256"],
        "poolings": list(config.poolings),
        "embed_dim": int(loaded.model.embed_dim),
        "chunk_tiles": config.chunk_tiles,
        "n_chunks": n_chunks,
        "output_dtype": config.output_dtype,
        "precision": precision,
        "normalization": normalization,
    }
    # The store path is excluded from the fingerprint: a moved store is the same input.
    pinned = {key: value for key, value in description.items() if key != "store"}
    pinned["store"] = {key: description["store"][key] for key in ("fingerprint", "n_tiles")}
    description["fingerprint"] = hashlib.sha256(
        json.dumps(pinned, sort_keys=True).encode()).hexdigest()
    return description


def _stage_plan(description: dict[str, Any]) -> StagePlan:
    """The runner's view of plan.json: chunks `chunks/chunk-NNNNNN.*`, removed once assembled."""
    return StagePlan(STAGE, description, int(description["n_chunks"]), unit_noun="chunk",
                     units_dir=CHUNKS_DIR, title="embeddings", unpinned=("store.path",),
                     keep_units=False)


def _resolve_normalization(config: EmbedConfig, store: TileStore,
                           metadata: dict[str, Any]) -> dict[str, Any]:
    from_checkpoint = metadata.get("normalization")
    # The background removal is part of the model's input, whichever statistics are used.
    background = (from_checkpoint or {}).get("background") or "none"
    if config.normalization == "store":
        return input_normalization(store.normalization, background)
    if from_checkpoint is None:
        raise ValueError("the checkpoint records no normalisation statistics (trained on in-memory "
                         "data?); pass normalization='store' to use the tile store's")
    normalization = input_normalization(from_checkpoint)
    if not (math.isclose(normalization["mean"], store.normalization["mean"], abs_tol=1e-6)
            and math.isclose(normalization["std"], store.normalization["std"], abs_tol=1e-6)):
        logger.info("normalising with the checkpoint's statistics (mean %.3f dB, std %.3f dB), not "
                    "this store's (%.3f, %.3f): the backbone was trained on other tiles",
                    normalization["mean"], normalization["std"], store.normalization["mean"],
                    store.normalization["std"])
    return normalization


def _check_spectrogram_config(store: TileStore, metadata: dict[str, Any]) -> None:
    """Refuse a store whose front end differs from the one the checkpoint was trained on."""
    trained = metadata.get("spectrogram_config")
    if trained is None:
        logger.warning("the checkpoint records no spectrogram config: cannot check that the store's "
                       "tiles are made the way the backbone's training tiles were")
        return
    trained_config = SpectrogramConfig.from_dict(trained).to_dict()
    store_config = store.config.to_dict()
    differing = sorted(key for key in store_config if store_config[key] != trained_config.get(key))
    if differing:
        details = ", ".join(f"{key}: store {store_config[key]!r} vs checkpoint "
                            f"{trained_config.get(key)!r}" for key in differing)
        raise ValueError(f"the store's spectrogram config differs from the checkpoint's ({details}); "
                         "tile the audio with the checkpoint's config")


class _Batch(NamedTuple):
    chunk_id: int
    start: int                       # tile ids [start, stop)
    stop: int


def _batches(chunks: Sequence[Chunk], batch_size: int) -> list[_Batch]:
    """Consecutive batches of each chunk's tiles; a batch never crosses a chunk boundary."""
    return [_Batch(chunk.chunk_id, start, min(start + batch_size, chunk.stop))
            for chunk in chunks for start in range(chunk.start, chunk.stop, batch_size)]


def _prefetched(store: TileStore, batches: Sequence[_Batch], num_workers: int,
                pin_memory: bool) -> Iterator[tuple[_Batch, torch.Tensor]]:
    """(batch, float16 tiles) in order, read by `num_workers` threads up to 2 x num_workers
    batches ahead (0: read in the calling thread), in pinned memory when `pin_memory`.

    Threads rather than DataLoader processes: reading is a memory copy out of memory-mapped
    shards (`TileStore.read_range`), during which numpy releases the GIL, as torch does while
    pinning, so threads keep up without shared-memory transfers (one copy fewer per tile, and no
    dependence on the size of /dev/shm, which containers often keep at 64 MiB). Each thread
    reads through its own copy of the store (its own LRU of open shards).
    """
    def read(reader: TileStore, batch: _Batch) -> torch.Tensor:
        tiles = torch.from_numpy(reader.read_range(batch.start, batch.stop))
        return tiles.pin_memory() if pin_memory else tiles

    if num_workers == 0:
        for batch in batches:
            yield batch, read(store, batch)
        return
    per_thread = threading.local()

    def read_in_thread(batch: _Batch) -> torch.Tensor:
        if not hasattr(per_thread, "store"):
            per_thread.store = copy.copy(store)  # TileStore's pickling state: no open shards
        return read(per_thread.store, batch)

    pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="embed-reader")
    pending: collections.deque = collections.deque()
    upcoming = iter(batches)
    try:
        for batch in itertools.islice(upcoming, 2 * num_workers):
            pending.append((batch, pool.submit(read_in_thread, batch)))
        while pending:
            batch, future = pending.popleft()
            tiles = future.result()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(read_in_thread, following)))
            yield batch, tiles
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _commit_chunk(run: StageRun, chunk_id: int, values: np.ndarray, output_dtype: str) -> None:
    """Write one finished chunk (rows, sum of the poolings' widths) and its done marker."""
    values = _to_output(values, output_dtype, f"chunk {chunk_id}")
    with run.unit(chunk_id) as unit, \
            open(unit.output(chunk_path(run.folder, chunk_id), expected_bytes=values.nbytes + 128),
                 "wb") as handle:
        np.save(handle, values)


class _ChunkWriter:
    """Commits finished chunks off the main thread so the GPU never waits for the disk.

    The device-to-host copy is queued on the compute stream into pinned memory (non-blocking), a
    worker thread waits for it and writes the file. One commit in flight at a time: memory stays
    bounded and an error (e.g. a full disk) surfaces at the next chunk.
    """

    def __init__(self, run: StageRun, output_dtype: str) -> None:
        self.run, self.output_dtype = run, output_dtype
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                           thread_name_prefix="embed-writer")
        self._pending: concurrent.futures.Future | None = None

    def submit(self, chunk_id: int, rows: torch.Tensor) -> None:
        self.wait()
        ready = None
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(rows.device))   # the stream of the copy
        else:
            host = rows
        self._pending = self._pool.submit(self._write, chunk_id, host, ready)

    def _write(self, chunk_id: int, host: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()
        _commit_chunk(self.run, chunk_id, host.numpy(), self.output_dtype)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def embed_store(store_dir: str | os.PathLike, checkpoint: str | os.PathLike,
                out_dir: str | os.PathLike, config: EmbedConfig | None = None,
                rank: int | None = None, world_size: int | None = None,
                show_progress: bool = True) -> EmbedSummary:
    """Embed this rank's chunks of a tile store into `out_dir`; assemble if every chunk is done.

    Row i of each output array is tile_id i of the store's index. Rank and world size default
    to RANK / WORLD_SIZE (torchrun), else a single process. Safe to rerun after a kill: finished
    chunks are kept, the others redone; a finished folder is left as it is. A folder started with
    another store, checkpoint or config is refused.
    """
    started = time.perf_counter()
    config = config or EmbedConfig()
    rank, world_size = resolve_rank(rank, world_size)
    device, precision = resolve_compute(config)
    out_dir = Path(out_dir)
    store = TileStore(store_dir)
    loaded = _load_checkpoint(checkpoint)
    config = config.for_checkpoint(loaded.metadata)
    _check_tile_shape(loaded.model, store.tile_shape, f"store {store_dir}")
    _check_spectrogram_config(store, loaded.metadata)
    normalization = _resolve_normalization(config, store, loaded.metadata)
    chunks = plan_chunks(len(store), config.chunk_tiles)
    plan = _store_plan(store, loaded, config, precision, normalization, len(chunks))
    with StageRun(out_dir, _stage_plan(plan), rank, world_size) as run:
        assigned = [chunks[k] for k in run.assigned]
        todo = [chunks[k] for k in run.todo]
        logger.info("rank %d/%d: %d of %d chunks to embed (%d already done) on %s, %s", rank,
                    world_size, len(todo), len(assigned), len(assigned) - len(todo), device,
                    precision)
        setup_s = time.perf_counter() - started

        loop_started = time.perf_counter()
        tiles_embedded, first_batch_s, first_batch_tiles = 0, 0.0, 0
        if todo:
            embedder = TileEmbedder(loaded.model, device, precision, config.poolings,
                                    normalization, config.compile)
            tiles_embedded, first_batch_s, first_batch_tiles = _embed_chunks(
                store, todo, embedder, run, config, device, show_progress and rank == 0,
                f"embed rank {rank}/{world_size}")
        embed_s = time.perf_counter() - loop_started

        assemble_s = 0.0
        finished = run.finished
        if not finished and run.all_units_done():
            assemble_started = time.perf_counter()
            dims = pooling_dims(loaded.model, plan["poolings"])
            run.finalize(lambda: _assemble(out_dir, plan, chunks, loaded.identity, dims, config,
                                           device, precision))
            finished = True
            assemble_s = time.perf_counter() - assemble_started
        elif not finished:
            logger.info("rank %d: my chunks are done; another rank assembles the arrays", rank)
    return EmbedSummary(str(out_dir), rank, world_size, len(store), len(chunks), len(assigned),
                        len(assigned) - len(todo), len(todo), tiles_embedded, finished,
                        str(device), precision, setup_s, first_batch_s, first_batch_tiles, embed_s,
                        assemble_s,
                        time.perf_counter() - started)


def _embed_chunks(store: TileStore, todo: Sequence[Chunk], embedder: TileEmbedder, run: StageRun,
                  config: EmbedConfig, device: torch.device, show_progress: bool,
                  description: str) -> tuple[int, float, int]:
    """Stream the tiles of `todo` through the backbone, committing each chunk when complete.

    Returns (tiles embedded, seconds to the first embedded batch, tiles in it).
    """
    started = time.perf_counter()
    first_batch_s, first_batch_tiles = 0.0, 0
    by_id = {chunk.chunk_id: chunk for chunk in todo}
    batches = _prefetched(store, _batches(todo, config.batch_size), config.num_workers,
                          pin_memory=device.type == "cuda")
    writer = _ChunkWriter(run, config.output_dtype)
    progress = tqdm(total=sum(c.stop - c.start for c in todo), unit="tile", desc=description,
                    dynamic_ncols=True, disable=not show_progress)
    rows: torch.Tensor | None = None
    current: Chunk | None = None
    tiles_embedded = 0
    try:
        for (chunk_id, start, stop), tiles in batches:
            if current is None or chunk_id != current.chunk_id:
                current = by_id[chunk_id]
                rows = torch.empty((current.stop - current.start, embedder.output_dim),
                                   dtype=torch.float32, device=device)
            tiles = tiles.to(device, non_blocking=True)
            rows[start - current.start:stop - current.start] = embedder(tiles)
            if not first_batch_tiles:
                if device.type == "cuda":   # the only synchronisation: timing of the warm-up
                    torch.cuda.synchronize(device)
                first_batch_s, first_batch_tiles = time.perf_counter() - started, stop - start
            tiles_embedded += stop - start
            progress.update(stop - start)
            if stop == current.stop:
                writer.submit(current.chunk_id, rows)
                rows, current = None, None
    finally:
        batches.close()
        progress.close()
        writer.close()
    return tiles_embedded, first_batch_s, first_batch_tiles


def _assemble(out_dir: Path, plan: dict[str, Any], chunks: Sequence[Chunk],
              checkpoint_identity: dict[str, Any], dims: dict[str, int], config: EmbedConfig,
              device: torch.device, precision: str) -> dict[str, Any]:
    """Concatenate the chunks into one array per pooling; returns config.json's fields.

    The runner calls it once, under its finalise lock, and writes config.json after it.
    """
    n_tiles = plan["store"]["n_tiles"]
    poolings = plan["poolings"]
    dtype = np.dtype(plan["output_dtype"])
    with contextlib.ExitStack() as writes:
        temporaries = {name: writes.enter_context(atomic_write(
                           out_dir / embeddings_file_name(name),
                           expected_bytes=n_tiles * dims[name] * dtype.itemsize))
                       for name in poolings}
        if n_tiles == 0:   # a memory map cannot be empty
            for name in poolings:
                with open(temporaries[name], "wb") as handle:
                    np.save(handle, np.zeros((0, dims[name]), dtype))
        else:
            arrays = {}
            for name in poolings:
                arrays[name] = np.lib.format.open_memmap(temporaries[name], mode="w+", dtype=dtype,
                                                         shape=(n_tiles, dims[name]))
                reserve_space(temporaries[name], temporaries[name].stat().st_size)
            for chunk in chunks:
                values = np.load(chunk_path(out_dir, chunk.chunk_id), mmap_mode="r")
                expected = (chunk.stop - chunk.start, sum(dims.values()))
                if values.shape != expected or values.dtype != dtype:
                    raise RuntimeError(f"chunk {chunk.chunk_id} holds {values.dtype} "
                                       f"{values.shape}, expected {dtype} {expected}; delete it "
                                       "and rerun")
                for name, part in split_poolings(values, dims).items():
                    arrays[name][chunk.start:chunk.stop] = part
            for array in arrays.values():
                array.flush()
            arrays.clear()
    logger.info("assembled %s: %d tiles, poolings %s", out_dir, n_tiles,
                ", ".join(f"{name} ({dims[name]} dims)" for name in poolings))
    return dict(
        config=config, store=plan["store"], checkpoint=checkpoint_identity,
        plan_fingerprint=plan["fingerprint"], normalization=plan["normalization"],
        precision=precision, device_type=device.type,
        arrays={name: {"file": embeddings_file_name(name), "shape": [n_tiles, dims[name]],
                       "dtype": dtype.name} for name in poolings},
        rows="row i = tile_id i of the store's index.parquet",
        default_pooling="mean" if "mean" in poolings else poolings[0])


def read_embeddings_metadata(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a finished store-mode embedding folder; a clear error otherwise."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out_dir} holds no finished embeddings "
                                "(run the embedding to the end)")
    metadata = json.loads(path.read_text())
    if metadata.get("stage") != STAGE:
        raise ValueError(f"{path} belongs to stage {metadata.get('stage')!r}, not {STAGE!r}")
    return metadata


def load_embeddings(out_dir: str | os.PathLike, pooling: str = "mean") -> np.ndarray:
    """One pooling's (n_tiles, width) array of a finished folder, memory-mapped read-only.

    Row i is tile_id i of the store's index (`TileStore(store).index`). The default, "mean",
    is the pooling measured better for MAE (see the module docstring).
    """
    metadata = read_embeddings_metadata(out_dir)
    arrays = metadata["arrays"]
    if pooling not in arrays:
        raise ValueError(f"{out_dir} holds poolings {sorted(arrays)}, not {pooling!r}")
    return np.load(Path(out_dir) / arrays[pooling]["file"], mmap_mode="r")


# ----------------------------------------------------------------------------------------------
# Audio-file mode


SKIPPED_COLUMNS = ("path", "relpath", "reason", "detail", "offset_s", "n_spans_lost")
ROW_COLUMNS = ("row", "path", "relpath", "offset_s", "valid_s", "padded")


@dataclass
class AudioEmbedSummary:
    """What one `embed_audio_files` call wrote."""

    out_path: str
    csv_path: str
    skipped_path: str
    n_files: int                     # audio files found
    n_files_embedded: int            # files that gave at least one row
    n_rows: int
    n_padded_rows: int
    n_skip_records: int
    device: str
    precision: str
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NothingEmbedded(ValueError):
    """`embed_audio_files` found no audio to embed: no file given exists, a folder holds no audio
    file, or no file gave a single span. The skip table says why for each input."""


class AudioInput(NamedTuple):
    """An audio file to embed."""

    path: str                        # absolute
    relpath: str                     # relative to the folder it was found in, or the file name


class _Skip(NamedTuple):
    reason: str
    detail: str
    offset_s: float                  # start of the first lost span; NaN for a whole file
    n_spans: int


class _SpanBlock(NamedTuple):
    """Consecutive spans of one file: their offsets, valid lengths and float16 dB tiles."""

    offset_s: np.ndarray
    valid_s: np.ndarray
    padded: np.ndarray
    tiles_db: torch.Tensor           # (k, n_mels, n_frames) float16 on the compute device


def discover_audio(paths: Sequence[str | os.PathLike]) -> tuple[list[AudioInput], list[tuple]]:
    """Files named explicitly, and audio files (AUDIO_EXTENSIONS) under folders, sorted by path.

    Returns the inputs and skip rows (path, relpath, reason, detail) for paths that do not exist
    or folders that cannot be listed.
    """
    inputs: dict[str, AudioInput] = {}
    problems: list[tuple] = []
    for given in paths:
        try:
            path = Path(given).expanduser().resolve()
        except (OSError, RuntimeError) as error:     # e.g. a symbolic link loop
            problems.append((str(given), Path(given).name, "unreadable", str(error)))
            continue
        if path.is_dir():
            candidates, folder_problems = list_audio_files(path, AUDIO_EXTENSIONS)
            for candidate in candidates:
                inputs.setdefault(candidate.path, AudioInput(candidate.path, candidate.relpath))
            problems += [(p[0], p[1], p[3], p[4]) for p in folder_problems]
        elif path.is_file():
            inputs.setdefault(str(path), AudioInput(str(path), path.name))
        else:
            problems.append((str(path), Path(given).name, "not_found", "no such file or folder"))
    return sorted(inputs.values()), problems


def span_numbers(offsets_s: Sequence[float], config: SpectrogramConfig, what: str) -> np.ndarray:
    """Grid numbers j (span j starts at j * tile_hop_s) of the given offsets, sorted and unique;
    ValueError when an offset is not on the grid (1 microsecond tolerance)."""
    offsets = np.asarray(offsets_s, dtype=np.float64)
    numbers = np.rint(offsets / config.tile_hop_s).astype(np.int64)
    off_grid = np.abs(numbers * config.tile_hop_s - offsets) > 1e-6
    if off_grid.any() or (numbers < 0).any():
        bad = offsets[off_grid | (numbers < 0)][0]
        raise ValueError(f"{what}: offset {bad:g} s is not a span of the grid of hop {config.tile_hop_s:g} s")
    return np.unique(numbers)


def _file_spans(path: str, config: SpectrogramConfig, front_end: LogMelFrontEnd,
                device: torch.device, skips: list[_Skip],
                numbers: np.ndarray | None = None) -> Iterator[_SpanBlock]:
    """Every span of one file (or only spans `numbers` of its grid, sorted) as float16 dB tiles,
    block by block; problems appended to `skips`.

    The file is classified as the inventory classifies it (`archive.probe_recording`: a file cut
    short is read up to the break and noted) and read through the one reader,
    `soundscape_ssl.core.audio`, with the window rule of its tiles: span j covers model-rate
    samples [j * hop, j * hop + tile); a last span that runs past the end of the audio is
    zero-padded (exact zeros) and kept when at least half of it is audio. So a span of a file
    that was also tiled into a store is that store's tile, to the bit.
    """
    recording = probe_recording(path)
    if not recording.readable:
        skips.append(_Skip(recording.reason, recording.detail, math.nan, 0))
        return
    if recording.damage:
        skips.append(_Skip(recording.damage, recording.damage_detail, math.nan, 0))
    rate_in = recording.sample_rate_hz
    if not config.accepts_sample_rate(rate_in):
        skips.append(_Skip("unsupported_sample_rate",
                           f"{rate_in} Hz outside {config.min_input_sample_rate_hz}-"
                           f"{config.max_input_sample_rate_hz} Hz", math.nan, 0))
        return
    rule = config.window_rule
    n_spans = rule.count(recording.frames, rate_in)
    if n_spans == 0:
        skips.append(_Skip("no_frames", "the file holds no audio frames", math.nan, 0))
        return
    try:
        audio = AudioFile(path, frames=recording.frames,
                          piece_s=min(config.tile_hop_s, config.tile_s))
    except AudioOpenError as error:
        skips.append(_Skip("unreadable", str(error), math.nan, 0))
        return
    losses: list[WindowLoss] = []
    if numbers is None:
        numbers = np.arange(n_spans, dtype=np.int64)
    else:   # requested spans the window rule does not keep for this file give no row
        numbers = numbers[numbers < n_spans]
    with audio:
        for batch in read_windows(audio, rule, numbers, numbers * rule.hop_samples, losses,
                                  block_s=DEFAULT_BLOCK_S, device=device,
                                  lowpass_filter_width=config.resample_lowpass_filter_width,
                                  rolloff=config.resample_rolloff):
            tiles_db = front_end(batch.waveforms).log_mel_db.to(torch.float16)  # as the store keeps tiles
            yield _SpanBlock(batch.offset_s, batch.valid_s, batch.padded, tiles_db)
    skips.extend(_Skip(loss.reason, loss.detail, loss.offset_s, len(loss.numbers))
                 for loss in losses)


def audio_tiles_db(path: str | os.PathLike, spectrogram: SpectrogramConfig,
                   offsets_s: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The float16 dB tiles of a file's spans (all, or those starting at `offsets_s`, which must lie
    on the grid of `tile_hop_s`), cut exactly as the audio command cuts them, on the CPU: (offsets
    in s, (n, n_mels, n_frames) tiles, problems as "reason: detail" lines). For spaces computed
    from the tiles themselves (the log-mel statistics), which need a file's tiles, not a backbone."""
    path = str(Path(path).expanduser().resolve())
    numbers = None if offsets_s is None else span_numbers(offsets_s, spectrogram, path)
    device = torch.device("cpu")
    skips: list[_Skip] = []
    offsets, tiles = [], []
    for block in _file_spans(path, spectrogram, LogMelFrontEnd(spectrogram, device), device, skips, numbers):
        offsets.append(block.offset_s)
        tiles.append(block.tiles_db.numpy())
    shape = (0, spectrogram.n_mels, spectrogram.n_frames)
    return (np.concatenate(offsets) if offsets else np.zeros(0),
            np.concatenate(tiles) if tiles else np.zeros(shape, np.float16),
            [f"{skip.reason}: {skip.detail}" for skip in skips])


def _audio_configs(loaded: _LoadedCheckpoint) -> tuple[SpectrogramConfig, dict[str, Any]]:
    """The front end and normalisation the backbone was trained with; errors when missing."""
    metadata = loaded.metadata
    if metadata.get("spectrogram_config") is None:
        raise ValueError(f"checkpoint {loaded.identity['path']} records no spectrogram config, so "
                         "audio cannot be turned into tiles the way its training tiles were")
    if metadata.get("normalization") is None:
        raise ValueError(f"checkpoint {loaded.identity['path']} records no normalisation "
                         "statistics, so tiles cannot be normalised the way its training tiles were")
    spectrogram = SpectrogramConfig.from_dict(metadata["spectrogram_config"])
    _check_tile_shape(loaded.model, (spectrogram.n_mels, spectrogram.n_frames),
                      "the checkpoint's spectrogram config")
    return spectrogram, input_normalization(metadata["normalization"])


def checkpoint_embedder(checkpoint: str | os.PathLike, device: str = "cpu") -> TileEmbedder:
    """A `TileEmbedder` of a checkpoint's backbone with the normalisation it was trained with
    (what `embed_audio_files` embeds audio with), all poolings, uncompiled."""
    config = EmbedConfig(device=device, pooling="all")
    device_resolved, precision = resolve_compute(config)
    loaded = _load_checkpoint(checkpoint)
    _, normalization = _audio_configs(loaded)
    return TileEmbedder(loaded.model, device_resolved, precision, config.poolings, normalization, compile=False)


def compute_used(record_path: str | os.PathLike) -> dict[str, Any]:
    """{device, precision, compile} an embedding was made with, from its provenance record: a
    store embedding's `config.json` (give the file or its folder) or the audio command's EMB.json.
    The record is the product's own, so a folder made earlier (and reused) reports its maker."""
    record_path = Path(record_path)
    if record_path.is_dir():
        record_path = record_path / "config.json"
    record = json.loads(record_path.read_text())
    return {"device": record["device_type"], "precision": record["precision"],
            "compile": bool(record["config"].get("compile", False))}


def audio_output_paths(out_path: str | os.PathLike, poolings: Sequence[str]) -> dict[str, Path]:
    """Files the audio command writes for `out_path` (EMB.npy): one array per pooling, the row
    table, the skip table and the provenance record. The first pooling's array is `out_path`."""
    out_path = Path(out_path)
    stem = out_path.with_suffix("")
    paths = {"csv": stem.with_name(stem.name + ".csv"),
             "skipped": stem.with_name(stem.name + ".skipped.csv"),
             "json": stem.with_name(stem.name + ".json")}
    for position, name in enumerate(poolings):
        paths[name] = out_path if position == 0 else stem.with_name(f"{stem.name}.{name}.npy")
    return paths


def embed_audio_files(paths: Sequence[str | os.PathLike], checkpoint: str | os.PathLike,
                      out_path: str | os.PathLike, config: EmbedConfig | None = None,
                      show_progress: bool = True,
                      spans: Mapping[str, Sequence[float]] | None = None) -> AudioEmbedSummary:
    """Embed every span of the given audio files (or of the audio under given folders).

    `spans` ({file: offsets in s}) restricts a file to those spans of its grid (validation
    embeds only the windows it scores); a file it does not name is embedded whole.

    `out_path` (EMB.npy) receives the (n_rows, width) array of the first pooling (in `pooling.POOLINGS`
    order: the mean of the patch tokens when it is asked for); the others go to EMB.<pooling>.npy
    (with pooling="both" the class tokens to EMB.cls.npy). EMB.csv names the file and offset of
    each row; EMB.skipped.csv lists what gave no row and why; EMB.json records the checkpoint
    (with its sha256) and the config. When no row at all could be made (no input exists, no
    audio file found, every file unreadable or too short) these files are written with zero
    rows and `NothingEmbedded` names the inputs and the skip table.
    """
    started = time.perf_counter()
    config = config or EmbedConfig()
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, got {out_path}")
    device, precision = resolve_compute(config)
    loaded = _load_checkpoint(checkpoint)
    config = config.for_checkpoint(loaded.metadata)
    spectrogram, normalization = _audio_configs(loaded)
    embedder = TileEmbedder(loaded.model, device, precision, config.poolings, normalization,
                            config.compile)
    front_end = LogMelFrontEnd(spectrogram, device)
    inputs, problems = discover_audio(paths)
    span_numbers_by_path = {str(Path(path).expanduser().resolve()): span_numbers(offsets, spectrogram, str(path))
                            for path, offsets in (spans or {}).items()}
    logger.info("embedding %d audio file(s) with %s (%s, %s)", len(inputs),
                loaded.identity["path"], device, precision)

    rows: dict[str, list] = {column: [] for column in ROW_COLUMNS if column != "row"}
    skipped: list[tuple] = [(path, relpath, reason, detail, math.nan, 0)
                            for path, relpath, reason, detail in problems]
    outputs: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    n_pending = 0
    files_with_rows = 0

    def flush() -> None:
        nonlocal n_pending
        if pending:
            outputs.append(embedder(torch.cat(pending)).cpu().numpy())
            pending.clear()
            n_pending = 0

    for audio in tqdm(inputs, unit="file", desc="embed audio", dynamic_ncols=True,
                      disable=not show_progress):
        skips: list[_Skip] = []
        n_rows_before = len(rows["path"])
        for block in _file_spans(audio.path, spectrogram, front_end, device, skips,
                                 span_numbers_by_path.get(audio.path)):
            rows["path"] += [audio.path] * len(block.offset_s)
            rows["relpath"] += [audio.relpath] * len(block.offset_s)
            rows["offset_s"] += block.offset_s.tolist()
            rows["valid_s"] += block.valid_s.tolist()
            rows["padded"] += block.padded.tolist()
            pending.append(block.tiles_db)
            n_pending += len(block.offset_s)
            if n_pending >= config.batch_size:
                flush()
        files_with_rows += len(rows["path"]) > n_rows_before
        for skip in skips:
            logger.warning("skip %s [%s] %s (%d span(s))", audio.path, skip.reason, skip.detail,
                           skip.n_spans)
            skipped.append((audio.path, audio.relpath, skip.reason, skip.detail, skip.offset_s,
                            skip.n_spans))
    flush()

    n_rows = len(rows["path"])
    dims = embedder.pooling_dims
    values = (np.concatenate(outputs) if outputs
              else np.zeros((0, embedder.output_dim), np.float32))
    targets = audio_output_paths(out_path, config.poolings)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for name, part in split_poolings(values, dims).items():
        atomic_save_npy(targets[name], _to_output(np.ascontiguousarray(part), config.output_dtype,
                                                  f"{targets[name].name}"))
    table = pd.DataFrame({"row": np.arange(n_rows, dtype=np.int64), **rows},
                         columns=list(ROW_COLUMNS))
    table["padded"] = table["padded"].astype(bool)
    atomic_write_text(targets["csv"], table.to_csv(index=False))
    atomic_write_text(targets["skipped"],
                      pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)).to_csv(index=False))
    n_padded = int(table["padded"].sum())
    record = {
        "stage": AUDIO_STAGE,
        "config": to_jsonable(config),
        "checkpoint": loaded.identity,
        "spectrogram_config": spectrogram.to_dict(),
        "normalization": normalization,
        "precision": precision,
        "device_type": device.type,
        "arrays": {name: {"file": targets[name].name, "shape": [n_rows, dims[name]],
                          "dtype": config.output_dtype} for name in config.poolings},
        "rows_csv": targets["csv"].name,
        "skipped_csv": targets["skipped"].name,
        "inputs": [str(Path(p)) for p in paths],
        "counts": {"files": len(inputs), "files_embedded": files_with_rows, "rows": n_rows,
                   "padded_rows": n_padded, "skip_records": len(skipped)},
        "package_version": __version__,
    }
    atomic_write_text(targets["json"], json.dumps(to_jsonable(record), indent=2, sort_keys=True)
                      + "\n")
    logger.info("wrote %d rows (%d padded) from %d of %d files to %s; %d skip record(s)", n_rows,
                n_padded, files_with_rows, len(inputs), out_path, len(skipped))
    if n_rows == 0:
        given = ", ".join(str(p) for p in paths) or "no path"
        found = (f"{len(inputs)} audio file(s) found, none gave a span" if inputs
                 else "no audio file found")
        if problems:
            found += f" ({len(problems)} path(s) missing or unreadable)"
        raise NothingEmbedded(f"nothing to embed in {given}: {found}; see {targets['skipped']}")
    return AudioEmbedSummary(str(out_path), str(targets["csv"]), str(targets["skipped"]),
                             len(inputs), files_with_rows, n_rows, n_padded, len(skipped),
                             str(device), precision, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="soundscape-ssl embed",
        description="Embed audio files (every tile-length span; --audio, --out EMB.npy) or every "
                    "tile of a tile store (--store, --out FOLDER; resumable, shards across ranks "
                    "under torchrun) with a pretrained checkpoint's backbone.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pth of pretraining")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", type=Path, nargs="+", metavar="FILE_OR_DIR",
                        help="audio files, or folders searched recursively for audio")
    source.add_argument("--store", type=Path, metavar="STORE_DIR", help="a finished tile store")
    parser.add_argument("--out", type=Path, required=True,
                        help="EMB.npy with --audio (EMB.csv etc. are written beside it); "
                             "an output folder with --store")
    parser.add_argument("--rank", type=int, default=None, help="store mode; default: $RANK or 0")
    parser.add_argument("--world-size", type=int, default=None,
                        help="store mode; default: $WORLD_SIZE or 1")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_options(parser, EmbedConfig, title="embedding")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl embed` / `python -m soundscape_ssl.analysis.embed`; prints a JSON summary.
    Returns the exit code; errors are one line on stderr (`core.cli.run_command`)."""
    return run_command("soundscape-ssl embed", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_options(EmbedConfig, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.audio is not None:
        if args.rank is not None or args.world_size is not None:
            parser.error("--rank / --world-size apply to --store only")
        summary = embed_audio_files(args.audio, args.checkpoint, args.out, config,
                                    show_progress=not args.no_progress).as_dict()
    else:
        summary = embed_store(args.store, args.checkpoint, args.out, config, rank=args.rank,
                              world_size=args.world_size,
                              show_progress=not args.no_progress).as_dict()
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
