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
  arbitrary audio files, e.g. a scientist's labelled clips. Each file is decoded, resampled to
  the checkpoint's model rate and cut into every `tile_s` span (hop `tile_hop_s`) from 0 s; a
  span that runs past the end of the audio (the last one, or a whole file shorter than a tile)
  is zero-padded to a full tile and flagged (`padded`, `valid_s`). The log-mel front end, the
  float16 rounding of the stored tiles and the normalisation are those the backbone was
  trained with (all three come from the checkpoint), so a span of a file that was also tiled
  into the training store gets that tile's embedding. Writes `EMB.npy`, `EMB.csv` (row, path,
  relpath, offset_s, valid_s, padded), `EMB.skipped.csv` (files or spans that gave no row, with
  a reason) and `EMB.json` (provenance). Unreadable files are logged and skipped.

Choices:

* Pooling, default "both" (one array per pooling): "mean" and "cls". All poolings come from the
  same final tokens, so each costs no compute, only disk: float32 is 1.5 KiB per tile for a
  ViT-Ti's "mean" or "cls", 2.3 % of the 64 KiB float16 tile it summarises. Which pooling is
  better depends on the method and is an open question of the study: for MAE the mean of the
  patch tokens measured far better than the class token (kNN 0.60 against 0.47, NMI 0.31
  against 0.09, DESIGN.md), while the class token is what DINO's head trains. "band" keeps the
  mean over time of each frequency row of patch tokens (8 rows x 192 = 1,536 dims for a ViT-Ti,
  6 KiB per tile): where in frequency a song lies, which a mean over all patches blurs. On the
  Acrocephalus set it raised a CPU-trained VICReg's kNN accuracy from 0.46 (mean) to 0.58
  (notebook 07). `pooling` is one name, "both" (mean, cls), "all" (mean, cls, band) or a comma
  list. Storing several lets every later step compare them without a second pass over the
  archive. Where one array is read by default (`load_embeddings`, the `EMB.npy` of the audio
  command) it is the mean of the patch tokens.
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
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..recordings.archive import DEFAULT_EXTENSIONS, list_audio_files
from ..pretrain.checkpoint import load_backbone
from ..pretrain.models import SpectrogramViT
from ..core.provenance import to_jsonable
from ..core.stage import (StagePlan, StageRun, atomic_save_npy, atomic_write, atomic_write_text,
                          reserve_space, resolve_device, resolve_rank)
from ..tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig, downmix, get_resampler
from ..tiles.store import TileStore, input_normalization, normalize_tiles

logger = logging.getLogger(__name__)

STAGE = "embed"
AUDIO_STAGE = "embed_audio"
POOLINGS = ("mean", "cls", "band")   # in the order they are concatenated in chunk files
POOLING_ALIASES = {"both": ("mean", "cls"), "all": POOLINGS}
PRECISIONS = ("auto", "bf16", "fp32")
OUTPUT_DTYPES = ("float32", "float16")
NORMALIZATIONS = ("checkpoint", "store")
CHUNKS_DIR = "chunks"
CONFIG_FILE = "config.json"
# Audio formats looked for in folders given to the audio command (any file named explicitly is tried).
AUDIO_EXTENSIONS = tuple(DEFAULT_EXTENSIONS) + (".ogg", ".oga", ".aif", ".aiff")
# Formats whose frame count libsndfile estimates (compressed streams): an earlier end is no loss.
_ESTIMATED_LENGTH_FORMATS = ("MP3", "MPEG", "OGG")
# Audio decoded and resampled per step in the audio command: bounds memory for long recordings.
_DECODE_BLOCK_S = 60.0


@dataclass(frozen=True)
class EmbedConfig:
    """How tiles are embedded. Serialisable with `dataclasses.asdict`; see the module docstring."""

    pooling: str = "both"            # "mean" (patch tokens), "cls" (class token), "band"
                                     # (per-frequency-row means), "both" (mean, cls), "all" or
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
        """The poolings computed, in POOLINGS order."""
        return parse_poolings(self.pooling)


