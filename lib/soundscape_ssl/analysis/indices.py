"""Acoustic indices per tile (scikit-maad), a resumable, sharded stage aligned with the tile index.

Soundscape ecologists summarise a stretch of audio by acoustic indices. This stage computes,
for every tile of a tile store (or any table of windows), the standard set of scikit-maad: all
that `maad.features.all_temporal_alpha_indices` and `maad.features.all_spectral_alpha_indices`
return, 16 temporal and 44 spectral indices. scikit-maad computes them; nothing here
re-implements an index. Run it as a plain process, or sharded under torchrun::

    python -m soundscape_ssl.analysis.indices --store runs/R/tiles --out runs/R/indices
    torchrun --nproc-per-node 2 -m soundscape_ssl.analysis.indices --store ... --out ...

Products in the output folder: `indices.parquet` (one row per tile, in tile order: `tile_id`,
`skip_reason` (null when the indices were computed), then one float64 column per index,
NaN where scikit-maad gives none, e.g. entropies of digital silence) and `config.json`.

The audio. Each tile's span [offset_s, offset_s + window_s) is read from its source file through
the one reader (`core.audio`: decoded, mixed to mono, resampled to `sample_rate_hz` by the one
resampler, zero-padded past the end by the one window rule), by default at the tile store's rate
and tile length, so the indices describe the audio the model sees (up to the Nyquist frequency,
16 kHz at 32 kHz). Like scikit-maad's own loader (`maad.sound.load(detrend=True)`) the window's
mean is removed first. A window the reader cannot give (decoder error, non-finite samples) gets
NaN indices and its reason in `skip_reason`; it never stops the stage.

The indices and their settings (`IndicesConfig`; defaults are the settings of scikit-maad's own
example on the SM4 recorder of `data/indices`, the Jura set beside this project, and
scikit-maad's defaults for everything that example leaves out):

* spectrogram: `maad.sound.spectrogram`, Hann window of `nperseg` = 1024 samples, `noverlap` = 512,
  power spectral density (32 ms frames and 31.25 Hz bins at 32 kHz);
* temporal (envelope: maximum of 512-sample frames): ZCR (zero-crossing rate, per s); MEANt, VARt,
  SKEWt, KURTt (moments of the waveform); LEQt (equivalent level, dB SPL, from `gain_db`,
  `sensitivity_dbv`, `vadc_v` and `dbref_db`: an SM4 with its 26 dB preamplifier and 16 dB gain
  by default); BGNt, SNRt (background level and signal-to-noise ratio of the envelope); MED
  (median of the envelope); Ht (temporal entropy); ACTtFraction, ACTtCount, ACTtMean (frames above
  the background by `temporal_db_threshold` = 3 dB); EVNtFraction, EVNtMean, EVNtCount (events:
  runs of active frames longer than `temporal_reject_duration_s` = 0.01 s);
* spectral (bands: low `flim_low_hz` 0-1.5 kHz, mid 1.5-8 kHz, high 8-20 kHz): MEANf, VARf, SKEWf,
  KURTf (moments of the mean amplitude spectrum); NBPEAKS (spectral peaks); LEQf (equivalent level
  from the spectrum); ENRf, BGNf, SNRf (energy, background, SNR of the spectrogram); Hf (spectral
  entropy); EAS, ECU, ECV, EPS, EPS_KURT, EPS_SKEW (Towsey's spectral entropies of the
  noise-reduced spectrogram, mid to high band); ACI (acoustic complexity, summed over bins); NDSI,
  rBA, AnthroEnergy, BioEnergy (soundscape index: mid band = biophony, low band = anthropophony);
  BI (bioacoustic index, mid band); ROU (roughness); ADI, AEI (acoustic diversity and evenness in
  1 kHz bins from 0 Hz to the top of the mid band, -50 dB threshold); LFC, MFC, HFC (spectral cover
  per band, 3 dB above the noise); ACTspFract, ACTspCount, ACTspMean and EVNspFract, EVNspMean,
  EVNspCount (spectral activity and events, 3 dB, events longer than three frames); TFSD
  (time-frequency second derivative, mid band, third-octave, log); H_Havrda, H_Renyi,
  H_pairedShannon, H_gamma, H_GiniSimpson (entropies of the mean spectrum, order 3); RAOQ (Rao's
  quadratic entropy, 1 kHz bins); AGI (acoustic gradient index); nROI, aROI (number and area share
  of regions of interest: seed 13 dB, low 6 dB, at least 25 ms and 50 Hz, rain spikes removed).
  `r_compatible` = "soundecology" makes NDSI, rBA, AnthroEnergy, BioEnergy, BI, ADI and AEI follow
  the R package soundecology, as scikit-maad's example asks; "maad" gives scikit-maad's own.

Known answer: `tests/test_indices.py` recomputes, through this stage, the indices scikit-maad's
repository ships for the 96 Jura files (its `indices.csv`) and states which match, to what
tolerance, and why the others cannot.

Design (the same as tiling's; see `core.stage`): the plan is the windows in tile order cut into
units of `unit_max_tiles`; unit k belongs to rank k % world_size; each unit writes one Parquet
table through the runner (all or nothing, verified done markers), so a kill loses at most the
unit in flight and a rerun gives the same bytes; whoever finds every unit done merges them into
`indices.parquet` and writes `config.json` last. BLAS threads are held to `threads` (default 1):
the stage scales by processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..core.audio import AudioFile, AudioOpenError, WindowLoss, WindowRule, read_windows
from ..core.cli import CommandParser, run_command
from ..core.config import add_config_options, config_from_options, config_to_options
from ..core.stage import StagePlan, StageRun, atomic_write, read_plan
from ..tiles.store import INDEX_FILE as TILE_INDEX_FILE, read_store_metadata

logger = logging.getLogger(__name__)

STAGE = "indices"
INDICES_FILE = "indices.parquet"
UNITS_DIR = "units"
WINDOW_COLUMNS = ("tile_id", "path", "offset_s")

# The indices in the order scikit-maad returns them (checked against its output on every call).
TEMPORAL_INDICES = ("ZCR", "MEANt", "VARt", "SKEWt", "KURTt", "LEQt", "BGNt", "SNRt", "MED", "Ht",
                    "ACTtFraction", "ACTtCount", "ACTtMean", "EVNtFraction", "EVNtMean", "EVNtCount")
SPECTRAL_INDICES = ("MEANf", "VARf", "SKEWf", "KURTf", "NBPEAKS", "LEQf", "ENRf", "BGNf", "SNRf", "Hf",
                    "EAS", "ECU", "ECV", "EPS", "EPS_KURT", "EPS_SKEW", "ACI", "NDSI", "rBA", "AnthroEnergy",
                    "BioEnergy", "BI", "ROU", "ADI", "AEI", "LFC", "MFC", "HFC", "ACTspFract", "ACTspCount",
                    "ACTspMean", "EVNspFract", "EVNspMean", "EVNspCount", "TFSD", "H_Havrda", "H_Renyi",
                    "H_pairedShannon", "H_gamma", "H_GiniSimpson", "RAOQ", "AGI", "nROI", "aROI")
INDEX_NAMES = TEMPORAL_INDICES + SPECTRAL_INDICES

SKIP_REASONS = {
    "unreadable": "the decoder could not open the file",
    "decode_error": "the decoder failed on these frames",
    "non_finite_samples": "NaN or infinite samples in or near the window",
    "truncated": "the audio ends before the tile index said it would",
    "outside_audio": "the window starts after the end of the audio or holds less than half of it",
    "index_error": "scikit-maad raised an error on this window",
}

R_COMPATIBLE = ("soundecology", "maad")


@dataclass(frozen=True)
class IndicesConfig:
    """What the indices are computed on and with (scikit-maad's arguments, with units in names)."""

    sample_rate_hz: int | None = None           # audio resampled to this rate; None: the tile store's
    window_s: float | None = None               # window length; None: the tile store's tile_s
    detrend: bool = True                        # remove each window's mean (maad.sound.load's detrend)
    nperseg: int = 1024                         # spectrogram frame (samples), Hann window
    noverlap: int = 512                         # spectrogram overlap (samples)
    gain_db: float = 42.0                       # recorder gain for LEQt / LEQf (SM4: 26 dB preamp + 16 dB)
    sensitivity_dbv: float = -35.0              # microphone sensitivity (SM4: -35 dBV)
    vadc_v: float = 2.0                         # ADC range, peak to peak (V)
    dbref_db: float = 94.0                      # calibration level of the microphone (dB SPL)
    temporal_db_threshold: float = 3.0          # temporal activity / events: dB above the background
    temporal_reject_duration_s: float = 0.01    # temporal events shorter than this are dropped
    flim_low_hz: tuple[float, float] = (0.0, 1500.0)       # anthropophony band (NDSI, LFC, ADI/AEI start)
    flim_mid_hz: tuple[float, float] = (1500.0, 8000.0)    # biophony band (NDSI, BI, TFSD, MFC)
    flim_hi_hz: tuple[float, float] = (8000.0, 20000.0)    # high band (HFC; EAS..EPS span mid to high)
    r_compatible: str = "soundecology"          # "soundecology" (R package) or "maad" formulas
    unit_max_tiles: int = 256                   # tiles per work unit (the resume granularity)

    def __post_init__(self) -> None:
        if self.r_compatible not in R_COMPATIBLE:
            raise ValueError(f"r_compatible must be one of {R_COMPATIBLE}, got {self.r_compatible!r}")
        if not 0 <= self.noverlap < self.nperseg:
            raise ValueError(f"need 0 <= noverlap < nperseg, got {self.noverlap} and {self.nperseg}")
        if self.unit_max_tiles <= 0:
            raise ValueError(f"unit_max_tiles must be positive, got {self.unit_max_tiles}")
        for name in ("flim_low_hz", "flim_mid_hz", "flim_hi_hz"):
            low, high = getattr(self, name)
            if not 0 <= low < high:
                raise ValueError(f"{name} must be (low, high) with 0 <= low < high, got {(low, high)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, sample_rate_hz: int, window_s: float) -> "IndicesConfig":
        """This config with the rate and window filled in where they were left to the store."""
        return dataclasses.replace(
            self, sample_rate_hz=int(self.sample_rate_hz or sample_rate_hz),
            window_s=float(self.window_s or window_s))


def maad_version() -> str:
    from importlib.metadata import version

    return version("scikit-maad")


# ----------------------------------------------------------------------------------------------
# One window


def window_indices(waveform: np.ndarray, sample_rate_hz: int, config: IndicesConfig) -> np.ndarray:
    """The indices of one mono waveform, float64 in `INDEX_NAMES` order, by scikit-maad's two
    `all_*_alpha_indices` functions with `config`'s settings."""
    from maad import features, sound

    samples = np.asarray(waveform, dtype=np.float64)
    if config.detrend:
        samples = samples - samples.mean()
    with warnings.catch_warnings():
        # scikit-maad warns on every log of zero (silence) and divides by zero in entropies:
        # the value becomes NaN or inf, which the table keeps; the warnings say nothing more.
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            temporal = features.all_temporal_alpha_indices(
                samples, sample_rate_hz, gain=config.gain_db, sensitivity=config.sensitivity_dbv,
                Vadc=config.vadc_v, dBref=config.dbref_db, dB_threshold=config.temporal_db_threshold,
                rejectDuration=config.temporal_reject_duration_s)
            power, times_s, freqs_hz, _ = sound.spectrogram(
                samples, sample_rate_hz, window="hann", nperseg=config.nperseg,
                noverlap=config.noverlap)
            spectral, _ = features.all_spectral_alpha_indices(
                power, times_s, freqs_hz, flim_low=list(config.flim_low_hz),
                flim_mid=list(config.flim_mid_hz), flim_hi=list(config.flim_hi_hz),
                gain=config.gain_db, sensitivity=config.sensitivity_dbv, Vadc=config.vadc_v,
                dBref=config.dbref_db, R_compatible=config.r_compatible)
    names = tuple(temporal.columns) + tuple(spectral.columns)
    if names != INDEX_NAMES:
        raise RuntimeError(f"scikit-maad {maad_version()} returned indices {names}, expected "
                           f"{INDEX_NAMES}: update INDEX_NAMES and the documented list")
    values = np.concatenate([temporal.to_numpy(np.float64)[0], spectral.to_numpy(np.float64)[0]])
    return np.where(np.isfinite(values), values, np.nan)


# ----------------------------------------------------------------------------------------------
# Plan


@dataclass
class IndicesPlan:
    windows: pd.DataFrame            # tile_id, path, offset_s in tile order
    config: IndicesConfig            # resolved: rate and window set
    units: list[tuple[int, int]]     # [start, stop) rows of the windows table
    fingerprint: str

    def description(self) -> dict[str, Any]:
        return {"stage": STAGE, "config": self.config.to_dict(), "fingerprint": self.fingerprint,
                "n_units": len(self.units), "n_tiles": len(self.windows),
                "scikit_maad": maad_version(), "indices": list(INDEX_NAMES)}


def plan_indices(windows: pd.DataFrame, config: IndicesConfig) -> IndicesPlan:
    """Sort the windows by tile_id and cut them into units; the fingerprint pins the windows, the
    config and scikit-maad's version (the values depend on all three)."""
    missing = [column for column in WINDOW_COLUMNS if column not in windows.columns]
    if missing:
        raise ValueError(f"the windows table lacks columns {missing} (a tile index has them)")
    if config.sample_rate_hz is None or config.window_s is None:
        raise ValueError("resolve the config's sample_rate_hz and window_s first (IndicesConfig.resolved)")
    WindowRule.from_seconds(config.sample_rate_hz, config.window_s, config.window_s)  # whole samples
    table = windows.loc[:, list(WINDOW_COLUMNS)].sort_values("tile_id", kind="stable").reset_index(drop=True)
    if table["tile_id"].duplicated().any():
        raise ValueError("tile_id values repeat in the windows table")
    table["tile_id"] = table["tile_id"].astype(np.int64)
    table["offset_s"] = table["offset_s"].astype(np.float64)
    table["path"] = table["path"].astype(str)
    step = config.unit_max_tiles
    units = [(start, min(start + step, len(table))) for start in range(0, len(table), step)]
    identity = [table["tile_id"].tolist(), table["path"].tolist(), table["offset_s"].tolist()]
    digest = hashlib.sha256(json.dumps([config.to_dict(), maad_version(), identity]).encode()).hexdigest()
    return IndicesPlan(table, config, units, digest)


def stage_plan(description: dict[str, Any]) -> StagePlan:
    return StagePlan(STAGE, description, int(description["n_units"]), unit_noun="unit",
                     units_dir=UNITS_DIR, title="acoustic indices")


def store_windows(store_dir: str | os.PathLike, every: int = 1) -> tuple[pd.DataFrame, int, float]:
    """(windows, sample_rate_hz, tile_s) of a finished tile store: its index (every `every`-th
    tile, from tile 0: a systematic subsample that keeps every recorder and hour) and its config."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    metadata = read_store_metadata(store_dir)
    windows = pq.read_table(Path(store_dir) / TILE_INDEX_FILE, columns=list(WINDOW_COLUMNS)).to_pandas()
    spectrogram = metadata["config"]
    return (windows.iloc[::every].reset_index(drop=True), int(spectrogram["sample_rate_hz"]),
            float(spectrogram["tile_s"]))


# ----------------------------------------------------------------------------------------------
# Units


UNIT_SCHEMA = pa.schema([pa.field("tile_id", pa.int64()), pa.field("skip_reason", pa.string())]
                        + [pa.field(name, pa.float64()) for name in INDEX_NAMES])


def _file_runs(paths: np.ndarray) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of equal consecutive paths."""
    start = 0
    for position in range(1, len(paths) + 1):
        if position == len(paths) or paths[position] != paths[start]:
            yield start, position
            start = position


def compute_unit(windows: pd.DataFrame, config: IndicesConfig,
                 progress: tqdm | None = None) -> pa.Table:
    """The indices of a run of windows (rows in tile order), one row per window, as a table."""
    rule = WindowRule.from_seconds(config.sample_rate_hz, config.window_s, config.window_s)
    n = len(windows)
    values = np.full((n, len(INDEX_NAMES)), np.nan)
    reasons: list[str | None] = [None] * n
    paths = windows["path"].to_numpy()
    offsets = windows["offset_s"].to_numpy()
    for start, stop in _file_runs(paths):
        rows = np.arange(start, stop)
        starts = np.round(offsets[rows] * config.sample_rate_hz).astype(np.int64)
        order = np.argsort(starts, kind="stable")        # the reader wants non-decreasing starts
        try:
            audio = AudioFile(paths[start], piece_s=config.window_s)
        except AudioOpenError as error:
            logger.warning("indices: %s unreadable (%s): %d window(s) skipped", paths[start], error, len(rows))
            for row in rows:
                reasons[row] = "unreadable"
            if progress is not None:
                progress.update(len(rows))
            continue
        losses: list[WindowLoss] = []
        with audio:
            for batch in read_windows(audio, rule, rows[order], starts[order], losses):
                waveforms = batch.waveforms.cpu().numpy()
                for row, waveform in zip(batch.numbers, waveforms):
                    try:
                        values[row] = window_indices(waveform, config.sample_rate_hz, config)
                    except (ValueError, ArithmeticError, IndexError) as error:
                        logger.warning("indices: %s at %.3f s: scikit-maad failed (%s)", paths[row],
                                       offsets[row], error)
                        reasons[row] = "index_error"
                    if progress is not None:
                        progress.update(1)
        for loss in losses:
            logger.warning("indices: %s [%s] %s (%d window(s))", paths[start], loss.reason, loss.detail,
                           len(loss.numbers))
            for row in loss.numbers:
                reasons[int(row)] = loss.reason
            if progress is not None:
                progress.update(len(loss.numbers))
    columns = {"tile_id": pa.array(windows["tile_id"].to_numpy(np.int64)),
               "skip_reason": pa.array(reasons, pa.string())}
    columns.update({name: pa.array(values[:, j]) for j, name in enumerate(INDEX_NAMES)})
    return pa.table(columns, schema=UNIT_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Entry points


@dataclass
class IndicesSummary:
    out_dir: str
    rank: int
    world_size: int
    n_units: int
    units_written: int
    tiles_computed: int
    wall_s: float
    finalized: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compute_indices(windows: pd.DataFrame, out_dir: str | os.PathLike, config: IndicesConfig,
                    rank: int | None = None, world_size: int | None = None,
                    show_progress: bool = True, threads: int | None = 1) -> IndicesSummary:
    """This rank's share of the indices of `windows` (tile_id, path, offset_s) into `out_dir`;
    finalises when every unit is done. `config` must be resolved (rate and window set). Safe to
    rerun: done units are kept, others redone. `threads`: BLAS threads during the call."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_indices(windows, config)
    with threadpool_limits(limits=threads), StageRun(out_dir, stage_plan(plan.description()),
                                                       rank, world_size) as run:
        todo = list(run.todo)
        n_todo = sum(plan.units[k][1] - plan.units[k][0] for k in todo)
        progress = tqdm(total=n_todo, unit="tile", desc=f"indices rank {run.rank}/{run.world_size}",
                        disable=not show_progress or run.rank != 0, dynamic_ncols=True)
        try:
            for k in todo:
                start, stop = plan.units[k]
                table = compute_unit(plan.windows.iloc[start:stop], plan.config, progress)
                with run.unit(k) as unit:
                    pq.write_table(table, unit.output(run.unit_path(k, ".parquet")))
        finally:
            progress.close()
        finalized = run.all_units_done()
        if finalized:
            run.finalize(lambda: _merge_units(out_dir))
        summary = IndicesSummary(str(out_dir), run.rank, run.world_size, len(plan.units), len(todo),
                                 n_todo, time.perf_counter() - started, finalized)
    return summary


def compute_store_indices(store_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          config: IndicesConfig | None = None, every: int = 1, **options: Any) -> IndicesSummary:
    """`compute_indices` for every tile (or every `every`-th tile) of a finished tile store, at its
    rate and tile length unless `config` sets them."""
    windows, sample_rate_hz, tile_s = store_windows(store_dir, every)
    return compute_indices(windows, out_dir, (config or IndicesConfig()).resolved(sample_rate_hz, tile_s),
                           **options)


def _merge_units(out_dir: Path) -> dict[str, Any]:
    plan = read_plan(out_dir)
    tables = [pq.read_table(out_dir / UNITS_DIR / f"unit-{k:06d}.parquet", schema=UNIT_SCHEMA)
              for k in range(int(plan["n_units"]))]
    table = pa.concat_tables(tables) if tables else UNIT_SCHEMA.empty_table()
    with atomic_write(out_dir / INDICES_FILE) as tmp:
        pq.write_table(table, tmp)
    reasons = pd.Series(table.column("skip_reason").to_pylist(), dtype=object).dropna()
    return dict(config=plan["config"], scikit_maad=plan["scikit_maad"], indices=plan["indices"],
                fingerprint=plan["fingerprint"], skip_reasons=SKIP_REASONS,
                counts={"n_tiles": table.num_rows, "skipped": reasons.value_counts().to_dict()},
                layout={"indices": INDICES_FILE})


def read_indices(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The finished indices table (tile_id, skip_reason, one column per index)."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        raise FileNotFoundError(f"{out_dir}/config.json not found: the indices stage has not finished there")
    return pq.read_table(out_dir / INDICES_FILE).to_pandas()


# ----------------------------------------------------------------------------------------------
# Command line


def command_arguments(store_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      config: IndicesConfig | None = None, every: int = 1, show_progress: bool = False) -> list[str]:
    """Arguments of `python -m soundscape_ssl.analysis.indices` (e.g. under torchrun) that compute
    the indices of `store_dir` (every `every`-th tile) into `out_dir` with exactly `config`."""
    arguments = ["--store", str(store_dir), "--out", str(out_dir), "--every", str(every),
                 *config_to_options(config or IndicesConfig())]
    return arguments if show_progress else [*arguments, "--no-progress"]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="soundscape-ssl indices",
        description="Acoustic indices (scikit-maad) of every tile of a tile store (resumable; run under "
                    "torchrun as python -m soundscape_ssl.analysis.indices to shard across processes).")
    parser.add_argument("--store", type=Path, required=True, help="a finished tile store folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--rank", type=int, default=None, help="default: $RANK or 0")
    parser.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE or 1")
    parser.add_argument("--every", type=int, default=1, help="every n-th tile only (a systematic subsample)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per process")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_options(parser, IndicesConfig, title="indices")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl indices` / `python -m soundscape_ssl.analysis.indices`; prints a JSON summary."""
    return run_command("soundscape-ssl indices", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_options(IndicesConfig, args)
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    summary = compute_store_indices(args.store, args.out, config, every=args.every, rank=args.rank, world_size=args.world_size,
                                    show_progress=not args.no_progress, threads=args.threads)
    print(json.dumps(summary.as_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
