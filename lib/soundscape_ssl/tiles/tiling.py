"""Archive -> tile store: plan work units, decode and tile them on each rank, resume, finalise.

Run as a plain process, or on many processes and nodes under torchrun::

    python -m soundscape_ssl.tiles.tiling --inventory runs/R/inventory/files.parquet --out runs/R/tiles
    torchrun --nproc-per-node 8 -m soundscape_ssl.tiles.tiling --inventory ... --out ... --device cuda

Design (why it is safe to kill, rerun and scale):

* Deterministic work units. Files are sorted by relpath (recorder folder, then the time stamp in
  the name), their tiles are counted from the inventory (readable frames, sample rate) by the
  one window rule of `soundscape_ssl.core.audio` (tiles every `tile_hop_s` from 0 s; a last
  tile that runs past the end is zero-padded and kept when at least half of it is audio; the
  index says so in `valid_s` and `padded`) and packed into units of at most `unit_max_tiles`
  consecutive tiles; a long file is split across units, short ones share one. The plan depends on the inventory and the configs only, never on the
  world size, so unit k is the same work, and gives the same bytes, whichever rank does it.
  Unit k belongs to rank k % world_size (RANK / WORLD_SIZE as set by torchrun).
* The stage runs on `core.stage` (claim, plan, units, done markers, resume, finalise). A unit
  streams its tiles into a temporary file of its shard (flat memory: nothing is held beyond one
  decode block), then writes its skip table and its tile index `unit-K.parquet`; the runner
  renames them into place and writes `unit-K.done` (sizes and sha256 of the three), which alone
  means "unit K is done". A rerun verifies the markers, skips done units and redoes any other
  one from scratch, so a kill anywhere loses at most the unit in flight and never leaves a tile
  twice. `plan.json` pins the configs and an input fingerprint; a rerun with a different
  inventory or config is refused, naming what differs. A second writer on the same folder is
  refused while the first is alive.
* Finalise. Whichever process finds every unit done (the last rank to finish, or
  `finalize_store` / `--finalize-only`) concatenates the unit indexes in unit order into
  `index.parquet` with a global tile_id, gathers the skips, combines the per-tile dB means and
  variances (float64) into the global normalisation statistics and writes `config.json` last.
  It is deterministic and runs once under a lock, so two ranks finishing together, or a rerun,
  leave the same bytes.
* Decoding. Through the one reader, `soundscape_ssl.core.audio`: blocks of `decode_block_s`
  (never a whole long file), channels averaged, blocks resampled with context on both sides so
  block edges are seamless, and bad audio isolated, not fatal: a decoder error costs only the
  tiles whose pieces fail, NaN/inf samples are zeroed and only the tiles that touch them (plus
  the resampler's reach) are dropped, with a reason in the skip table. A file the inventory
  found damaged (cut short) is read up to the break and noted in the skip table with 0 tiles
  lost. The audio after a file's last tile (a tail under half a tile) is counted in config.json.
* Determinism. The bytes of a store depend on the inventory, the configs, the software versions
  and the device type only: not on the world size, on interruptions, or on the CPU thread count
  (per-tile statistics are reduced with numpy, whose summation order is fixed).
* Memory stays flat as the archive grows: decode buffers are reused, per-unit index arrays are
  sized once, shards are streamed to disk and finalisation streams the unit tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..core.audio import (LOSS_REASONS, AudioFile, AudioOpenError, DecodeBuffers, WindowBatch,
                          WindowLoss, grid_windows)
from ..core.cli import CommandParser, run_command
from ..core.config import add_config_options, config_from_options, config_to_options
from ..core.stage import (StagePlan, StageRun, UnitOutput, atomic_write, read_plan,
                          resolve_device, torch_threads)
from .spectrogram import LogMelFrontEnd, SpectrogramConfig
from .store import (INDEX_FILE, INDEX_SCHEMA, SKIPPED_FILE, SKIPPED_SCHEMA, STAGE,
                    UNIT_INDEX_SCHEMA, UNITS_DIR, shard_path, unit_index_path, unit_skipped_path)

logger = logging.getLogger(__name__)

SKIP_REASONS = {
    **LOSS_REASONS,   # unreadable, decode_error, non_finite_samples, truncated, outside_audio
    "unsupported_sample_rate": "sample rate outside the accepted input range",
    "header_mismatch": "sample rate differs from the inventory's (file changed since the scan)",
    "no_frames": "the file has no audio frames",
}

REQUIRED_COLUMNS = ("path", "relpath", "sample_rate_hz", "frames")
_INDEX_ROW_GROUP_ROWS = 65536


@dataclass(frozen=True)
class TilingConfig:
    """How the tiling run is cut into work and read from disk (not what a tile is)."""

    unit_max_tiles: int = 1024     # tiles per work unit / shard: ~51 min of audio, 64 MiB float16
    decode_block_s: float = 60.0   # audio decoded and resampled per step; bounds memory (GPU: 600)

    def __post_init__(self) -> None:
        if self.unit_max_tiles <= 0:
            raise ValueError(f"unit_max_tiles must be positive, got {self.unit_max_tiles}")
        if not self.decode_block_s > 0:
            raise ValueError(f"decode_block_s must be positive, got {self.decode_block_s}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Segment(NamedTuple):
    """Tiles [first_tile, first_tile + n_tiles) of one file (n_tiles 0: a file that gives none)."""

    file_row: int
    first_tile: int
    n_tiles: int


class WorkUnit(NamedTuple):
    unit_id: int
    segments: tuple[Segment, ...]

    @property
    def n_tiles(self) -> int:
        return sum(segment.n_tiles for segment in self.segments)


@dataclass
class _FileInfo:
    path: str
    relpath: str
    recorder: str | None
    habitat: str | None
    sample_rate_hz: int
    frames: int                   # readable frames (the inventory reads damaged files to the break)
    damage: str | None = None     # the inventory's damage reason for a file read up to a break
    damage_detail: str | None = None


@dataclass
class FileTable:
    """The inventory columns tiling uses, as arrays in plan order (row = Segment.file_row).

    Plain arrays rather than a DataFrame: per-file and per-unit look-ups stay O(1) and cheap
    however large the archive (a DataFrame row look-up costs ~0.1 ms).
    """

    path: np.ndarray               # object (str)
    relpath: np.ndarray            # object (str)
    recorder: np.ndarray           # object (str or None)
    habitat: np.ndarray            # object (str or None)
    start_time: np.ndarray         # datetime64[ns], NaT when unknown
    sample_rate_hz: np.ndarray     # int64
    frames: np.ndarray             # int64
    n_tiles: np.ndarray            # int64, tiles planned (the window rule: whole + kept padded)
    damage: np.ndarray             # object (str or None): the inventory's damage reason
    damage_detail: np.ndarray      # object (str or None)

    def __len__(self) -> int:
        return len(self.path)

    def info(self, row: int) -> _FileInfo:
        return _FileInfo(self.path[row], self.relpath[row], self.recorder[row], self.habitat[row],
                         int(self.sample_rate_hz[row]), int(self.frames[row]), self.damage[row],
                         self.damage_detail[row])


@dataclass
class TilingPlan:
    """The deterministic split of an inventory into work units."""

    files: FileTable               # sorted by relpath, path
    units: list[WorkUnit]
    spectrogram: SpectrogramConfig
    tiling: TilingConfig
    fingerprint: str               # sha256 of the configs and every file's identity and size

    @property
    def n_tiles(self) -> int:
        return sum(unit.n_tiles for unit in self.units)

    def units_for_rank(self, rank: int, world_size: int) -> list[WorkUnit]:
        return [unit for unit in self.units if unit.unit_id % world_size == rank]

    def segment_samples(self, segment: Segment) -> int:
        """Audio covered by a segment's tiles, in samples at the model rate."""
        if segment.n_tiles == 0:
            return 0
        config = self.spectrogram
        return (segment.n_tiles - 1) * config.tile_hop_samples + config.tile_samples

    def description(self) -> dict[str, Any]:
        """What `plan.json` holds (and what a rerun must match)."""
        config = self.spectrogram
        frames, rates, tiles = self.files.frames, self.files.sample_rate_hz, self.files.n_tiles
        valid = (tiles > 0)
        # Audio after the end of a file's last planned tile (tails under half a tile), exactly.
        covered_samples = (tiles - 1) * config.tile_hop_samples + config.tile_samples
        covered_units = np.where(valid, covered_samples * rates, 0)  # 1 / (rate_in * rate_out) s
        leftover = np.where(valid, np.maximum(frames * config.sample_rate_hz - covered_units, 0), 0)
        rule = config.window_rule
        whole = np.array([rule.n_whole(int(f), int(r)) for f, r in zip(frames, rates)],
                         dtype=np.int64).reshape(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            duration_s = np.where(rates > 0, frames / np.maximum(rates, 1), 0.0)
            leftover_s = np.where(valid, leftover / np.maximum(rates * config.sample_rate_hz, 1), 0)
        return {
            "stage": STAGE,
            "spectrogram": config.to_dict(),
            "tiling": self.tiling.to_dict(),
            "fingerprint": self.fingerprint,
            "n_units": len(self.units),
            "n_files": len(self.files),
            "n_tiles_planned": self.n_tiles,
            "padded_tiles_planned": int(np.sum(np.where(valid, tiles - whole, 0))),
            "audio_s": float(np.sum(duration_s)),
            "files_without_tiles": int(np.sum(~valid)),
            "tail_remainders_dropped": int(np.sum(leftover > 0)),
            "tail_audio_dropped_s": float(np.sum(leftover_s)),
        }


@dataclass
class TilingSummary:
    """What one `tile_archive` call did (per rank)."""

    store_dir: str
    rank: int
    world_size: int
    n_units: int
    units_assigned: int
    units_already_done: int
    units_written: int
    tiles_written: int
    audio_s_processed: float
    wall_s: float
    finalized: bool
    n_tiles_total: int | None
    device: str                    # where this rank's front end ran ("cpu", "cuda:0")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summaries_from_output(lines: Sequence[str]) -> list[TilingSummary]:
    """The per-rank summaries that `python -m soundscape_ssl.tiles.tiling` prints (one JSON line
    each) among the other lines of a torchrun launch's output."""
    names = {field.name for field in dataclasses.fields(TilingSummary)}
    summaries = []
    for line in lines:
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and set(record) == names:
                summaries.append(TilingSummary(**record))
    return summaries



def summaries_compute(summaries: Sequence[TilingSummary]) -> dict[str, Any]:
    """What a tiling call ran on, from its ranks' summaries: {device (type), precision, ranks,
    tiles_written}. The front end computes in float32 on every device. ValueError when there is no
    summary or the ranks ran on different device types."""
    devices = sorted({summary.device.split(":")[0] for summary in summaries})
    if len(devices) != 1:
        raise ValueError(f"expected the tiling summaries of one device type, got {devices or 'no summary'}")
    return {"device": devices[0], "precision": "fp32", "ranks": len(summaries),
            "tiles_written": sum(summary.tiles_written for summary in summaries)}

# ----------------------------------------------------------------------------------------------
# Planning


def plan_tiling(files: pd.DataFrame, spectrogram: SpectrogramConfig,
                tiling: TilingConfig) -> TilingPlan:
    """Sort the files, count each one's tiles (the window rule of `core.audio`: whole tiles and
    padded tails of at least half a tile) and pack them into work units."""
    missing = [column for column in REQUIRED_COLUMNS if column not in files.columns]
    if missing:
        raise ValueError(f"files table lacks columns {missing} (see soundscape_ssl.recordings.archive)")
    n_rows = len(files)

    def text_column(name: str) -> list[str | None]:
        values = files[name].tolist() if name in files.columns else [None] * n_rows
        return [_text_or_none(value) for value in values]

    # Plain Python and numpy from here: pandas' per-call overhead dominated small plans.
    relpaths, paths = text_column("relpath"), text_column("path")
    order = np.array(sorted(range(n_rows), key=lambda i: (relpaths[i] or "", paths[i] or "")),
                     dtype=np.int64)

    def ordered_text(values: list[str | None]) -> np.ndarray:
        array = np.empty(n_rows, dtype=object)
        array[:] = values
        return array[order]

    def integers(name: str) -> np.ndarray:
        return pd.to_numeric(files[name], errors="coerce").fillna(0).to_numpy(np.int64)[order]

    frames, rates = integers("frames"), integers("sample_rate_hz")
    start_time = (pd.to_datetime(files["start_time"]).to_numpy("datetime64[ns]")[order]
                  if "start_time" in files.columns
                  else np.full(n_rows, np.datetime64("NaT"), "datetime64[ns]"))
    rule = spectrogram.window_rule
    n_tiles = np.array([rule.count(int(f), int(r)) if spectrogram.accepts_sample_rate(int(r))
                        else 0 for f, r in zip(frames, rates)], dtype=np.int64).reshape(-1)
    file_table = FileTable(ordered_text(paths), ordered_text(relpaths),
                           ordered_text(text_column("recorder")),
                           ordered_text(text_column("habitat")), start_time, rates, frames, n_tiles,
                           ordered_text(text_column("damage")),
                           ordered_text(text_column("damage_detail")))

    units: list[WorkUnit] = []
    current: list[Segment] = []
    current_tiles = 0
    for file_row, n_tiles in enumerate(file_table.n_tiles.tolist()):
        if n_tiles == 0:
            current.append(Segment(file_row, 0, 0))  # reported by whoever does this unit
            continue
        first = 0
        while first < n_tiles:
            take = min(n_tiles - first, tiling.unit_max_tiles - current_tiles)
            current.append(Segment(file_row, first, take))
            current_tiles += take
            first += take
            if current_tiles == tiling.unit_max_tiles:
                units.append(WorkUnit(len(units), tuple(current)))
                current, current_tiles = [], 0
    if current:
        units.append(WorkUnit(len(units), tuple(current)))

    start_iso = [None if np.isnat(t) else str(t) for t in start_time]
    # Each file's planned tile count is part of the identity: a store begun under another
    # window rule (e.g. before padded tails were kept) is refused, never resumed into a mix.
    identity = list(zip(file_table.relpath.tolist(), file_table.path.tolist(), frames.tolist(),
                        rates.tolist(), file_table.recorder.tolist(),
                        file_table.habitat.tolist(), start_iso, file_table.n_tiles.tolist()))
    digest = hashlib.sha256(json.dumps(
        [spectrogram.to_dict(), tiling.to_dict(), identity]).encode()).hexdigest()
    return TilingPlan(file_table, units, spectrogram, tiling, digest)


def _text_or_none(value: Any) -> str | None:
    """Strings as str, every kind of missing value (None, NaN, pd.NA) as None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return str(value)


def stage_plan(description: dict[str, Any]) -> StagePlan:
    """The runner's view of a store's plan.json: units `units/unit-NNNNNN.*`."""
    return StagePlan(STAGE, description, int(description["n_units"]), unit_noun="unit",
                     units_dir=UNITS_DIR, title="a tile store")


# ----------------------------------------------------------------------------------------------
# Decoding (through the one reader, soundscape_ssl.core.audio)


class _TileBatch(NamedTuple):
    tile_numbers: np.ndarray      # tile j within the file
    log_mel_f16: np.ndarray       # (B, n_mels, n_frames) float16
    rms_dbfs: np.ndarray
    peak_dbfs: np.ndarray
    spectral_flatness: np.ndarray
    mel_mean_db: np.ndarray       # float64, of the float16 values
    mel_std_db: np.ndarray
    valid_s: np.ndarray           # float32 seconds of real audio in the tile
    padded: np.ndarray            # bool: the tile runs past the end of the audio (zero-padded)


class _Skip(NamedTuple):
    reason: str
    detail: str
    first_tile: int | None        # None: the file as a whole (no tile planned, or a damage note)
    n_tiles: int


class _SegmentTiler:
    """Decode, resample and tile one segment of one file, yielding batches and recording skips."""

    def __init__(self, plan: TilingPlan, front_end: LogMelFrontEnd, device: torch.device,
                 progress: tqdm | None) -> None:
        self.plan = plan
        self.config = plan.spectrogram
        self.front_end = front_end
        self.device = device
        self.progress = progress
        self._buffers = DecodeBuffers()

    def _advance(self, samples: int) -> None:
        """Progress in whole samples at the model rate, so the bar ends exactly at its total."""
        if self.progress is not None and samples > 0:
            self.progress.update(samples)

    def run(self, info: _FileInfo, segment: Segment,
            skips: list[_Skip]) -> Iterator[_TileBatch]:
        config = self.config
        planned = self.plan.segment_samples(segment)
        if segment.first_tile == 0 and info.damage:
            # Read up to the break (the inventory lists the readable frames); said once per file.
            skips.append(_Skip(info.damage, info.damage_detail or "", None, 0))
        try:
            audio = AudioFile(info.path, frames=info.frames,
                              piece_s=min(config.tile_hop_s, config.tile_s),
                              buffers=self._buffers)
        except AudioOpenError as error:
            skips.append(_Skip("unreadable", str(error), None if segment.n_tiles == 0
                               else segment.first_tile, segment.n_tiles))
            self._advance(planned)
            return
        try:
            if segment.n_tiles == 0:
                skips.append(self._no_tile_reason(info, audio))
                return
            if audio.sample_rate_hz != info.sample_rate_hz:
                skips.append(_Skip("header_mismatch",
                                   f"file is {audio.sample_rate_hz} Hz, inventory says "
                                   f"{info.sample_rate_hz} Hz", segment.first_tile,
                                   segment.n_tiles))
                self._advance(planned)
                return
            yield from self._tile(segment, audio, skips)
        finally:
            audio.close()

    def _no_tile_reason(self, info: _FileInfo, audio: AudioFile) -> _Skip:
        config = self.config
        rate = audio.sample_rate_hz
        if not config.accepts_sample_rate(rate):
            return _Skip("unsupported_sample_rate",
                         f"{rate} Hz outside {config.min_input_sample_rate_hz}-"
                         f"{config.max_input_sample_rate_hz} Hz", None, 0)
        # Any audio at all gives a first tile (the window rule), so only an empty file is left.
        return _Skip("no_frames", "the file holds no audio frames", None, 0)

    def _tile(self, segment: Segment, audio: AudioFile,
              skips: list[_Skip]) -> Iterator[_TileBatch]:
        config = self.config
        planned = self.plan.segment_samples(segment)
        done = 0

        def advance(samples: int) -> None:
            nonlocal done
            step = min(samples, planned - done)
            self._advance(step)
            done += step

        losses: list[WindowLoss] = []
        for batch in grid_windows(audio, config.window_rule, segment.first_tile,
                                  segment.first_tile + segment.n_tiles, losses,
                                  block_s=self.plan.tiling.decode_block_s, device=self.device,
                                  lowpass_filter_width=config.resample_lowpass_filter_width,
                                  rolloff=config.resample_rolloff, on_progress=advance):
            yield self._features(batch)
        self._advance(planned - done)
        skips.extend(_Skip(loss.reason, loss.detail, int(loss.numbers[0]), len(loss.numbers))
                     for loss in losses)

    @torch.no_grad()
    def _features(self, batch: WindowBatch) -> _TileBatch:
        features = self.front_end(batch.waveforms)
        log_mel_f16 = features.log_mel_db.to(torch.float16)
        n = len(batch.numbers)
        if log_mel_f16.device.type == "cpu":   # numpy: summation order independent of threads
            values = log_mel_f16.numpy().reshape(n, -1).astype(np.float64)
            mel_mean = values.sum(axis=1) / values.shape[1]
            second_moment = np.einsum("ij,ij->i", values, values) / values.shape[1]
            mel_std = np.sqrt(np.maximum(second_moment - mel_mean * mel_mean, 0.0))
        else:
            as_float64 = log_mel_f16.to(torch.float64).flatten(1)
            mel_mean = as_float64.mean(dim=1).cpu().numpy()
            mel_std = as_float64.var(dim=1, correction=0).sqrt().cpu().numpy()
        return _TileBatch(
            batch.numbers, log_mel_f16.cpu().numpy(), features.rms_dbfs.cpu().numpy(),
            features.peak_dbfs.cpu().numpy(), features.spectral_flatness.cpu().numpy(),
            mel_mean, mel_std, batch.valid_s.astype(np.float32), batch.padded)


# ----------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Streams float16 tiles into a shard's temporary file (the runner renames it into place).

    The .npy header is written first for zero tiles and rewritten with the final count: numpy
    pads headers so that the length of the first axis can grow in place (asserted).
    """

    def __init__(self, tmp: Path, tile_shape: tuple[int, int]) -> None:
        self.tile_shape = tile_shape
        self.n_tiles = 0
        self._file = open(tmp, "wb")
        self._header_bytes = self._write_header(0)

    def _write_header(self, n_tiles: int) -> int:
        self._file.seek(0)
        np.lib.format.write_array_header_1_0(self._file, {
            "descr": np.lib.format.dtype_to_descr(np.dtype("<f2")),
            "fortran_order": False,
            "shape": (n_tiles,) + self.tile_shape})
        return self._file.tell()

    def append(self, tiles: np.ndarray) -> None:
        if tiles.shape[1:] != self.tile_shape:
            raise ValueError(f"tiles of shape {tiles.shape[1:]}, expected {self.tile_shape}")
        self._file.write(np.ascontiguousarray(tiles, dtype="<f2").tobytes())
        self.n_tiles += len(tiles)

    def finish(self) -> None:
        if self._write_header(self.n_tiles) != self._header_bytes:
            raise RuntimeError("npy header changed length; cannot finish the shard in place")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _npy_shape(path: Path) -> tuple[int, ...]:
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(file)
    return tuple(shape)


def _timestamps(start_ns: np.ndarray, offset_s: np.ndarray) -> np.ndarray:
    offsets = np.round(offset_s * 1e9).astype("timedelta64[ns]")
    return start_ns + offsets        # NaT stays NaT


def _process_unit(unit: WorkUnit, plan: TilingPlan, store_dir: Path, out: UnitOutput,
                  tiler: _SegmentTiler) -> int:
    """Tile one unit into its three files (shard, skip table, tile index), written through
    `out` (the runner commits them together); returns the number of tiles written."""
    config = plan.spectrogram
    tile_shape = (config.n_mels, config.n_frames)
    shard_bytes = unit.n_tiles * math.prod(tile_shape) * 2 + 128     # float16 + the npy header
    writer = _ShardWriter(out.output(shard_path(store_dir, unit.unit_id),
                                     expected_bytes=shard_bytes), tile_shape)
    rows = _UnitRows(unit.n_tiles)
    skip_rows: list[tuple[int, _Skip]] = []
    try:
        for segment in unit.segments:
            info = plan.files.info(segment.file_row)
            skips: list[_Skip] = []
            for batch in tiler.run(info, segment, skips):
                writer.append(batch.log_mel_f16)
                rows.add(segment.file_row, batch)
            for skip in skips:
                logger.warning("skip %s [%s] %s (%d tile(s))", info.relpath, skip.reason,
                               skip.detail, skip.n_tiles)
                skip_rows.append((segment.file_row, skip))
        writer.finish()
    finally:
        writer.close()
    skipped = _unit_skipped_table(plan, unit.unit_id, skip_rows)
    pq.write_table(skipped, out.output(unit_skipped_path(store_dir, unit.unit_id)))
    pq.write_table(_unit_index_table(plan, unit.unit_id, rows),
                   out.output(unit_index_path(store_dir, unit.unit_id)))
    return writer.n_tiles


class _UnitRows:
    """The index values of one unit's tiles, in arrays sized once for the planned tiles.

    Filling preallocated arrays instead of collecting small per-batch arrays keeps long-lived
    small allocations from landing between the large, short-lived decode buffers, which
    fragments the heap: measured, peak RSS then grew with the archive (+120 MiB from 20 to 80
    minutes of audio) instead of staying flat.
    """

    TYPES = {"file_row": np.int64, "tile": np.int64, "rms_dbfs": np.float32,
             "peak_dbfs": np.float32, "spectral_flatness": np.float32,
             "mel_mean_db": np.float64, "mel_std_db": np.float64, "valid_s": np.float32,
             "padded": np.bool_}

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self._arrays = {name: np.empty(capacity, dtype) for name, dtype in self.TYPES.items()}

    def add(self, file_row: int, batch: _TileBatch) -> None:
        rows = slice(self.n, self.n + len(batch.tile_numbers))
        self._arrays["file_row"][rows] = file_row
        self._arrays["tile"][rows] = batch.tile_numbers
        for name in ("rms_dbfs", "peak_dbfs", "spectral_flatness", "mel_mean_db", "mel_std_db",
                     "valid_s", "padded"):
            self._arrays[name][rows] = getattr(batch, name)
        self.n = rows.stop

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name][:self.n]