def parse_poolings(pooling: str) -> tuple[str, ...]:
    """"mean", "both", "all" or a comma list ("mean,band") -> the poolings, in POOLINGS order."""
    names: set[str] = set()
    for part in str(pooling).split(","):
        part = part.strip()
        if part in POOLING_ALIASES:
            names.update(POOLING_ALIASES[part])
        elif part in POOLINGS:
            names.add(part)
        else:
            raise ValueError(f"pooling must be one of {POOLINGS}, an alias in "
                             f"{sorted(POOLING_ALIASES)} or a comma list of them, got {pooling!r}")
    return tuple(name for name in POOLINGS if name in names)


def pooling_dims(model: SpectrogramViT, poolings: Sequence[str]) -> dict[str, int]:
    """{pooling: width} in the given order: embed_dim for "mean" and "cls", rows x embed_dim
    for "band"."""
    return {name: int(model.band_dim if name == "band" else model.embed_dim) for name in poolings}


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
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)    # this rank's GPU is also where pinning and events go
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return device, precision


def file_sha256(path: str | os.PathLike, block_bytes: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


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

    def _pooled_eager(self, tiles: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            pooled = self.model.embed(tiles)
        by_name = {"mean": pooled.mean_patch, "cls": pooled.cls, "band": pooled.band}
        return torch.cat([by_name[name].float() for name in self.poolings], dim=1)

    @torch.inference_mode()
    def __call__(self, tiles_db: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, n_frames) dB tiles (float16 as stored) on the device -> (B, output_dim)
        float32: the poolings side by side, in `poolings` order (`split_poolings` separates them).

        Normalised by `tiles.normalize_tiles`, the function training's `TileDataset` uses, outside
        the compiled region so that its arithmetic is exactly training's.
        """
        return self._pooled(normalize_tiles(tiles_db, self.normalization).unsqueeze(1))


class _LoadedCheckpoint(NamedTuple):
    model: SpectrogramViT
    metadata: dict[str, Any]
    identity: dict[str, Any]     # what config.json records about the checkpoint


def _load_checkpoint(checkpoint: str | os.PathLike) -> _LoadedCheckpoint:
    path = Path(checkpoint).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
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
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
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
        path = Path(given).expanduser().resolve()
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


class _MonoStream:
    """Sequential mono float32 reads of an open sound file, for any frame range [start, stop)
    with zeros outside the audio (requests move forward, so the file is decoded once, in order:
    no seeking, which compressed formats do not always do exactly).

    A decoder error or an early end stops the audio there (`end_frame`, `error`); NaN/inf
    samples are zeroed and their runs remembered (`bad_runs`, absolute frames).
    """

    def __init__(self, sound_file: sf.SoundFile) -> None:
        self._file = sound_file
        self._buffer = np.zeros(0, np.float32)      # frames [_buffer_start, _decoded)
        self._buffer_start = 0
        self._decoded = 0
        self.end_frame: int | None = None
        self.error: str | None = None
        self.bad_runs: list[tuple[int, int]] = []

    def _decode(self, n_frames: int) -> np.ndarray:
        try:
            data = self._file.read(n_frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            self.error, self.end_frame = str(error), self._decoded
            return np.zeros(0, np.float32)
        mono = np.array(downmix(data), dtype=np.float32)
        if len(mono) < n_frames:
            self.end_frame = self._decoded + len(mono)
        bad = ~np.isfinite(mono)
        if bad.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], bad.view(np.int8), [0]))))
            self.bad_runs += [(self._decoded + int(a), self._decoded + int(b))
                              for a, b in zip(edges[::2], edges[1::2])]
            mono[bad] = 0.0
        self._decoded += len(mono)
        return mono

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.end_frame is None and start > self._decoded:   # a gap between requests
            self._decode(start - self._decoded)
            self._buffer, self._buffer_start = np.zeros(0, np.float32), self._decoded
        keep_from = max(start, self._buffer_start)            # earlier frames are not asked again
        self._buffer = self._buffer[keep_from - self._buffer_start:]
        self._buffer_start = keep_from
        if self.end_frame is None and stop > self._decoded:
            self._buffer = np.concatenate([self._buffer, self._decode(stop - self._decoded)])
        out = np.zeros(stop - start, np.float32)
        low, high = max(start, self._buffer_start), min(stop, self._buffer_start + len(self._buffer))
        if high > low:
            out[low - start:high - start] = self._buffer[low - self._buffer_start:high - self._buffer_start]
        return out


def _file_spans(path: str, config: SpectrogramConfig, front_end: LogMelFrontEnd,
                device: torch.device, skips: list[_Skip]) -> Iterator[_SpanBlock]:
    """Every span of one file as float16 dB tiles, block by block; problems appended to `skips`.

    Span j covers model-rate samples [j * hop, j * hop + tile) of the file resampled as a whole
    (blocks are resampled with the resampler's context on both sides, so block edges are
    seamless); samples past the end of the audio are exact zeros. Spans run from 0 s until one
    reaches the end of the audio.
    """
    try:
        sound_file = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        skips.append(_Skip("unreadable", str(error), math.nan, 0))
        return
    with sound_file:
        rate_in, rate_out = int(sound_file.samplerate), config.sample_rate_hz
        header_frames = int(sound_file.frames)
        if not config.accepts_sample_rate(rate_in):
            skips.append(_Skip("unsupported_sample_rate",
                               f"{rate_in} Hz outside {config.min_input_sample_rate_hz}-"
                               f"{config.max_input_sample_rate_hz} Hz", math.nan, 0))
            return
        if header_frames <= 0:
            skips.append(_Skip("no_frames", "the file holds no audio frames", math.nan, 0))
            return
        hop, length = config.tile_hop_samples, config.tile_samples
        resampler = get_resampler(rate_in, rate_out, config.resample_lowpass_filter_width,
                                  config.resample_rolloff, str(device))
        orig, new, width = resampler.orig, resampler.new, resampler.width
        stream = _MonoStream(sound_file)

        def n_spans_for(frames: int) -> tuple[int, int]:
            """(spans, model-rate samples of audio) for `frames` source frames."""
            valid = -(-frames * rate_out // rate_in)            # the resampled length
            if valid <= 0:
                return 0, 0
            count = 1 if valid <= length else -(-(valid - length) // hop) + 1
            return min(count, -(-valid // hop)), valid          # no span starts past the audio

        n_spans, valid_out = n_spans_for(header_frames)
        spans_per_block = max(1, round(_DECODE_BLOCK_S / config.tile_hop_s))
        first = 0
        while first < n_spans:
            last = min(n_spans, first + spans_per_block)
            out_start, out_stop = first * hop, (last - 1) * hop + length
            frame_start, frame_stop = out_start // new, -(-out_stop // new)
            samples = stream.read(frame_start * orig - width, frame_stop * orig + width)
            if stream.end_frame is not None and stream.end_frame < header_frames:
                n_spans, valid_out = n_spans_for(stream.end_frame)   # the audio ended early
                last = min(last, n_spans)
                if first >= last:
                    break
            resampled = resampler.resample_frames(torch.from_numpy(samples).to(device))
            segment = resampled[out_start - frame_start * new:out_stop - frame_start * new]
            segment = segment[:(last - first - 1) * hop + length].clone()
            segment[max(0, valid_out - out_start):] = 0.0            # exact zero padding
            numbers = np.arange(first, last)
            keep = _spans_clear_of(stream.bad_runs, numbers, hop, length, rate_in, rate_out, width)
            if not keep.all():
                _record_lost(skips, numbers[~keep], "non_finite_samples",
                             "NaN or infinite samples in or near the span", hop, rate_out)
            if keep.any():
                waveforms = segment.unfold(0, length, hop)[torch.from_numpy(keep).to(device)]
                tiles_db = front_end(waveforms).log_mel_db.to(torch.float16)   # as the store keeps tiles
                valid_samples = np.clip(valid_out - numbers[keep] * hop, 0, length)
                yield _SpanBlock(numbers[keep] * hop / rate_out, valid_samples / rate_out,
                                 valid_samples < length, tiles_db)
            first = last
        planned, _ = n_spans_for(header_frames)
        if n_spans < planned:
            if stream.error:
                _record_lost(skips, np.arange(n_spans, planned), "decode_error", stream.error,
                             hop, rate_out)
            elif sound_file.format in _ESTIMATED_LENGTH_FORMATS:
                # Not lost audio: the header's length was an estimate (measured on xeno-canto
                # MP3s: ~0.3 s more than decodes). The rows simply end where the audio does.
                logger.debug("%s: %d frames decoded, %d estimated by the header", path,
                             stream.end_frame, header_frames)
            else:
                _record_lost(skips, np.arange(n_spans, planned), "truncated",
                             f"decoding ended at frame {stream.end_frame} of {header_frames} "
                             "listed in the header", hop, rate_out)


def _spans_clear_of(bad_runs: list[tuple[int, int]], numbers: np.ndarray, hop: int, length: int,
                    rate_in: int, rate_out: int, width: int) -> np.ndarray:
    """True for spans whose source frames, widened by the resampler's reach, touch no bad run."""
    keep = np.ones(len(numbers), bool)
    if not bad_runs:
        return keep
    low = (numbers * hop * rate_in) // rate_out - width
    high = -(-((numbers * hop + length) * rate_in) // rate_out) + width
    for start, stop in bad_runs:
        keep &= ~((start < high) & (stop > low))
    return keep


def _record_lost(skips: list[_Skip], numbers: np.ndarray, reason: str, detail: str, hop: int,
                 rate_out: int) -> None:
    """One skip record per run of consecutive lost spans."""
    for number in numbers:
        previous = skips[-1] if skips else None
        if (previous is not None and previous.reason == reason and not math.isnan(previous.offset_s)
                and round(previous.offset_s * rate_out) + previous.n_spans * hop == number * hop):
            skips[-1] = previous._replace(n_spans=previous.n_spans + 1)
        else:
            skips.append(_Skip(reason, detail, float(number * hop / rate_out), 1))


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
                      show_progress: bool = True) -> AudioEmbedSummary:
    """Embed every span of the given audio files (or of the audio under given folders).

    `out_path` (EMB.npy) receives the (n_rows, width) array of the first pooling (in POOLINGS
    order: the mean of the patch tokens when it is asked for); the others go to EMB.<pooling>.npy
    (with pooling="both" the class tokens to EMB.cls.npy). EMB.csv names the file and offset of
    each row; EMB.skipped.csv lists what gave no row and why; EMB.json records the checkpoint
    (with its sha256) and the config.
    """
    started = time.perf_counter()
    config = config or EmbedConfig()
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, got {out_path}")
    device, precision = resolve_compute(config)
    loaded = _load_checkpoint(checkpoint)
    spectrogram, normalization = _audio_configs(loaded)
    embedder = TileEmbedder(loaded.model, device, precision, config.poolings, normalization,
                            config.compile)
    front_end = LogMelFrontEnd(spectrogram, device)
    inputs, problems = discover_audio(paths)
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
        for block in _file_spans(audio.path, spectrogram, front_end, device, skips):
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
    return AudioEmbedSummary(str(out_path), str(targets["csv"]), str(targets["skipped"]),
                             len(inputs), files_with_rows, n_rows, n_padded, len(skipped),
                             str(device), precision, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from ..pipeline.cli import add_dataclass_options

    parser = argparse.ArgumentParser(
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
    add_dataclass_options(parser.add_argument_group("embedding"), EmbedConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl embed` / `python -m soundscape_ssl.analysis.embed`; prints a JSON summary."""
    from ..pipeline.cli import dataclass_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = dataclass_from_args(EmbedConfig, args)
    except ValueError as error:
        parser.error(str(error))
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
