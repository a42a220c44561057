"""The audio and the picture of single tiles, for people: the report's clips and thumbnails.

A resumable stage on `core.stage`: for each requested tile of a tile store it writes

    media/tile-NNNNNNN.ogg   the tile's span of its recording (3 s by default), cut through the one
                             audio reader (`core.audio.read_windows`: the same window rule and
                             resampler as tiling, so the clip is exactly the audio the tile shows, at
                             the tiles' sample rate), with a short raised-cosine fade in and out so
                             it starts and ends in silence and does not click; Ogg Vorbis by default
                             (about 25 kB per 3 s at 32 kHz), FLAC on request (lossless, ~4x larger)
    media/tile-NNNNNNN.png   its spectrogram thumbnail (`tile_plots.TileThumbnails`: `draw_tile`
                             with time in s, frequency in kHz and its level colour bar)
    clips.csv                one row per tile: where its clip and thumbnail are, the gain applied,
                             its peak level, and why a clip is missing (the audio could not be read)

Level. A field recording is mostly quiet; at its recorded level a tile of a distant bird is
inaudible on a laptop. Each clip is raised (or lowered) so that its peak sits at
`target_peak_dbfs`, by at most `max_gain_db`, and the gain is recorded: the report says "played
+24 dB" beside the player, and a near-silent tile stays quiet rather than becoming loud hiss.

Units are the requested tiles of one recording (at most `max_tiles_per_unit` each), in the
order of the recordings' relative paths, so a file is decoded once. A killed run resumes with
the units it finished; `plan.json` pins the tile ids, the store and the settings. Ogg streams
carry a random serial number (libsndfile draws it), so a redone Vorbis clip sounds the same but
differs in a few bytes; FLAC clips and the thumbnails are the same bytes on every run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from ..core.audio import AudioFile, AudioOpenError, WindowLoss, WindowRule, read_windows
from ..core.stage import StagePlan, StageRun, atomic_write_text, torch_threads
from ..tiles.spectrogram import SpectrogramConfig
from ..tiles.store import TileStore
from .tile_plots import TileThumbnails

logger = logging.getLogger(__name__)

STAGE = "report_clips"
MEDIA_DIR = "media"
UNITS_DIR = "units"
TABLE_FILE = "clips.csv"
FORMAT_VERSION = 1
AUDIO_FORMATS = {"ogg": ("OGG", "VORBIS", ".ogg"), "flac": ("FLAC", "PCM_16", ".flac")}
TABLE_COLUMNS = ["tile_id", "relpath", "offset_s", "clip", "thumbnail", "clip_s", "peak_dbfs", "gain_db",
                 "loss_reason"]


@dataclass(frozen=True)
class ClipConfig:
    """How tiles become clips and thumbnails."""

    fade_s: float = 0.01              # raised-cosine fade in and out (s): no click at either end
    target_peak_dbfs: float = -3.0    # each clip's peak is brought to this level ...
    max_gain_db: float = 30.0         # ... raised by at most this much (a near-silent tile stays quiet)
    audio_format: str = "ogg"         # "ogg" (Vorbis) or "flac"
    thumbnail_dpi: int = 100          # thumbnails are 3.0 x 1.9 in: 300 x 190 px at 100 dpi
    max_tiles_per_unit: int = 64      # tiles of one recording per resumable unit

    def __post_init__(self) -> None:
        if self.audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {sorted(AUDIO_FORMATS)}, got {self.audio_format!r}")
        if not 0.0 <= self.fade_s <= 0.5:
            raise ValueError(f"fade_s must be between 0 and 0.5 s, got {self.fade_s}")
        if self.max_gain_db < 0 or self.target_peak_dbfs > 0:
            raise ValueError("max_gain_db must be >= 0 and target_peak_dbfs <= 0 dBFS")
        if self.thumbnail_dpi < 20 or self.max_tiles_per_unit < 1:
            raise ValueError("thumbnail_dpi must be >= 20 and max_tiles_per_unit >= 1")


def clip_name(tile_id: int, config: ClipConfig) -> str:
    return f"{MEDIA_DIR}/tile-{int(tile_id):07d}{AUDIO_FORMATS[config.audio_format][2]}"


def thumbnail_name(tile_id: int) -> str:
    return f"{MEDIA_DIR}/tile-{int(tile_id):07d}.png"


# ----------------------------------------------------------------------------------------------
# Samples


def fade_in_out(n_samples: int, fade_samples: int) -> np.ndarray:
    """Gains (n_samples,): a raised-cosine rise from exactly 0 over the first `fade_samples`, 1 in
    between, and the mirror image at the end (the last sample is exactly 0)."""
    gains = np.ones(n_samples, np.float32)
    fade = min(fade_samples, n_samples // 2)
    if fade > 0:
        rise = (0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)).astype(np.float32)
        gains[:fade] = rise
        gains[n_samples - fade:] = rise[::-1]
    return gains


def prepare_clip(samples: np.ndarray, sample_rate_hz: int, config: ClipConfig) -> tuple[np.ndarray, float, float]:
    """(clip samples, peak dBFS before gain, gain dB): the level brought towards
    `target_peak_dbfs` (by at most `max_gain_db`), then faded in and out."""
    samples = np.asarray(samples, dtype=np.float32)
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    peak_dbfs = 20.0 * math.log10(peak) if peak > 0 else -math.inf
    gain_db = min(config.max_gain_db, config.target_peak_dbfs - peak_dbfs) if peak > 0 else 0.0
    clip = samples * np.float32(10.0 ** (gain_db / 20.0))
    clip *= fade_in_out(len(clip), round(config.fade_s * sample_rate_hz))
    return np.clip(clip, -1.0, 1.0), peak_dbfs, gain_db


def read_tile_audio(path: str, offsets_s: Sequence[float], spectrogram: SpectrogramConfig
                    ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """The audio of tiles of one recording at the tiles' sample rate, through the one reader.

    `offsets_s` are the tiles' starts in the file (the tile index's offset_s). Returns
    ({position: samples of the tile's real audio (valid_s long, padding cut)}, {position: why it
    could not be read}) with positions in `offsets_s`.
    """
    rule = WindowRule.from_seconds(spectrogram.sample_rate_hz, spectrogram.tile_s, spectrogram.tile_hop_s)
    offsets = np.asarray(offsets_s, dtype=np.float64)
    numbers = np.rint(offsets / rule.hop_s).astype(np.int64)
    if not np.allclose(numbers * rule.hop_s, offsets, atol=1e-6):
        raise ValueError(f"{path}: tile offsets {offsets.tolist()} are not multiples of the tile hop {rule.hop_s} s")
    order = np.argsort(numbers, kind="stable")
    audio_of: dict[int, np.ndarray] = {}
    lost: dict[int, str] = {}
    position_of = {int(numbers[p]): int(p) for p in order}
    try:
        audio = AudioFile(path)
    except AudioOpenError as error:
        return {}, {int(p): f"unreadable: {error}" for p in order}
    losses: list[WindowLoss] = []
    with audio:
        # One window per block: the requested tiles are a few scattered spans of a long recording,
        # and only those spans are decoded and resampled.
        for batch in read_windows(audio, rule, numbers[order], numbers[order] * rule.hop_samples, losses,
                                  block_s=rule.window_s,
                                  lowpass_filter_width=spectrogram.resample_lowpass_filter_width,
                                  rolloff=spectrogram.resample_rolloff):
            for number, valid_s, waveform in zip(batch.numbers, batch.valid_s, batch.waveforms):
                valid = round(float(valid_s) * rule.sample_rate_hz)
                audio_of[position_of[int(number)]] = waveform[:valid].cpu().numpy().copy()
    for loss in losses:
        for number in loss.numbers:
            lost[position_of[int(number)]] = f"{loss.reason}: {loss.detail}"
    return audio_of, lost


# ----------------------------------------------------------------------------------------------
# The stage


def _plan_units(index: pd.DataFrame, tile_ids: Sequence[int], max_tiles: int) -> list[pd.DataFrame]:
    """The requested tiles' index rows, one frame per unit: by recording (relpath order), then offset."""
    rows = index.set_index("tile_id").loc[sorted({int(t) for t in tile_ids})].reset_index()
    rows = rows.sort_values(["relpath", "offset_s"], kind="stable")
    units = []
    for _, part in rows.groupby("relpath", sort=True):
        for start in range(0, len(part), max_tiles):
            units.append(part.iloc[start:start + max_tiles])
    return units