def _unit_index_table(plan: TilingPlan, unit_id: int, rows: _UnitRows) -> pa.Table:
    config = plan.spectrogram
    file_rows = rows["file_row"]
    tiles = rows["tile"]
    files = plan.files
    offset_s = tiles * config.tile_hop_samples / config.sample_rate_hz
    start_ns = files.start_time[file_rows]

    def strings(column: str) -> pa.Array:
        return pa.array(getattr(files, column)[file_rows], pa.string())

    columns = {
        "recorder": strings("recorder"),
        "habitat": strings("habitat"),
        "path": strings("path"),
        "relpath": strings("relpath"),
        "file_start_time": pa.array(start_ns, pa.timestamp("ns"), from_pandas=True),
        "offset_s": pa.array(offset_s, pa.float64()),
        "valid_s": pa.array(rows["valid_s"], pa.float32()),
        "padded": pa.array(rows["padded"], pa.bool_()),
        "timestamp": pa.array(_timestamps(start_ns, offset_s), pa.timestamp("ns"),
                              from_pandas=True),
        "source_sample_rate_hz": pa.array(files.sample_rate_hz[file_rows].astype(np.int32)),
        "rms_dbfs": pa.array(rows["rms_dbfs"]),
        "peak_dbfs": pa.array(rows["peak_dbfs"]),
        "spectral_flatness": pa.array(rows["spectral_flatness"]),
        "mel_mean_db": pa.array(rows["mel_mean_db"]),
        "mel_std_db": pa.array(rows["mel_std_db"]),
        "shard": pa.array(np.full(len(tiles), unit_id, np.int32)),
        "shard_row": pa.array(np.arange(len(tiles), dtype=np.int32)),
    }
    return pa.table(columns, schema=UNIT_INDEX_SCHEMA)


