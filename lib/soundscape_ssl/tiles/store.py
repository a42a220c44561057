"""The tile store: its on-disk layout and its readers (random access, sequential streaming).

Layout of a store folder (written by `soundscape_ssl.tiles.tiling.tile_archive`)::

    plan.json                       what is being built: configs, input fingerprint, unit count
    units/unit-000000.npy           float16 (n, n_mels, n_frames) log-mel tiles in dB, per unit
    units/unit-000000.skipped.parquet   audio of that unit that gave no tile, with a reason
    units/unit-000000.parquet       that unit's tile index
    units/unit-000000.done          written last: the unit is done (sizes and sha256 of its files)
    index.parquet                   all tiles, row i = tile_id i (finalise)
    skipped.parquet                 all skips (finalise)
    config.json                     spectrogram config, normalisation statistics, counts (finalise,
                                    written last: a store without it is unfinished)
    finalize.lock, .claims/         the stage runner's locks (`soundscape_ssl.core.stage`)

Why plain `.npy` shards: `np.load(mmap_mode="r")` gives zero-copy random access to any tile with
no extra dependency, one file per work unit keeps each write atomic (temporary file + rename)
and lets a rerun skip finished units, and float16 halves the size (a 3 s tile is 64 KiB; dB values from
-100 to ~+60 keep ~0.03 dB resolution). Global order: tile_id increases with (unit, row), which
is file order (by relpath) then time.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .spectrogram import SpectrogramConfig, mel_bin_centres_hz

STAGE = "tiles"
PLAN_FILE = "plan.json"
UNITS_DIR = "units"
INDEX_FILE = "index.parquet"
SKIPPED_FILE = "skipped.parquet"
CONFIG_FILE = "config.json"

# One row per tile. Level statistics are computed on the tile's resampled waveform (rms, peak)
# and on its mel power (flatness); mel_mean_db / mel_std_db on the stored float16 values, which
# is what the normalisation statistics are combined from. valid_s: seconds of real audio in the
# tile; padded: the tile runs past the end of its file and was zero-padded (the window rule of
# soundscape_ssl.core.audio keeps such a tile when at least half of it is audio).
UNIT_INDEX_SCHEMA = pa.schema([
    ("recorder", pa.string()),
    ("habitat", pa.string()),
    ("path", pa.string()),
    ("relpath", pa.string()),
    ("file_start_time", pa.timestamp("ns")),
    ("offset_s", pa.float64()),
    ("valid_s", pa.float32()),
    ("padded", pa.bool_()),
    ("timestamp", pa.timestamp("ns")),
    ("source_sample_rate_hz", pa.int32()),
    ("rms_dbfs", pa.float32()),
    ("peak_dbfs", pa.float32()),
    ("spectral_flatness", pa.float32()),
    ("mel_mean_db", pa.float64()),
    ("mel_std_db", pa.float64()),
    ("shard", pa.int32()),
    ("shard_row", pa.int32()),
])
INDEX_SCHEMA = pa.schema([pa.field("tile_id", pa.int64())] + list(UNIT_INDEX_SCHEMA))

# One row per run of lost tiles of one file (or per file that gave no tile at all).
SKIPPED_SCHEMA = pa.schema([
    ("unit", pa.int32()),
    ("path", pa.string()),
    ("relpath", pa.string()),
    ("recorder", pa.string()),
    ("reason", pa.string()),       # machine-readable code, see soundscape_ssl.tiles.tiling.SKIP_REASONS
    ("detail", pa.string()),       # human-readable message
    ("offset_s", pa.float64()),    # start of the first lost tile; NaN when the file gave no tile
    ("n_tiles_lost", pa.int64()),  # planned tiles lost (0 for files without tiles, damage notes)
])


def unit_name(unit_id: int) -> str:
    return f"unit-{unit_id:06d}"


def shard_path(store_dir: str | os.PathLike, unit_id: int) -> Path:
    return Path(store_dir) / UNITS_DIR / f"{unit_name(unit_id)}.npy"


def unit_index_path(store_dir: str | os.PathLike, unit_id: int) -> Path:
    return Path(store_dir) / UNITS_DIR / f"{unit_name(unit_id)}.parquet"


def unit_skipped_path(store_dir: str | os.PathLike, unit_id: int) -> Path:
    return Path(store_dir) / UNITS_DIR / f"{unit_name(unit_id)}.skipped.parquet"


def read_store_metadata(store_dir: str | os.PathLike) -> dict[str, Any]:
    """The store's `config.json`; a clear error when the store is missing or unfinished."""
    path = Path(store_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {store_dir} is not a finished tile store (run the tiling to the "
            "end, or `python -m soundscape_ssl.tiles.tiling --finalize-only --out STORE`)")
    metadata = json.loads(path.read_text())
    if metadata.get("stage") != STAGE:
        raise ValueError(f"{path} belongs to stage {metadata.get('stage')!r}, not {STAGE!r}")
    return metadata


class TileStore:
    """Random access to a finished tile store: `store[i]` is tile i, O(1), via memory-mapped shards.

    Shards are opened lazily with `np.load(mmap_mode="r")` and kept in a small LRU for random
    access (each open memory map holds a file descriptor; archives can have thousands of shards).
    `read_range`, the sequential reader every streaming pass uses, does not add to the LRU: a map
    kept open keeps every page read through it counted in the process's resident memory, so
    streaming a whole store through the LRU held up to 64 shards' pages (measured by
    benchmarks/scale.py: peak RSS of the baselines 2.4x from 10k to 160k tiles). Safe to use in
    DataLoader workers: open maps are not pickled, each worker opens its own.
    """

    def __init__(self, store_dir: str | os.PathLike, max_open_shards: int = 64) -> None:
        self.store_dir = Path(store_dir)
        self.metadata = read_store_metadata(self.store_dir)
        self.config = SpectrogramConfig.from_dict(self.metadata["config"])
        self.normalization: dict[str, float] = {
            "mean": float(self.metadata["normalization"]["mean"]),
            "std": float(self.metadata["normalization"]["std"]),
        }
        locations = pq.read_table(self.store_dir / INDEX_FILE, columns=["shard", "shard_row"])
        # int32 locations: 8 bytes per tile, copied into every DataLoader worker
        self._shard = locations.column("shard").to_numpy().astype(np.int32)
        self._row = locations.column("shard_row").to_numpy().astype(np.int32)
        self._max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._index: pd.DataFrame | None = None

    @property
    def tile_shape(self) -> tuple[int, int]:
        return (self.config.n_mels, self.config.n_frames)

    @property
    def index(self) -> pd.DataFrame:
        """The tile index as a pandas DataFrame (row i = tile i), loaded on first use."""
        if self._index is None:
            self._index = pq.read_table(self.store_dir / INDEX_FILE).to_pandas()
        return self._index

    @property
    def skipped(self) -> pd.DataFrame:
        """Audio that gave no tile, with reasons (pandas DataFrame)."""
        return pq.read_table(self.store_dir / SKIPPED_FILE).to_pandas()

    def __len__(self) -> int:
        return len(self._shard)

    def shard(self, unit_id: int) -> np.ndarray:
        """The memory-mapped float16 array of one shard (n, n_mels, n_frames)."""
        shard = self._open.get(unit_id)
        if shard is not None:
            self._open.move_to_end(unit_id)
            return shard
        shard = self._map_shard(unit_id)
        self._open[unit_id] = shard
        if len(self._open) > self._max_open_shards:
            self._open.popitem(last=False)
        return shard

    def _map_shard(self, unit_id: int) -> np.ndarray:
        shard = np.load(shard_path(self.store_dir, unit_id), mmap_mode="r")
        if shard.dtype != np.float16 or shard.shape[1:] != self.tile_shape:
            raise ValueError(f"shard {unit_id} has {shard.dtype} {shard.shape}, expected float16 "
                             f"(n, {self.tile_shape[0]}, {self.tile_shape[1]})")
        return shard

    def _streaming_shard(self, unit_id: int) -> np.ndarray:
        """An open map from the LRU, else a transient one, unmapped when the caller drops it."""
        shard = self._open.get(unit_id)
        return self._map_shard(unit_id) if shard is None else shard

    def _position(self, tile_id: int) -> int:
        n = len(self)
        position = int(tile_id) + n if tile_id < 0 else int(tile_id)
        if not 0 <= position < n:
            raise IndexError(f"tile {tile_id} out of range for a store of {n} tiles")
        return position

    def __getitem__(self, tile_id: int) -> np.ndarray:
        """Tile `tile_id`: float16 (n_mels, n_frames) log-mel in dB, unnormalised (a copy)."""
        position = self._position(tile_id)
        return np.array(self.shard(int(self._shard[position]))[int(self._row[position])])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Tiles [start, stop) as one float16 array, read shard by shard with contiguous slices."""
        start, stop = max(0, start), min(len(self), stop)
        out = np.empty((max(0, stop - start),) + self.tile_shape, np.float16)
        position = start
        while position < stop:
            unit_id, row = int(self._shard[position]), int(self._row[position])
            shard = self._streaming_shard(unit_id)
            count = min(stop - position, shard.shape[0] - row)
            out[position - start:position - start + count] = shard[row:row + count]
            position += count
        return out

    def read_rows(self, tile_ids: Any) -> np.ndarray:
        """Tiles at `tile_ids` (any order, e.g. a random subsample) as one float16 array, in that
        order; read shard by shard, like `read_range`, without pinning the shards it maps."""
        positions = np.asarray(tile_ids, dtype=np.int64).reshape(-1)
        positions = np.where(positions < 0, positions + len(self), positions)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"tile ids out of range for a store of {len(self)} tiles")
        out = np.empty((len(positions),) + self.tile_shape, np.float16)
        shard_of = self._shard[positions]
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for group in np.split(order, bounds) if order.size else []:
            shard = self._streaming_shard(int(shard_of[group[0]]))
            rows = self._row[positions[group]]
            sorted_rows = np.argsort(rows, kind="stable")   # forward through the file
            out[group[sorted_rows]] = shard[rows[sorted_rows]]
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_index"] = None
        return state


ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)

# What `normalize_tiles` does after (x - mean) / std; recorded in every checkpoint's normalisation.
BACKGROUND_REMOVALS = ("none", "band_median", "pcen")
# PCEN (per-channel energy normalisation, Wang et al. 2017; Lostanlen et al. 2019) on the stored
# log-mel power: a smoother with a 0.4 s time constant (34 frames of a 3 s, 256-frame tile, the
# librosa default), gain exponent 0.98, bias 2 and root 0.5 (librosa's defaults).
PCEN_TIME_CONSTANT_FRAMES = 34.0
PCEN_GAIN = 0.98
PCEN_BIAS = 2.0
PCEN_POWER = 0.5
PCEN_EPS = 1e-12


def band_median(tiles: ArrayOrTensor) -> ArrayOrTensor:
    """Each mel band's median over the tile's frames: (..., n_mels, n_frames) -> (..., n_mels, 1).

    The one definition of "band median" in the project, used by the model's background removal
    (`remove_band_background`) and by the attention notebook's energy baseline. It is the *lower*
    median: for an even number of frames (256 per tile) the smaller of the two middle values,
    which is what `torch.median` returns. Chosen because training already defines the model's
    input with it (so every trained checkpoint's input is unchanged), and because it is a level
    that occurs in the band, not a value between two cells. A numpy array is answered as a
    float32 numpy array, computed by the same torch call.
    """
    if isinstance(tiles, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        return tensor.median(dim=-1, keepdim=True).values.numpy()
    return tiles.median(dim=-1, keepdim=True).values


def _band_bins(config: SpectrogramConfig, f_low_hz: float, f_high_hz: float) -> np.ndarray:
    centres = mel_bin_centres_hz(config)
    band = (centres >= f_low_hz) & (centres <= f_high_hz)
    if not band.any():
        raise ValueError(f"no mel bin centre lies in {f_low_hz}-{f_high_hz} Hz")
    return band


def in_band_energy_db(tiles_db: np.ndarray, config: SpectrogramConfig, f_low_hz: float,
                      f_high_hz: float) -> np.ndarray:
    """Mean mel power (dB) of each tile over the bins whose centre lies in [f_low_hz, f_high_hz].

    The mean is taken on power, not on dB, so a loud song in part of the window counts as loud.
    """
    band = _band_bins(config, f_low_hz, f_high_hz)
    power = np.power(10.0, np.asarray(tiles_db, dtype=np.float64)[:, band, :] / 10.0)
    return (10.0 * np.log10(power.mean(axis=(1, 2)))).astype(np.float32)


def activity_above_floor_db(tiles_db: np.ndarray, config: SpectrogramConfig, f_low_hz: float = 1000.0,
                            f_high_hz: float = 8000.0) -> np.ndarray:
    """Unsupervised activity of each tile: its in-band mean power over its in-band noise floor, in dB.

    The floor is each band's `band_median` over the tile (its steady level); the ratio of the band's
    mean power to the floor's mean power is ~0 dB for steady noise, wind or silence and rises with
    every call that stands out of it, whatever the recorder's gain. No label is involved.
    """
    band = _band_bins(config, f_low_hz, f_high_hz)
    in_band = np.asarray(tiles_db, dtype=np.float32)[:, band, :]
    power = np.power(10.0, in_band.astype(np.float64) / 10.0)
    floor = np.power(10.0, band_median(in_band).astype(np.float64) / 10.0)
    return (10.0 * np.log10(power.mean(axis=(1, 2)) / floor.mean(axis=(1, 2)))).astype(np.float32)


def store_activity_db(store: "TileStore", f_low_hz: float = 1000.0, f_high_hz: float = 8000.0,
                      batch_tiles: int = 1024) -> np.ndarray:
    """`activity_above_floor_db` of every tile of a store, read in contiguous batches."""
    return np.concatenate([activity_above_floor_db(store.read_range(start, start + batch_tiles), store.config,
                                                   f_low_hz, f_high_hz)
                           for start in range(0, len(store), batch_tiles)] or [np.zeros(0, np.float32)])


def remove_band_background(tiles: torch.Tensor) -> torch.Tensor:
    """Keep only what rises above each mel band's median over the tile (`band_median`), floored at 0.

    (..., n_mels, n_frames) -> same shape. The median of a band over a 3 s tile is its stationary
    background (noise floor, wind, a distant chorus); calls are short and sit above it. Removing it
    per tile takes away what two crops of one tile share besides their content (the recorder's
    noise floor, its gain, the weather), the shortcut that let joint-embedding SSL match views by
    background and organise the map by level (see notebook 04). Scale-free: the same on dB or on
    normalised values, since the median commutes with an increasing affine map.
    """
    return (tiles - band_median(tiles)).clamp_min(0.0)


def input_normalization(statistics: Mapping[str, Any], background: str | None = None) -> dict[str, Any]:
    """The model-input normalisation {"mean", "std", "background"} from stored statistics.

    `background` overrides the one in `statistics` (a tile store has none: "none").
    """
    background = background or statistics.get("background") or "none"
    if background not in BACKGROUND_REMOVALS:
        raise ValueError(f"background removal must be one of {BACKGROUND_REMOVALS}, got {background!r}")
    return {"mean": float(statistics["mean"]), "std": float(statistics["std"]), "background": background}


def normalize_tiles(tiles: np.ndarray | torch.Tensor,
                    normalization: Mapping[str, Any]) -> torch.Tensor:
    """float16/float32 dB tiles (..., n_mels, n_frames) -> float32 model input.

    (x - mean) / std with the store's statistics, then the background removal named by
    `normalization["background"]` (absent = "none"): training and every inference path call this.
    """
    if isinstance(tiles, np.ndarray):
        tensor = torch.from_numpy(tiles.astype(np.float32))
    else:
        tensor = tiles.to(torch.float32)
    tensor = (tensor - normalization["mean"]) / normalization["std"]
    return remove_background(tensor, normalization)


def remove_background(tiles: torch.Tensor, normalization: Mapping[str, Any]) -> torch.Tensor:
    """Normalised whole tiles (..., n_mels, n_frames) -> the model's input under
    `normalization["background"]` (absent = "none"); `mean`/`std` give the dB scale PCEN needs.

    The one place a background removal is applied: `normalize_tiles` (every inference path) and
    training's views (`pretrain.augment.Normalization.model_input`) both call it, on whole tiles.
    """
    background = normalization.get("background") or "none"
    if background == "band_median":
        return remove_band_background(tiles)
    if background == "pcen":
        return pcen(tiles * normalization["std"])   # dB relative to the archive's mean level
    if background != "none":
        raise ValueError(f"background removal must be one of {BACKGROUND_REMOVALS}, got {background!r}")
    return tiles


def pcen(tiles_db: torch.Tensor) -> torch.Tensor:
    """PCEN of log-mel tiles (..., n_mels, n_frames) in dB relative to a reference level (the
    model input uses the archive's mean level), shifted so a steady band at the reference gives 0.

    E = 10^(dB/10); M is E smoothed along time by a one-pole filter whose state starts at the
    band's median power (so the tile's first frames need no warm-up); the output is
    (E / (eps + M)^0.98 + 2)^0.5 - 2^0.5 - ((1 + 2)^0.5 - 2^0.5): a sound's ratio to its band's
    recent level, compressed. A steady band gives E / M^0.98 = E^0.02, i.e. 0 at the reference
    level and within 0.1 of 0 for 25 dB either side, like `remove_band_background`'s floor.
    Computed in float64 as a closed-form cumulative sum (no per-frame loop); float32 out.
    """
    power = torch.pow(10.0, tiles_db.to(torch.float64) / 10.0)
    n_frames = power.shape[-1]
    t = PCEN_TIME_CONSTANT_FRAMES
    smoothing = (math.sqrt(1.0 + 4.0 * t * t) - 1.0) / (2.0 * t * t)   # librosa's b for hop 1
    keep = 1.0 - smoothing
    steps = torch.arange(n_frames, dtype=torch.float64, device=power.device)
    # M[k] = keep^(k+1) M0 + smoothing * sum_{j<=k} keep^(k-j) E[j]
    decay = keep ** steps
    start = band_median(power)
    smoothed = (keep * decay * start
                + smoothing * decay * torch.cumsum(power / decay, dim=-1))
    ratio = power / (PCEN_EPS + smoothed) ** PCEN_GAIN
    compressed = (ratio + PCEN_BIAS) ** PCEN_POWER - PCEN_BIAS ** PCEN_POWER
    steady = (1.0 + PCEN_BIAS) ** PCEN_POWER - PCEN_BIAS ** PCEN_POWER
    return (compressed - steady).to(torch.float32)


class TileDataset(torch.utils.data.Dataset):
    """Training view of a store: item i is a float32 tensor (1, n_mels, n_frames).

    Normalised with the store's global mean/std (dB) when `normalize` is true. Training applies the
    configured background removal to each augmented view (`pretrain.augment.augmented_views`).
    """

    def __init__(self, store_dir: str | os.PathLike, normalize: bool = True) -> None:
        self.store = TileStore(store_dir)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> torch.Tensor:
        tile = self.store[index]
        if self.normalize:
            return normalize_tiles(tile, self.store.normalization).unsqueeze(0)
        return torch.from_numpy(tile.astype(np.float32)).unsqueeze(0)


class TileBatch(NamedTuple):
    tile_ids: np.ndarray     # (B,) int64, rows of the store's index
    tiles: torch.Tensor      # (B, 1, n_mels, n_frames) float32


class TileStream:
    """Sequential inference over a store in batches, in tile_id order, with flat memory.

    Reads contiguous slices of each shard (no per-tile random access). `rank` / `world_size`
    split the store into contiguous, near-equal ranges so that ranks of a distributed inference
    job read disjoint shards.
    """

    def __init__(self, store_dir: str | os.PathLike, batch_size: int = 256, normalize: bool = True,
                 start: int = 0, stop: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.store = TileStore(store_dir)
        self.batch_size = batch_size
        self.normalize = normalize
        first, last = max(0, start), len(self.store) if stop is None else min(stop, len(self.store))
        span = max(0, last - first)
        self.start = first + span * rank // world_size
        self.stop = first + span * (rank + 1) // world_size

    def __len__(self) -> int:
        """Number of batches."""
        return -(-(self.stop - self.start) // self.batch_size)

    def __iter__(self) -> Iterator[TileBatch]:
        for batch_start in range(self.start, self.stop, self.batch_size):
            batch_stop = min(batch_start + self.batch_size, self.stop)
            tiles = self.store.read_range(batch_start, batch_stop)
            tensor = (normalize_tiles(tiles, self.store.normalization) if self.normalize
                      else torch.from_numpy(tiles.astype(np.float32)))
            yield TileBatch(np.arange(batch_start, batch_stop, dtype=np.int64), tensor.unsqueeze(1))