def _plan(store: TileStore, tile_ids: Sequence[int], config: ClipConfig, n_units: int) -> dict[str, Any]:
    ids = sorted({int(t) for t in tile_ids})
    description = {
        "stage": STAGE,
        "format_version": FORMAT_VERSION,
        "store": {"path": str(store.store_dir.resolve()), "fingerprint": store.metadata.get("fingerprint"),
                  "n_tiles": len(store)},
        "tile_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "n_tiles": len(ids),
        "n_units": n_units,
        "config": dataclasses.asdict(config),
    }
    # A moved store is the same input: its path stays out of the fingerprint.
    pinned = {**description, "store": {k: description["store"][k] for k in ("fingerprint", "n_tiles")}}
    description["fingerprint"] = hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()
    return description


def _write_unit(run: StageRun, unit_id: int, tiles: pd.DataFrame, store: TileStore, config: ClipConfig,
                thumbnails: TileThumbnails) -> None:
    out_dir = run.folder
    sound_format, subtype, _ = AUDIO_FORMATS[config.audio_format]
    audio_of, lost = read_tile_audio(str(tiles["path"].iloc[0]), tiles["offset_s"].to_numpy(), store.config)
    rate = store.config.sample_rate_hz
    rows = []
    with run.unit(unit_id) as unit:
        for position, tile in enumerate(tiles.itertuples(index=False)):
            tile_id = int(tile.tile_id)
            thumbnails.write_png(store[tile_id], unit.output(out_dir / thumbnail_name(tile_id)),
                                 title=f"tile {tile_id} · {tile.recorder}")
            row = {"tile_id": tile_id, "relpath": tile.relpath, "offset_s": float(tile.offset_s), "clip": "",
                   "thumbnail": thumbnail_name(tile_id), "clip_s": 0.0, "peak_dbfs": None, "gain_db": None,
                   "loss_reason": lost.get(position, "")}
            if position in audio_of:
                clip, peak_dbfs, gain_db = prepare_clip(audio_of[position], rate, config)
                sf.write(unit.output(out_dir / clip_name(tile_id, config)), clip, rate, format=sound_format,
                         subtype=subtype)
                row.update(clip=clip_name(tile_id, config), clip_s=round(len(clip) / rate, 6),
                           peak_dbfs=None if math.isinf(peak_dbfs) else round(peak_dbfs, 2),
                           gain_db=round(gain_db, 2))
            elif not row["loss_reason"]:
                row["loss_reason"] = "no audio: the reader returned no window for this tile"
            rows.append(row)
        with open(unit.output(run.unit_path(unit_id, ".json")), "w") as handle:
            json.dump(rows, handle, indent=1)