def _unit_skipped_table(plan: TilingPlan, unit_id: int,
                        skip_rows: list[tuple[int, _Skip]]) -> pa.Table:
    config = plan.spectrogram
    infos = [plan.files.info(file_row) for file_row, _ in skip_rows]
    skips = [skip for _, skip in skip_rows]
    return pa.table({
        "unit": pa.array([unit_id] * len(skips), pa.int32()),
        "path": pa.array([info.path for info in infos], pa.string()),
        "relpath": pa.array([info.relpath for info in infos], pa.string()),
        "recorder": pa.array([info.recorder for info in infos], pa.string()),
        "reason": pa.array([skip.reason for skip in skips], pa.string()),
        "detail": pa.array([skip.detail for skip in skips], pa.string()),
        "offset_s": pa.array([math.nan if skip.first_tile is None
                              else skip.first_tile * config.tile_hop_samples / config.sample_rate_hz
                              for skip in skips], pa.float64()),
        "n_tiles_lost": pa.array([skip.n_tiles for skip in skips], pa.int64()),
    }, schema=SKIPPED_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Entry points


def tile_archive(files_df: pd.DataFrame, store_dir: str | os.PathLike,
                 config: SpectrogramConfig | None = None, rank: int | None = None,
                 world_size: int | None = None, device: str | torch.device = "cpu",
                 show_progress: bool = True, tiling: TilingConfig | None = None,
                 threads: int | None = 1) -> TilingSummary:
    """Tile this rank's share of an inventory into `store_dir`; finalise if every unit is done.

    `files_df` is the inventory's files table (at least path, relpath, sample_rate_hz, frames;
    recorder, habitat, start_time are carried into the index). Rank and world size default to
    RANK / WORLD_SIZE from the environment (torchrun), else a single process. Safe to rerun:
    finished units are kept, unfinished ones redone. The progress bar (rank 0) counts audio hours.

    `threads`: torch intra-op threads during the call (restored after; None leaves them alone).
    Tiling scales by processes, not threads: its tensors are one tile or one decode block, too
    small to split, and extra threads only spin (measured: 0.14 s with 1 thread, 0.4-2.3 s with
    2 on a busy 2-core machine, for the same 11 tiles). The bytes written do not depend on it.
    """
    with torch_threads(threads):
        return _tile_archive(files_df, Path(store_dir), config or SpectrogramConfig(),
                             tiling or TilingConfig(), rank, world_size, device, show_progress)


def _tile_archive(files_df: pd.DataFrame, store_dir: Path, config: SpectrogramConfig,
                  tiling: TilingConfig, rank: int | None, world_size: int | None,
                  device: str | torch.device, show_progress: bool) -> TilingSummary:
    started = time.perf_counter()
    device = resolve_device(device)
    plan = plan_tiling(files_df, config, tiling)
    with StageRun(store_dir, stage_plan(plan.description()), rank, world_size) as run:
        rank, world_size = run.rank, run.world_size
        todo = [plan.units[k] for k in run.todo]
        todo_samples = sum(plan.segment_samples(s) for unit in todo for s in unit.segments)
        todo_hours = todo_samples / config.sample_rate_hz / 3600.0
        logger.info("rank %d/%d: %d of %d units to do (%d already done), %.2f h of audio", rank,
                    world_size, len(todo), len(run.assigned), len(run.assigned) - len(todo),
                    todo_hours)
        front_end = LogMelFrontEnd(config, device)
        progress = tqdm(total=todo_samples, unit="h",
                        unit_scale=1.0 / (3600 * config.sample_rate_hz),
                        desc=f"tiling rank {rank}/{world_size}", dynamic_ncols=True,
                        disable=not show_progress or rank != 0,
                        bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} h audio "
                                   "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
        tiler = _SegmentTiler(plan, front_end, device, progress)
        tiles_written = 0
        try:
            for unit in todo:
                with run.unit(unit.unit_id) as out:
                    tiles_written += _process_unit(unit, plan, store_dir, out, tiler)
                progress.set_postfix(tiles=tiles_written, refresh=False)
        finally:
            progress.close()

        finalized = run.all_units_done()
        n_tiles_total = None
        if finalized:
            n_tiles_total = run.finalize(lambda: _merge_units(store_dir))["counts"]["n_tiles"]
        else:
            logger.info("rank %d: my units are done; another rank finalises the store", rank)
    return TilingSummary(str(store_dir), rank, world_size, len(plan.units), len(run.assigned),
                         len(run.assigned) - len(todo), len(todo), tiles_written,
                         todo_hours * 3600.0, time.perf_counter() - started, finalized,
                         n_tiles_total, str(device))


def finalize_store(store_dir: str | os.PathLike) -> dict[str, Any]:
    """Build index.parquet, skipped.parquet and config.json from finished units; returns counts.

    Streams the unit tables (flat memory), assigns tile_id in unit order, combines per-tile
    float64 dB means and variances into the global normalisation, and writes config.json last.
    A finished store is left as it is. Raises StageError (a RuntimeError) while units are missing.
    """
    store_dir = Path(store_dir)
    with StageRun(store_dir, stage_plan(read_plan(store_dir)), work=False) as run:
        return run.finalize(lambda: _merge_units(store_dir))["counts"]


def _merge_units(store_dir: Path) -> dict[str, Any]:
    """Write index.parquet and skipped.parquet from the done units; returns config.json's fields."""
    plan = read_plan(store_dir)
    n_units = int(plan["n_units"])
    spectrogram = SpectrogramConfig.from_dict(plan["spectrogram"])
    tile_shape = (spectrogram.n_mels, spectrogram.n_frames)

    sum_means, sum_second_moments, n_tiles = 0.0, 0.0, 0
    valid_audio_s, n_padded = 0.0, 0
    pending: list[pa.Table] = []
    skipped_tables: list[pa.Table] = []
    with atomic_write(store_dir / INDEX_FILE) as index_tmp, \
            pq.ParquetWriter(index_tmp, INDEX_SCHEMA) as writer:
        for unit_id in range(n_units):
            table = pq.read_table(unit_index_path(store_dir, unit_id), schema=UNIT_INDEX_SCHEMA)
            shape = _npy_shape(shard_path(store_dir, unit_id))
            if shape != (table.num_rows,) + tile_shape:
                raise RuntimeError(f"unit {unit_id}: shard {shape} does not match its index "
                                   f"({table.num_rows} rows of {tile_shape})")
            means = table.column("mel_mean_db").to_numpy()
            stds = table.column("mel_std_db").to_numpy()
            sum_means += float(np.sum(means))
            sum_second_moments += float(np.sum(stds * stds + means * means))
            valid_audio_s += float(np.sum(table.column("valid_s").to_numpy()))
            n_padded += int(np.sum(table.column("padded").to_numpy()))
            tile_ids = pa.array(np.arange(n_tiles, n_tiles + table.num_rows, dtype=np.int64))
            pending.append(table.add_column(0, "tile_id", tile_ids))
            n_tiles += table.num_rows
            if sum(t.num_rows for t in pending) >= _INDEX_ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending = []
            skipped_tables.append(pq.read_table(unit_skipped_path(store_dir, unit_id),
                                                schema=SKIPPED_SCHEMA))
        if pending or n_tiles == 0:
            writer.write_table(pa.concat_tables(pending) if pending else INDEX_SCHEMA.empty_table())

    skipped = pa.concat_tables(skipped_tables) if skipped_tables else SKIPPED_SCHEMA.empty_table()
    with atomic_write(store_dir / SKIPPED_FILE) as skipped_tmp:
        pq.write_table(skipped, skipped_tmp)
    reasons = skipped.column("reason").to_pylist()
    lost = skipped.column("n_tiles_lost").to_pylist()
    records_by_reason, lost_by_reason = Counter(reasons), Counter()
    for reason, n_lost in zip(reasons, lost):
        lost_by_reason[reason] += n_lost
    skip_counts = {reason: {"records": records_by_reason[reason],
                            "tiles_lost": int(lost_by_reason[reason])}
                   for reason in sorted(records_by_reason)}

    if n_tiles:
        mean = sum_means / n_tiles
        std = math.sqrt(max(sum_second_moments / n_tiles - mean * mean, 0.0))
    else:
        mean, std = 0.0, 1.0
    summary = {
        "n_tiles": n_tiles,
        "n_units": n_units,
        "tile_shape": list(tile_shape),
        "dtype": "float16",
        "n_files": plan["n_files"],
        "n_tiles_planned": plan["n_tiles_planned"],
        "audio_s": plan["audio_s"],
        "tiled_audio_s": n_tiles * spectrogram.tile_s,   # tile spans, padding and overlaps included
        "valid_audio_s": valid_audio_s,                  # real audio in the tiles (overlaps counted twice)
        "padded_tiles": n_padded,
        "files_without_tiles": plan["files_without_tiles"],
        "tail_remainders_dropped": plan["tail_remainders_dropped"],
        "tail_audio_dropped_s": plan["tail_audio_dropped_s"],
        "skipped": skip_counts,
        "skipped_records": len(reasons),
        "tiles_lost": int(sum(lost)),
    }
    logger.info("finalised %s: %d tiles in %d units, %d skip records", store_dir, n_tiles,
                n_units, len(reasons))
    return dict(config=spectrogram, tiling=plan["tiling"],
                normalization={"mean": mean, "std": std, "unit": "dB",
                               "over": "all values of all tiles (float16 as stored)"},
                counts=summary, skip_reasons=SKIP_REASONS, fingerprint=plan["fingerprint"],
                layout={"shards": f"{UNITS_DIR}/unit-NNNNNN.npy", "index": INDEX_FILE,
                        "skipped": SKIPPED_FILE})


# ----------------------------------------------------------------------------------------------
# Command line


def command_arguments(inventory: str | os.PathLike, out_dir: str | os.PathLike,
                      config: SpectrogramConfig | None = None, tiling: TilingConfig | None = None,
                      device: str = "cpu", show_progress: bool = False) -> list[str]:
    """The arguments of `python -m soundscape_ssl.tiles.tiling` (e.g. under torchrun) that tile
    `inventory` into `out_dir` with exactly these configs (every field given explicitly)."""
    arguments = ["--inventory", str(inventory), "--out", str(out_dir), "--device", device,
                 *config_to_options(config or SpectrogramConfig()),
                 *config_to_options(tiling or TilingConfig())]
    return arguments if show_progress else [*arguments, "--no-progress"]


def _read_inventory(path: Path) -> pd.DataFrame:
    """files.parquet (or its folder, or a CSV); a path that is none of these is a one-line error."""
    if path.is_dir():
        if not (path / "files.parquet").is_file():
            raise FileNotFoundError(f"inventory folder {path} holds no files.parquet")
        path = path / "files.parquet"
    elif not path.is_file():
        raise FileNotFoundError(f"inventory {path}: no such file or folder")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path)   # start_time is parsed by plan_tiling
        return pd.read_parquet(path)
    except (ValueError, OSError, pa.ArrowException) as error:
        raise ValueError(f"inventory {path} is not a readable {'CSV' if path.suffix == '.csv' else 'Parquet'} "
                         f"table: {' '.join(str(error).split())[:200]}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="soundscape-ssl tile",
        description="Tile an inventory into a log-mel tile store (resumable; run under torchrun "
                    "as python -m soundscape_ssl.tiles.tiling to shard across processes and nodes).")
    parser.add_argument("--inventory", type=Path,
                        help="files.parquet of soundscape_ssl.recordings.archive (or its folder, or a CSV)")
    parser.add_argument("--out", type=Path, required=True, help="tile store folder")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda (cuda:LOCAL_RANK under torchrun) or auto (cuda where torch sees one)")
    parser.add_argument("--rank", type=int, default=None, help="default: $RANK or 0")
    parser.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE or 1")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (scale with processes instead)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--finalize-only", action="store_true",
                        help="only build index/config from finished units")
    add_config_options(parser, SpectrogramConfig, title="spectrogram")
    add_config_options(parser, TilingConfig, title="tiling")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl tile` / `python -m soundscape_ssl.tiles.tiling`: tile an inventory (this
    rank's share) into a store; prints a JSON summary. Returns the exit code; errors are one
    line on stderr (`core.cli.run_command`)."""
    return run_command("soundscape-ssl tile", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_options(SpectrogramConfig, args)  # the command is checked before any work
    tiling = config_from_options(TilingConfig, args)
    if args.finalize_only:
        print(json.dumps(finalize_store(args.out), sort_keys=True))
        return 0
    if args.inventory is None:
        parser.error("--inventory is required unless --finalize-only")
    summary = tile_archive(_read_inventory(args.inventory), args.out, config=config, tiling=tiling,
                           rank=args.rank, world_size=args.world_size, device=args.device,
                           show_progress=not args.no_progress, threads=args.threads)
    print(json.dumps(summary.as_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