def _merge(out_dir: Path, n_units: int, config: ClipConfig, run: StageRun) -> dict[str, Any]:
    rows = []
    for unit_id in range(n_units):
        rows += json.loads(run.unit_path(unit_id, ".json").read_text())
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("tile_id", kind="stable")
    atomic_write_text(out_dir / TABLE_FILE, table.to_csv(index=False))
    n_lost = int((table["clip"] == "").sum())
    return {"config": config, "n_tiles": len(table), "n_clips": len(table) - n_lost, "n_lost": n_lost}


def _write_units(run: StageRun, units: list[pd.DataFrame], store: TileStore, config: ClipConfig, threads: int,
                 show_progress: bool) -> None:
    """This run's units on `threads` threads, each with its own store reader and thumbnail figure
    (neither is shared between threads). Decoding, resampling, encoding and the PNG and disk work
    release the GIL, so two threads use two cores for most of a unit; torch gets one thread each."""
    local = threading.local()
    failed = threading.Event()     # after a failure no further unit starts; the ones in flight finish

    def write(unit_id: int) -> None:
        if failed.is_set():
            return
        try:
            if not hasattr(local, "thumbnails"):
                local.store = copy.copy(store)      # a fresh shard cache (TileStore.__getstate__)
                local.thumbnails = TileThumbnails(store.config, dpi=config.thumbnail_dpi)
            _write_unit(run, unit_id, units[unit_id], local.store, config, local.thumbnails)
        except BaseException:
            failed.set()
            raise

    with torch_threads(1), ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=len(run.todo), desc="report clips", unit="recording", disable=not show_progress) as bar:
        for _ in pool.map(write, run.todo):
            bar.update()


def cut_clips(store_dir: str | os.PathLike, tile_ids: Sequence[int], out_dir: str | os.PathLike,
              config: ClipConfig | None = None, show_progress: bool = True, threads: int = 2) -> pd.DataFrame:
    """Clips and thumbnails of `tile_ids` into `out_dir` (module docstring) on `threads` threads;
    returns clips.csv. The files do not depend on `threads`.

    Resumable: finished units are kept and verified, the rest redone. A folder started for other
    tiles, another store or other settings is refused (`core.stage.PlanMismatchError`)."""
    config = config or ClipConfig()
    out_dir = Path(out_dir)
    store = TileStore(store_dir)
    index = store.index
    if not np.array_equal(index["tile_id"].to_numpy(), np.arange(len(index))):
        raise ValueError(f"{store_dir}: tile ids are not 0..N-1 in order")
    unknown = [int(t) for t in tile_ids if not 0 <= int(t) < len(index)]
    if unknown:
        raise ValueError(f"tile ids {unknown[:5]} are not in the store {store_dir} ({len(index)} tiles)")
    units = _plan_units(index, tile_ids, config.max_tiles_per_unit)
    description = _plan(store, tile_ids, config, len(units))
    plan = StagePlan(STAGE, description, len(units), unit_noun="unit", units_dir=UNITS_DIR,
                     title="report clips", unpinned=("store.path",))
    with StageRun(out_dir, plan, rank=0, world_size=1) as run:
        if not run.finished:
            (out_dir / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
            _write_units(run, units, store, config, max(1, threads), show_progress)
            run.finalize(lambda: _merge(out_dir, len(units), config, run))
    table = pd.read_csv(out_dir / TABLE_FILE, keep_default_na=False, na_values={"peak_dbfs": [""], "gain_db": [""]})
    n_lost = int((table["clip"] == "").sum())
    if n_lost:
        logger.warning("%d of %d tiles have no clip (their audio could not be read): see %s", n_lost,
                       len(table), out_dir / TABLE_FILE)
    return table
