"""Validation on labelled recordings: every output space scored on the same labelled 3 s windows.

The question: do the embeddings separate species? A labelled set is a table of recordings, each
with one label (labels.csv: a path and a label per recording, as in
`../shared/data/labelled/xeno-canto-acrocephalus`). Each recording is cut into windows, and every
output space is scored on the same windows:

* each SSL checkpoint given, with each pooling (`mean` of the final patch tokens, `cls` token,
  `band`: the mean over time of each frequency row of patch tokens, rows side by side),
  embedded through `embed.embed_audio_files` (the checkpoint's own front end and normalisation);
* BirdNET V2.4 embeddings (1024-d) of the same spans (`birdnet.run_on_tiles`), when installed;
* the log-mel baseline: mean and std over time of each mel band of the window's log-mel tile
  (`baselines.logmel_stats_features`, the default 32 kHz / 128-mel front end).

Windows. The grid is every whole `window_s` span of a recording from 0 s with hop `window_s` (no
overlap, so no two windows share audio; a last partial span is left out rather than zero-padded,
which would give every space a padding artefact to key on). Which grid windows are scored is
`window_selection`:

* "top_k_energy" (default): per recording, the `top_k` windows with the highest in-band energy.
  Focal recordings hold pauses between songs; the loudest windows are those with the bird, and a
  fixed k gives every recording the same weight (with "all", a 5-minute recording would outweigh a
  30 s one tenfold in kNN votes and cluster sizes).
* "all": every window, pauses included.

In-band energy is the mean mel power between `energy_f_low_hz` and `energy_f_high_hz` (bins whose
centre lies in the band), in dB. The default 1-8 kHz holds the song of most passerines (the
Acrocephalus warblers' song energy lies at ~1.5-7 kHz) and leaves out wind, traffic and handling
noise below 1 kHz and most insect stridulation above 8 kHz, which would otherwise rank a noisy
window above a song.

Scores (all on the same selected windows, labels with fewer than `min_recordings_per_label`
recordings dropped because no split could ever train and test on them):

* kNN accuracy and macro-F1, folds grouped by recording (`metrics.knn_cross_validate`: no group
  is ever on both sides of a split; checked on every call), with a percentile bootstrap interval
  over recordings (`knn_accuracy`, `knn_macro_f1`) and a t-interval across folds
  (`knn_accuracy_fold_mean`);
* KMeans with k = number of labels on the standardised embedding (`cluster.fit_clusters`): NMI,
  ARI and V-measure against the labels, with a percentile bootstrap interval over recordings of
  the fixed clustering (the clustering is not refitted per resample: the interval is about the
  sample of recordings, not about KMeans' initialisation).

Products in `out_dir`::

    scores.csv / scores.json   tidy: space, pooling, metric, value, ci_low, ci_high, ci_method,
                               n_windows, n_recordings, n_groups, n_labels, n_dims, window_selection
                               (the JSON adds the run's metadata and the skipped spaces)
    windows.csv                every grid window: recording, path, label, group, offset_s,
                               in_band_db, energy_rank (1 = loudest in its recording), selected
    predictions.csv            per selected window and output space: the out-of-fold kNN
                               prediction, its fold, and the KMeans cluster
    fold_scores.csv            per output space and fold: sizes, accuracy, macro-F1
    embeddings/SPACE__POOLING.npy  each space's rows for the selected windows (windows.csv order)
    ssl/NAME/, birdnet/        the embedding stages' own products (with their provenance)
    skipped.csv                recordings that gave no window, with a reason
    config.json                the ValidateConfig, inputs and counts (written last)

`validate_synthetic_archive` builds a labelled set from a synthetic archive's annotations instead
(one window per planted bird call of sufficient SNR, labelled by species) and runs the same
scoring, so the demo validates without any external data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from .baselines import logmel_stats_features
from .metrics import KnnConfig, KnnResult, clustering_agreement, knn_cross_validate
from ..core.provenance import to_jsonable, write_config_json
from ..core.stage import atomic_save_npy, atomic_write, atomic_write_text
from ..tiles.spectrogram import SpectrogramConfig, downmix, mel_bin_centres_hz, waveform_to_tiles

logger = logging.getLogger(__name__)

STAGE = "validate"
WINDOW_SELECTIONS = ("all", "top_k_energy")
SSL_POOLINGS = ("mean", "cls", "band")    # embed.POOLINGS, without importing torch here
BIRDNET_SPACE = "birdnet_v2.4"
BIRDNET_POOLING = "global_avg_pool"     # BirdNET's own embedding: its penultimate layer
LOGMEL_SPACE = "logmel_stats"
LOGMEL_POOLING = "mean_std_over_time"
METRICS = ("knn_accuracy", "knn_macro_f1", "knn_accuracy_fold_mean", "kmeans_nmi", "kmeans_ari",
           "kmeans_v_measure")
SCORE_COLUMNS = ("space", "pooling", "metric", "value", "ci_low", "ci_high", "ci_method",
                 "n_windows", "n_recordings", "n_groups", "n_labels", "n_dims", "window_selection")
WINDOW_COLUMNS = ("window", "recording", "path", "label", "group", "offset_s", "window_s",
                  "in_band_db", "energy_rank", "selected")
# Offsets are compared in integer milliseconds: every front end puts spans on exact multiples of
# the hop, but as floats computed in different ways.
_OFFSET_KEY_SCALE = 1000


@dataclass
class ValidateConfig:
    """How labelled recordings are windowed and scored. Serialisable (`dataclasses.asdict`)."""

    window_s: float = 3.0                  # span scored by every output space (BirdNET's input)
    window_selection: str = "top_k_energy"  # "top_k_energy" or "all" (see the module docstring)
    top_k: int = 10                        # windows per recording kept by "top_k_energy"
    energy_f_low_hz: float = 1000.0        # band of the in-band energy that ranks windows
    energy_f_high_hz: float = 8000.0
    label_column: str = "auto"             # column of the labels CSV; "auto": label, else species
    path_column: str = "path"              # column with the recording's path (relative to audio_dir)
    group_columns: tuple[str, ...] = ()    # columns whose values form the split's groups; () = the
                                           # recording (e.g. recordist date: stricter, one session)
    min_recordings_per_label: int = 2      # labels with fewer groups are dropped (never testable)
    poolings: tuple[str, ...] = SSL_POOLINGS   # SSL poolings scored: "mean", "cls", "band"
    n_folds: int = 5                       # grouped kNN folds (clipped to the number of groups)
    k_neighbours: int = 10                 # kNN vote size
    knn_metric: str = "cosine"             # on features standardised per training fold
    n_bootstrap: int = 2000                # resamples of recordings for the intervals
    confidence_level: float = 0.95
    seed: int = 0                          # folds, KMeans, bootstrap
    include_birdnet: bool = True           # skipped with a note when BirdNET is not installed
    include_logmel: bool = True
    device: str = "auto"                   # SSL embedding: "auto", "cpu" or "cuda"
    batch_size: int = 64                   # SSL embedding batch
    birdnet_threads: int = 1               # LiteRT threads
    progress: bool = True

    def __post_init__(self) -> None:
        if self.window_selection not in WINDOW_SELECTIONS:
            raise ValueError(f"window_selection must be one of {WINDOW_SELECTIONS}, "
                             f"got {self.window_selection!r}")
        if self.window_s <= 0 or self.top_k < 1:
            raise ValueError(f"need window_s > 0 and top_k >= 1, got {self.window_s}, {self.top_k}")
        if not 0 <= self.energy_f_low_hz < self.energy_f_high_hz:
            raise ValueError(f"need 0 <= energy_f_low_hz < energy_f_high_hz, got "
                             f"{self.energy_f_low_hz}, {self.energy_f_high_hz}")
        self.poolings = tuple(self.poolings)
        self.group_columns = tuple(self.group_columns)
        unknown = set(self.poolings) - set(SSL_POOLINGS)
        if unknown or not self.poolings:
            raise ValueError(f"poolings must be a non-empty subset of {SSL_POOLINGS}, got {self.poolings}")
        if self.min_recordings_per_label < 2:
            raise ValueError("min_recordings_per_label must be >= 2: a label held by one recording "
                             "is never on both sides of a grouped split")
        # The kNN settings are checked where they are defined.
        self.knn_config(self.n_folds)

    def knn_config(self, n_folds: int) -> KnnConfig:
        return KnnConfig(k=self.k_neighbours, n_folds=n_folds, metric=self.knn_metric,
                         seed=self.seed, confidence_level=self.confidence_level,
                         n_bootstrap=self.n_bootstrap)

    def spectrogram_config(self) -> SpectrogramConfig:
        """The log-mel front end of the baseline and of the energy ranking: the project's default
        tile (32 kHz, 128 mels, 50-15000 Hz) with the window's length and hop."""
        config = SpectrogramConfig(tile_s=self.window_s, tile_hop_s=self.window_s)
        if self.energy_f_high_hz > config.f_max_hz:
            raise ValueError(f"energy_f_high_hz {self.energy_f_high_hz} is above the front end's "
                             f"f_max_hz {config.f_max_hz}")
        return config

    def describe_selection(self) -> str:
        """The window selection as written into every score row."""
        if self.window_selection == "all":
            return "all"
        return (f"top_{self.top_k}_energy_{self.energy_f_low_hz:g}-{self.energy_f_high_hz:g}Hz")


@dataclass
class SpaceResult:
    """One output space's rows and scores."""

    space: str
    pooling: str
    embeddings: np.ndarray             # (n_selected_windows, n_dims), windows.csv order
    knn: KnnResult
    clusters: np.ndarray               # KMeans cluster of every row
    agreement: dict[str, Any]          # metrics.clustering_agreement of the clusters


@dataclass
class ValidationResult:
    """Everything `run_validation` computed (also written to `out_dir`)."""

    scores: pd.DataFrame               # the tidy table (SCORE_COLUMNS)
    windows: pd.DataFrame              # every grid window (WINDOW_COLUMNS)
    spaces: dict[str, SpaceResult]     # by "space/pooling"
    skipped_spaces: dict[str, str]     # output spaces not scored, and why
    out_dir: Path

    @property
    def selected(self) -> pd.DataFrame:
        """The scored windows, in the row order of every space's embeddings."""
        return self.windows[self.windows["selected"]].reset_index(drop=True)

    def best(self, prefix: str = "ssl_", metric: str = "knn_accuracy",
             exclude_prefix: str | None = None) -> SpaceResult | None:
        """The space (name starting with `prefix`, not with `exclude_prefix`) with the highest
        `metric`, or None."""
        names = self.scores["space"]
        keep = names.str.startswith(prefix)
        if exclude_prefix:
            keep &= ~names.str.startswith(exclude_prefix)
        rows = self.scores[(self.scores["metric"] == metric) & keep]
        if rows.empty:
            return None
        top = rows.sort_values("value", ascending=False, kind="mergesort").iloc[0]
        return self.spaces[space_key(top["space"], top["pooling"])]


def space_key(space: str, pooling: str) -> str:
    return f"{space}/{pooling}"


# ----------------------------------------------------------------------------------------------
# Labelled recordings


def read_labelled_recordings(labels: str | os.PathLike | pd.DataFrame, audio_dir: str | os.PathLike,
                             config: ValidateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(recordings, skipped): one row per usable recording (recording, path, label, group).

    `recording` is the path as written in the labels table, `path` the resolved absolute path.
    Rows without a label or whose file does not exist go to `skipped` (logged), not to an error.
    """
    table = pd.read_csv(labels) if not isinstance(labels, pd.DataFrame) else labels.copy()
    label_column = config.label_column
    if label_column == "auto":
        label_column = next((c for c in ("label", "species") if c in table.columns), "label")
    missing = [c for c in (config.path_column, label_column, *config.group_columns)
               if c not in table.columns]
    if missing:
        raise ValueError(f"labels table lacks columns {missing}; it has {list(table.columns)}")
    audio_dir = Path(audio_dir)
    paths = [Path(p) if Path(p).is_absolute() else audio_dir / p for p in table[config.path_column].astype(str)]
    recordings = pd.DataFrame({
        "recording": table[config.path_column].astype(str),
        "path": [str(p.resolve()) for p in paths],
        "label": table[label_column],
    })
    if config.group_columns:
        recordings["group"] = table[list(config.group_columns)].astype(str).agg(" | ".join, axis=1)
    else:
        recordings["group"] = recordings["recording"]
    skipped = []
    no_label = recordings["label"].isna() | (recordings["label"].astype(str).str.strip() == "")
    no_file = ~np.array([Path(p).is_file() for p in recordings["path"]])
    duplicated = recordings["path"].duplicated(keep="first")
    for reason, mask in (("no_label", no_label), ("not_found", no_file & ~no_label),
                         ("duplicate", duplicated & ~no_file & ~no_label)):
        for recording in recordings.loc[mask, "recording"]:
            skipped.append({"recording": recording, "reason": reason, "detail": ""})
    if skipped:
        logger.warning("%d of %d labelled recordings skipped: %s", len(skipped), len(recordings),
                       pd.Series([s["reason"] for s in skipped]).value_counts().to_dict())
    keep = ~(no_label | no_file | duplicated)
    recordings = recordings[keep].reset_index(drop=True)
    recordings["label"] = recordings["label"].astype(str)
    return recordings, pd.DataFrame(skipped, columns=["recording", "reason", "detail"])


# ----------------------------------------------------------------------------------------------
# Windows: the grid, its in-band energy and log-mel tiles


def in_band_energy_db(tiles_db: np.ndarray, config: SpectrogramConfig, f_low_hz: float,
                      f_high_hz: float) -> np.ndarray:
    """Mean mel power (dB) of each tile over the bins whose centre lies in [f_low_hz, f_high_hz].

    The mean is taken on power, not on dB, so a loud song in part of the window counts as loud.
    """
    centres = mel_bin_centres_hz(config)
    band = (centres >= f_low_hz) & (centres <= f_high_hz)
    if not band.any():
        raise ValueError(f"no mel bin centre lies in {f_low_hz}-{f_high_hz} Hz")
    power = np.power(10.0, np.asarray(tiles_db, dtype=np.float64)[:, band, :] / 10.0)
    return (10.0 * np.log10(power.mean(axis=(1, 2)))).astype(np.float32)


def window_table(recordings: pd.DataFrame, config: ValidateConfig
                 ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Every whole grid window of every recording: (windows, log-mel features, skipped).

    windows: one row per window (WINDOW_COLUMNS but `selected`, which the caller sets); the
    log-mel statistics (N, 2 n_mels) are row-aligned with it. A file that cannot be decoded or
    holds no whole window is logged and listed in `skipped`.
    """
    spectrogram = config.spectrogram_config()
    frames: list[pd.DataFrame] = []
    features: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    for recording in tqdm(recordings.itertuples(index=False), total=len(recordings), unit="file",
                          desc="windows", disable=not config.progress):
        try:
            samples, sample_rate_hz = sf.read(recording.path, dtype="float32", always_2d=True)
            mono = downmix(samples)
            if not np.isfinite(mono).all():
                raise ValueError("NaN or infinite samples")
            tiles_db, offsets_s = waveform_to_tiles(mono, sample_rate_hz, spectrogram)
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as error:
            logger.warning("skip %s: %s", recording.path, error)
            skipped.append({"recording": recording.recording, "reason": "unreadable", "detail": str(error)})
            continue
        if len(tiles_db) == 0:
            logger.warning("skip %s: shorter than one %.1f s window", recording.path, config.window_s)
            skipped.append({"recording": recording.recording, "reason": "too_short",
                            "detail": f"{len(mono) / sample_rate_hz:.2f} s"})
            continue
        energy_db = in_band_energy_db(tiles_db, spectrogram, config.energy_f_low_hz,
                                      config.energy_f_high_hz)
        # Rank 1 = loudest; ties broken by time so the ranking is reproducible.
        order = np.lexsort((offsets_s, -energy_db))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        frames.append(pd.DataFrame({
            "recording": recording.recording, "path": recording.path,
            "label": getattr(recording, "label", None), "group": recording.group,
            "offset_s": offsets_s.astype(np.float64), "window_s": config.window_s,
            "in_band_db": energy_db, "energy_rank": rank,
        }))
        features.append(logmel_stats_features(tiles_db, progress=False))
    windows = (pd.concat(frames, ignore_index=True) if frames
               else pd.DataFrame(columns=[c for c in WINDOW_COLUMNS if c not in ("window", "selected")]))
    windows.insert(0, "window", np.arange(len(windows), dtype=np.int64))
    logmel = (np.concatenate(features) if features
              else np.zeros((0, 2 * spectrogram.n_mels), np.float32))
    return windows, logmel, pd.DataFrame(skipped, columns=["recording", "reason", "detail"])


def select_windows(windows: pd.DataFrame, config: ValidateConfig) -> np.ndarray:
    """Boolean mask of the windows `config.window_selection` keeps."""
    if config.window_selection == "all":
        return np.ones(len(windows), dtype=bool)
    return windows["energy_rank"].to_numpy() <= config.top_k


def _offset_keys(offsets_s: Any) -> np.ndarray:
    return np.round(np.asarray(offsets_s, dtype=np.float64) * _OFFSET_KEY_SCALE).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# A labelled set from a synthetic archive's annotations


def synthetic_call_windows(archive_dir: str | os.PathLike, window_s: float = 3.0,
                           min_snr_db: float = 10.0, group_by: str = "recorder") -> pd.DataFrame:
    """Labelled grid windows of a synthetic archive: one per planted bird call of sufficient SNR.

    A call (annotations.csv, kind "bird", snr_db >= min_snr_db) labels the grid window (hop =
    `window_s` from 0 s, the grid `window_table` uses) that holds its midpoint, with its species.
    Windows holding audible calls of two species are left out (their label would be ambiguous;
    counted in the log); several calls of one species give one window. Windows that are not whole
    are left out. `group_by`: "recorder" (default: one recorder's files share its individual
    birds and its site, so a split by file would let the same individual sit on both sides) or
    "file". Returns columns recording (relpath), path, label, group, offset_s, n_calls, max_snr_db.
    """
    from ..recordings.synth import read_annotations

    if group_by not in ("recorder", "file"):
        raise ValueError(f"group_by must be 'recorder' or 'file', got {group_by!r}")
    archive_dir = Path(archive_dir)
    annotations = read_annotations(archive_dir)
    calls = annotations[(annotations["kind"] == "bird") & (annotations["snr_db"] >= min_snr_db)].copy()
    columns = ["recording", "path", "label", "group", "offset_s", "n_calls", "max_snr_db"]
    if calls.empty:
        return pd.DataFrame(columns=columns)
    calls["span"] = np.floor((calls["start_s"] + calls["end_s"]) / 2 / window_s).astype(np.int64)
    durations = {file: sf.info(str(archive_dir / file)).duration for file in calls["file"].unique()}
    whole = (calls["span"] + 1) * window_s <= calls["file"].map(durations) + 1e-9
    calls = calls[whole]
    spans = calls.groupby(["file", "span"], sort=True).agg(
        recorder=("recorder", "first"), n_labels=("label", "nunique"), label=("label", "first"),
        n_calls=("label", "size"), max_snr_db=("snr_db", "max")).reset_index()
    ambiguous = spans["n_labels"] > 1
    if ambiguous.any():
        logger.info("%d of %d call windows hold audible calls of two or more species: left out",
                    int(ambiguous.sum()), len(spans))
    spans = spans[~ambiguous]
    return pd.DataFrame({
        "recording": spans["file"].to_numpy(),
        "path": [str((archive_dir / file).resolve()) for file in spans["file"]],
        "label": spans["label"].to_numpy(),
        "group": (spans["recorder"] if group_by == "recorder" else spans["file"]).to_numpy(),
        "offset_s": spans["span"].to_numpy() * window_s,
        "n_calls": spans["n_calls"].to_numpy(),
        "max_snr_db": spans["max_snr_db"].to_numpy(),
    }, columns=columns).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Output spaces


def _checkpoint_names(checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]
                      ) -> dict[str, Path]:
    """Names for checkpoints: given, or the folder name (runs/X/pretrain/mae/checkpoint.pth ->
    mae), made unique with a suffix."""
    if isinstance(checkpoints, Mapping):
        return {str(name): Path(path) for name, path in checkpoints.items()}
    names: dict[str, Path] = {}
    for path in map(Path, checkpoints):
        base = path.parent.name if path.stem == "checkpoint" and path.parent.name else path.stem
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "checkpoint"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names[name] = path
    return names


def _rows_for_windows(table: pd.DataFrame, windows: pd.DataFrame, what: str) -> np.ndarray:
    """Row of `table` (path, offset_s) for each window, by path and offset; KeyError names the
    first missing window."""
    table_keys = pd.MultiIndex.from_arrays([table["path"].astype(str).to_numpy(),
                                            _offset_keys(table["offset_s"])])
    window_keys = pd.MultiIndex.from_arrays([windows["path"].astype(str).to_numpy(),
                                             _offset_keys(windows["offset_s"])])
    if table_keys.has_duplicates:
        table_keys = table_keys.drop_duplicates()   # not expected; the first row is used
    positions = table_keys.get_indexer(window_keys)
    if (positions < 0).any():
        first = windows.iloc[int(np.flatnonzero(positions < 0)[0])]
        raise KeyError(f"{what} has no row for {int((positions < 0).sum())} window(s), e.g. "
                       f"{first['path']} at {first['offset_s']} s")
    return positions


def ssl_spaces(windows: pd.DataFrame, checkpoint: str | os.PathLike, work_dir: Path,
               config: ValidateConfig) -> dict[str, np.ndarray]:
    """{pooling: (n_windows, dim)} from one checkpoint, through `embed.embed_audio_files`.

    Every span of the windows' files is embedded (the audio command's grid: the checkpoint's
    tile length and hop from 0 s) and the windows' rows are picked by path and offset, so the
    checkpoint must cut `window_s` tiles on a hop that lands on the windows' offsets.
    """
    from ..pretrain.checkpoint import load_checkpoint
    from .embed import EmbedConfig, audio_output_paths, embed_audio_files

    metadata = load_checkpoint(checkpoint)
    spectrogram = metadata.get("spectrogram_config") or {}
    tile_s = spectrogram.get("tile_s")
    if tile_s is None or not math.isclose(float(tile_s), config.window_s):
        raise ValueError(f"the checkpoint embeds {tile_s} s tiles, the windows are {config.window_s} s")
    del metadata
    embed_config = EmbedConfig(pooling=",".join(config.poolings), batch_size=config.batch_size,
                               device=config.device)
    out_path = work_dir / "embeddings.npy"
    paths = sorted(windows["path"].unique())
    embed_audio_files(paths, checkpoint, out_path, embed_config, show_progress=config.progress)
    targets = audio_output_paths(out_path, embed_config.poolings)
    rows = pd.read_csv(targets["csv"])
    positions = _rows_for_windows(rows, windows, f"the embedding of {checkpoint}")
    if rows["padded"].to_numpy()[positions].any():
        logger.warning("%s: some windows were zero-padded by the embedding (audio ends early)",
                       checkpoint)
    return {name: np.load(targets[name])[positions] for name in config.poolings}


def birdnet_space(windows: pd.DataFrame, work_dir: Path, config: ValidateConfig) -> np.ndarray:
    """BirdNET V2.4 embeddings (n_windows, 1024) of exactly the windows' spans.

    `birdnet.run_on_tiles` is resumable: a rerun on the same windows reads the finished products
    back; results for other windows in `work_dir` are replaced.
    """
    from .birdnet import WINDOW_S, BirdNetConfig, load_results, run_on_tiles

    if not math.isclose(config.window_s, WINDOW_S):
        raise ValueError(f"BirdNET scores {WINDOW_S} s spans, the windows are {config.window_s} s")
    index = pd.DataFrame({"tile_id": np.arange(len(windows), dtype=np.int64),
                          "path": windows["path"].astype(str).to_numpy(),
                          "offset_s": windows["offset_s"].astype(np.float64).to_numpy()})
    birdnet_config = BirdNetConfig(num_threads=config.birdnet_threads, embedding_dtype="float32")
    try:
        run_on_tiles(index, work_dir, birdnet_config, rank=0, world_size=1, progress=config.progress)
    except ValueError as error:
        if "different tile index" not in str(error):
            raise
        logger.info("replacing BirdNET results for other windows in %s", work_dir)
        shutil.rmtree(work_dir)
        run_on_tiles(index, work_dir, birdnet_config, rank=0, world_size=1, progress=config.progress)
    frame, embeddings = load_results(work_dir)
    skipped = frame["skip_reason"].notna().to_numpy()
    if skipped.any():
        raise ValueError(f"BirdNET skipped {int(skipped.sum())} window(s): "
                         f"{frame.loc[skipped, 'skip_reason'].value_counts().to_dict()}")
    # detections are sorted by tile_id, which is the window's row here.
    return np.asarray(embeddings, dtype=np.float32)[frame["tile_id"].to_numpy().argsort()]


# ----------------------------------------------------------------------------------------------
# Scores


def agreement_from_contingency(counts: np.ndarray) -> dict[str, np.ndarray]:
    """NMI (arithmetic mean normalisation, = V-measure with beta 1), V-measure and ARI from
    contingency tables (..., n_labels, n_clusters) of (possibly weighted) counts, vectorised
    over the leading axes. Matches sklearn's scores on integer tables, edge cases included
    (a table with one label and one cluster scores 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=(-2, -1))
    a = counts.sum(axis=-1)                      # per label
    b = counts.sum(axis=-2)                      # per cluster

    def entropy(margins: np.ndarray) -> np.ndarray:
        p = margins / n[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)

    h_labels, h_clusters = entropy(a), entropy(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = counts * n[..., None, None] / (a[..., :, None] * b[..., None, :])
        mutual = np.sum(np.where(counts > 0, counts / n[..., None, None] * np.log(ratio), 0.0),
                        axis=(-2, -1))
        mutual = np.maximum(mutual, 0.0)         # rounding can make an independent table -1e-17
        denominator = (h_labels + h_clusters) / 2
        nmi = np.where(denominator > 0, mutual / denominator, 1.0)
        # sklearn: homogeneity (completeness) is 1 when the labels (clusters) have no entropy.
        homogeneity = np.where(h_labels > 0, mutual / h_labels, 1.0)
        completeness = np.where(h_clusters > 0, mutual / h_clusters, 1.0)
        v_measure = np.where(homogeneity + completeness > 0,
                             2 * homogeneity * completeness / (homogeneity + completeness), 0.0)
        pairs = np.sum(counts * (counts - 1), axis=(-2, -1)) / 2
        pairs_a = np.sum(a * (a - 1), axis=-1) / 2
        pairs_b = np.sum(b * (b - 1), axis=-1) / 2
        total = n * (n - 1) / 2
        expected = pairs_a * pairs_b / total
        maximum = (pairs_a + pairs_b) / 2
        ari = np.where(maximum != expected, (pairs - expected) / (maximum - expected), 1.0)
    return {"nmi": nmi, "v_measure": v_measure, "ari": ari}


def _bootstrap_weights(groups: np.ndarray, n_bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Group codes and (n_bootstrap, n_groups) multinomial resampling weights of the groups."""
    _, group_codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = group_codes.max() + 1
    weights = np.random.default_rng(seed).multinomial(
        n_groups, np.full(n_groups, 1.0 / n_groups), size=n_bootstrap)
    return group_codes, weights


def _resampled_agreement(clusters: np.ndarray, label_codes: np.ndarray, group_codes: np.ndarray,
                         weights: np.ndarray) -> dict[str, np.ndarray]:
    """NMI, V-measure and ARI of a fixed clustering under each row of group `weights`."""
    _, cluster_codes = np.unique(clusters, return_inverse=True)
    n_groups, n_labels, n_clusters = weights.shape[1], label_codes.max() + 1, cluster_codes.max() + 1
    per_group = np.zeros((n_groups, n_labels * n_clusters))
    np.add.at(per_group, (group_codes, label_codes * n_clusters + cluster_codes), 1.0)
    tables = (weights @ per_group).reshape(len(weights), n_labels, n_clusters)
    return agreement_from_contingency(tables)


def clustering_bootstrap(clusters: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                         n_bootstrap: int, confidence_level: float, seed: int
                         ) -> dict[str, tuple[float, float]]:
    """Percentile intervals of NMI, V-measure and ARI of a fixed clustering, with groups
    (recordings) resampled with replacement: per-group contingency tables summed with
    multinomial weights, so each resample costs one matrix product.

    Percentile intervals, read as spread: NMI and V-measure are biased upwards on small samples
    and a resample with repeated recordings has fewer independent ones, so their bootstrap
    distribution sits above the estimate (measured on the Acrocephalus set: NMI 0.20, interval
    0.15-0.38); the ARI, chance-corrected, shifts less."""
    if n_bootstrap == 0:
        return {"nmi": (float("nan"), float("nan")), "v_measure": (float("nan"), float("nan")),
                "ari": (float("nan"), float("nan"))}
    _, label_codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    group_codes, weights = _bootstrap_weights(groups, n_bootstrap, seed)
    scores = _resampled_agreement(clusters, label_codes, group_codes, weights)
    tail = (1 - confidence_level) / 2 * 100
    return {name: tuple(float(v) for v in np.nanpercentile(values, [tail, 100 - tail]))
            for name, values in scores.items()}


def paired_clustering_difference(clusters: np.ndarray, reference_clusters: np.ndarray, labels: np.ndarray,
                                 groups: np.ndarray, n_bootstrap: int = 2000, confidence_level: float = 0.95,
                                 seed: int = 0) -> pd.DataFrame:
    """Does one clustering agree with `labels` better than another? Paired over resampled groups.

    Both fixed clusterings are scored on the same resamples of groups (recordings), so what the
    two share (which recordings happen to be drawn) cancels in the difference. Rows nmi,
    v_measure and ari; columns: the estimate of each, their difference, its percentile interval
    and the share of resamples in which the difference is not positive (a one-sided p-value).
    """
    _, label_codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    group_codes, weights = _bootstrap_weights(groups, n_bootstrap, seed)
    resampled = _resampled_agreement(clusters, label_codes, group_codes, weights)
    reference = _resampled_agreement(reference_clusters, label_codes, group_codes, weights)
    estimate, reference_estimate = (clustering_agreement(clusters, labels),
                                    clustering_agreement(reference_clusters, labels))
    tail = (1 - confidence_level) / 2 * 100
    rows = []
    for name in ("nmi", "v_measure", "ari"):
        difference = resampled[name] - reference[name]
        low, high = np.nanpercentile(difference, [tail, 100 - tail])
        rows.append({"metric": name, "value": float(estimate[name]), "reference": float(reference_estimate[name]),
                     "difference": float(estimate[name] - reference_estimate[name]),
                     "ci_low": float(low), "ci_high": float(high),
                     "share_not_better": float(np.mean(difference[np.isfinite(difference)] <= 0))})
    return pd.DataFrame(rows).set_index("metric")


def paired_knn_difference(predictions: np.ndarray, reference_predictions: np.ndarray,
                          labels: np.ndarray, groups: np.ndarray, n_bootstrap: int = 2000,
                          confidence_level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Is one space's out-of-fold kNN accuracy higher than another's? Paired over resampled groups.

    Both prediction vectors are of the same rows; each resample of groups (recordings, with
    replacement) scores both, so the recordings that are easy or hard for every space cancel in
    the difference. One row, "knn_accuracy", with the columns of `paired_clustering_difference`.
    """
    if not len(predictions) == len(reference_predictions) == len(labels) == len(groups):
        raise ValueError("predictions, reference predictions, labels and groups must be of the same rows")
    labels = np.asarray(labels).astype(str)
    correct = np.asarray(predictions).astype(str) == labels
    reference_correct = np.asarray(reference_predictions).astype(str) == labels
    group_codes, weights = _bootstrap_weights(groups, n_bootstrap, seed)
    n_groups = weights.shape[1]
    rows_per_group = np.bincount(group_codes, minlength=n_groups)
    resampled_rows = weights @ rows_per_group
    difference = weights @ (np.bincount(group_codes, correct, n_groups)
                            - np.bincount(group_codes, reference_correct, n_groups)) / resampled_rows
    tail = (1 - confidence_level) / 2 * 100
    low, high = np.percentile(difference, [tail, 100 - tail])
    return pd.DataFrame([{
        "metric": "knn_accuracy", "value": float(correct.mean()), "reference": float(reference_correct.mean()),
        "difference": float(correct.mean() - reference_correct.mean()), "ci_low": float(low),
        "ci_high": float(high), "share_not_better": float(np.mean(difference <= 0))}]).set_index("metric")


def paired_against(result: "ValidationResult", reference: str, n_bootstrap: int = 2000,
                   confidence_level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Every other scored space against `reference` ("space/pooling"), paired over recordings:
    kNN accuracy (`paired_knn_difference`) and the KMeans NMI and ARI
    (`paired_clustering_difference`). Tidy: space, pooling, metric, value, reference, difference,
    ci_low, ci_high, share_not_better."""
    if reference not in result.spaces:
        raise KeyError(f"no space {reference!r} was scored; scored: {sorted(result.spaces)}")
    groups = result.selected["group"].to_numpy()
    base = result.spaces[reference]
    tables = []
    for key, space in result.spaces.items():
        if key == reference:
            continue
        knn = paired_knn_difference(space.knn.predictions, base.knn.predictions, space.knn.true_labels,
                                    groups, n_bootstrap, confidence_level, seed)
        clustering = paired_clustering_difference(space.clusters, base.clusters, space.knn.true_labels,
                                                  groups, n_bootstrap, confidence_level, seed)
        table = pd.concat([knn, clustering.loc[["nmi", "ari"]]]).reset_index()
        tables.append(table.assign(space=space.space, pooling=space.pooling))
    columns = ["space", "pooling", "metric", "value", "reference", "difference", "ci_low", "ci_high",
               "share_not_better"]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)


def score_space(space: str, pooling: str, embeddings: np.ndarray, labels: np.ndarray,
                groups: np.ndarray, config: ValidateConfig) -> SpaceResult:
    """Grouped kNN and KMeans (k = number of labels) scores of one output space.

    `config.n_folds` is lowered to the number of groups when there are fewer."""
    from .cluster import ClusterConfig, fit_clusters

    n_folds = min(config.n_folds, len(np.unique(groups.astype(str))))
    knn = knn_cross_validate(embeddings, labels, groups, config.knn_config(n_folds))
    n_labels = len(np.unique(labels))
    cluster_result = fit_clusters(np.asarray(embeddings, dtype=np.float32),
                                  ClusterConfig(n_clusters=n_labels, fit_subsample=None,
                                                seed=config.seed),
                                  progress=False)
    agreement = clustering_agreement(cluster_result.labels, labels)
    agreement["intervals"] = clustering_bootstrap(cluster_result.labels, labels, groups,
                                                  config.n_bootstrap, config.confidence_level,
                                                  config.seed)
    return SpaceResult(space, pooling, np.asarray(embeddings), knn, cluster_result.labels, agreement)


def score_rows(result: SpaceResult, n_recordings: int, n_groups: int, window_selection: str
               ) -> list[dict[str, Any]]:
    """The tidy rows (SCORE_COLUMNS) of one space."""
    knn, agreement = result.knn, result.agreement
    bootstrap = f"bootstrap_groups_{knn.config.n_bootstrap}"
    values = {
        "knn_accuracy": (knn.accuracy, knn.accuracy_ci_bootstrap, bootstrap),
        "knn_macro_f1": (knn.macro_f1, knn.macro_f1_ci_bootstrap, bootstrap),
        "knn_accuracy_fold_mean": (knn.accuracy_fold_mean, knn.accuracy_ci_t,
                                   f"t_over_{knn.config.n_folds}_folds"),
        "kmeans_nmi": (agreement["nmi"], agreement["intervals"]["nmi"], bootstrap),
        "kmeans_ari": (agreement["ari"], agreement["intervals"]["ari"], bootstrap),
        "kmeans_v_measure": (agreement["v_measure"], agreement["intervals"]["v_measure"], bootstrap),
    }
    common = {"n_windows": len(result.embeddings), "n_recordings": n_recordings,
              "n_groups": n_groups, "n_labels": len(knn.classes),
              "n_dims": int(result.embeddings.shape[1]), "window_selection": window_selection}
    return [{"space": result.space, "pooling": result.pooling, "metric": metric, "value": float(value),
             "ci_low": float(interval[0]), "ci_high": float(interval[1]), "ci_method": method, **common}
            for metric, (value, interval, method) in values.items()]


def _drop_rare_labels(windows: pd.DataFrame, config: ValidateConfig) -> pd.DataFrame:
    """Unselect windows of labels held by fewer than `min_recordings_per_label` groups."""
    selected = windows[windows["selected"]]
    groups_per_label = selected.groupby("label")["group"].nunique()
    rare = groups_per_label[groups_per_label < config.min_recordings_per_label]
    if len(rare):
        logger.warning("labels with fewer than %d recordings (groups) left out: %s",
                       config.min_recordings_per_label, rare.to_dict())
        windows = windows.copy()
        windows.loc[windows["label"].isin(rare.index), "selected"] = False
    return windows


def run_validation(windows: pd.DataFrame, logmel_features: np.ndarray | None,
                   checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                   out_dir: str | os.PathLike, config: ValidateConfig, window_selection: str,
                   skipped_recordings: pd.DataFrame | None = None,
                   inputs: dict[str, Any] | None = None) -> ValidationResult:
    """Score every output space on the selected windows and write the products (module docstring).

    windows: WINDOW_COLUMNS (from `window_table` with `selected` set); logmel_features: rows
    aligned with `windows` (None skips the baseline). An output space that cannot be computed
    (a checkpoint that cannot be read, BirdNET not installed ...) is logged and listed in
    `skipped_spaces`; the others are still scored.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    windows = _drop_rare_labels(windows.reset_index(drop=True), config)
    selected_mask = windows["selected"].to_numpy(dtype=bool)
    selected = windows[selected_mask].reset_index(drop=True)
    labels = selected["label"].astype(str).to_numpy()
    groups = selected["group"].astype(str).to_numpy()
    n_labels = len(np.unique(labels))
    if n_labels < 2:
        raise ValueError(f"{len(selected)} selected windows hold {n_labels} label(s) with at least "
                         f"{config.min_recordings_per_label} recordings: nothing to tell apart")
    n_recordings = int(selected["recording"].nunique())
    n_groups = len(np.unique(groups))
    logger.info("scoring %d windows of %d recordings (%d groups), %d labels, selection %s",
                len(selected), n_recordings, n_groups, n_labels, window_selection)
    if n_groups < config.n_folds:
        logger.warning("%d groups: n_folds %d lowered to %d", n_groups, config.n_folds, n_groups)

    candidates: dict[str, np.ndarray] = {}
    skipped_spaces: dict[str, str] = {}
    for name, checkpoint in _checkpoint_names(checkpoints).items():
        try:
            for pooling, values in ssl_spaces(selected, checkpoint, out_dir / "ssl" / name, config).items():
                candidates[space_key(f"ssl_{name}", pooling)] = values
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            logger.warning("SSL space %s (%s) skipped: %s", name, checkpoint, error)
            skipped_spaces[f"ssl_{name}"] = f"{type(error).__name__}: {error}"
    if config.include_birdnet:
        from .birdnet import birdnet_available

        available, why = birdnet_available()
        if not available:
            logger.warning("BirdNET skipped: %s", why)
            skipped_spaces[BIRDNET_SPACE] = why
        else:
            try:
                candidates[space_key(BIRDNET_SPACE, BIRDNET_POOLING)] = birdnet_space(
                    selected, out_dir / "birdnet", config)
            except (OSError, ValueError, RuntimeError) as error:
                logger.warning("BirdNET skipped: %s", error)
                skipped_spaces[BIRDNET_SPACE] = f"{type(error).__name__}: {error}"
    if config.include_logmel and logmel_features is not None:
        candidates[space_key(LOGMEL_SPACE, LOGMEL_POOLING)] = np.asarray(logmel_features)[selected_mask]

    spaces: dict[str, SpaceResult] = {}
    for key, values in tqdm(candidates.items(), desc="scoring", unit="space", disable=not config.progress):
        space, pooling = key.split("/")
        try:
            spaces[key] = score_space(space, pooling, values, labels, groups, config)
        except ValueError as error:           # e.g. NaN rows: one space, not the whole run
            logger.warning("output space %s not scored: %s", key, error)
            skipped_spaces[key] = f"{type(error).__name__}: {error}"

    rows = [row for result in spaces.values()
            for row in score_rows(result, n_recordings, n_groups, window_selection)]
    scores = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    windows = windows.assign(selected=selected_mask)
    _write_products(out_dir, scores, windows, selected, spaces, skipped_spaces,
                    skipped_recordings, config, window_selection, inputs or {},
                    {"n_windows_selected": len(selected), "n_windows_grid": len(windows),
                     "n_recordings": n_recordings, "n_groups": n_groups, "n_labels": n_labels,
                     "n_folds": min(config.n_folds, n_groups),
                     "windows_per_label": selected["label"].value_counts().sort_index().to_dict(),
                     "majority_label_share": float(selected["label"].value_counts(normalize=True).max())})
    return ValidationResult(scores, windows, spaces, skipped_spaces, out_dir)


def _write_products(out_dir: Path, scores: pd.DataFrame, windows: pd.DataFrame,
                    selected: pd.DataFrame, spaces: dict[str, SpaceResult],
                    skipped_spaces: dict[str, str], skipped_recordings: pd.DataFrame | None,
                    config: ValidateConfig, window_selection: str, inputs: dict[str, Any],
                    counts: dict[str, Any]) -> None:
    def write_csv(frame: pd.DataFrame, name: str) -> None:
        with atomic_write(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)

    write_csv(scores, "scores.csv")
    write_csv(windows[list(WINDOW_COLUMNS)], "windows.csv")
    predictions, folds = [], []
    embeddings_dir = out_dir / "embeddings"
    embeddings_dir.mkdir(exist_ok=True)
    for result in spaces.values():
        predictions.append(pd.DataFrame({
            "window": selected["window"].to_numpy(), "space": result.space, "pooling": result.pooling,
            "label": result.knn.true_labels, "knn_predicted": result.knn.predictions,
            "knn_fold": result.knn.fold_of_row, "kmeans_cluster": result.clusters}))
        folds.append(result.knn.fold_scores.assign(space=result.space, pooling=result.pooling))
        atomic_save_npy(embeddings_dir / f"{result.space}__{result.pooling}.npy",
                        np.asarray(result.embeddings, dtype=np.float32))
    if predictions:
        write_csv(pd.concat(predictions, ignore_index=True), "predictions.csv")
        write_csv(pd.concat(folds, ignore_index=True), "fold_scores.csv")
    write_csv(skipped_recordings if skipped_recordings is not None
              else pd.DataFrame(columns=["recording", "reason", "detail"]), "skipped.csv")
    summary = {"stage": STAGE, "window_selection": window_selection, **counts,
               "skipped_spaces": skipped_spaces, "inputs": inputs,
               "scores": scores.to_dict(orient="records")}
    atomic_write_text(out_dir / "scores.json",
                      json.dumps(to_jsonable(summary), indent=2, allow_nan=True) + "\n")
    write_config_json(out_dir, STAGE, config, window_selection=window_selection, inputs=inputs,
                      counts=counts, skipped_spaces=skipped_spaces,
                      products=["scores.csv", "scores.json", "windows.csv", "predictions.csv",
                                "fold_scores.csv", "skipped.csv", "embeddings/"])


# ----------------------------------------------------------------------------------------------
# Entry points


def validate(labels: str | os.PathLike | pd.DataFrame, audio_dir: str | os.PathLike,
             checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
             out_dir: str | os.PathLike, config: ValidateConfig | None = None) -> pd.DataFrame:
    """Score every output space on the labelled recordings; returns the tidy scores table.

    labels: a CSV (or DataFrame) with a path (relative to `audio_dir`, or absolute) and a label per
    recording. See `validate_labelled` for the full result (embeddings, kNN predictions).
    """
    return validate_labelled(labels, audio_dir, checkpoints, out_dir, config).scores


def validate_labelled(labels: str | os.PathLike | pd.DataFrame, audio_dir: str | os.PathLike,
                      checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                      out_dir: str | os.PathLike, config: ValidateConfig | None = None
                      ) -> ValidationResult:
    """`validate`, returning the whole `ValidationResult`."""
    config = config or ValidateConfig()
    recordings, skipped = read_labelled_recordings(labels, audio_dir, config)
    windows, logmel, unreadable = window_table(recordings, config)
    windows["selected"] = select_windows(windows, config)
    inputs = {"labels": labels if not isinstance(labels, pd.DataFrame) else "DataFrame",
              "audio_dir": str(audio_dir), "checkpoints": _checkpoint_names(checkpoints)}
    return run_validation(windows, logmel, checkpoints, out_dir, config, config.describe_selection(),
                          pd.concat([skipped, unreadable], ignore_index=True), inputs)


def validate_synthetic_archive(archive_dir: str | os.PathLike,
                               checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                               out_dir: str | os.PathLike, config: ValidateConfig | None = None,
                               min_snr_db: float = 10.0, group_by: str = "recorder") -> ValidationResult:
    """The same scoring on a synthetic archive's planted bird calls (`synthetic_call_windows`).

    The window selection is the calls' windows (reported as "planted_calls_snr>=X_dB"); the
    config's `window_selection` and `top_k` do not apply.
    """
    config = config or ValidateConfig()
    calls = synthetic_call_windows(archive_dir, config.window_s, min_snr_db, group_by)
    if calls.empty:
        raise ValueError(f"no planted bird call with snr_db >= {min_snr_db} in {archive_dir}")
    recordings = calls.drop_duplicates("path")[["recording", "path", "group"]].reset_index(drop=True)
    windows, logmel, skipped = window_table(recordings, config)
    labelled = calls.set_index(pd.MultiIndex.from_arrays([calls["path"], _offset_keys(calls["offset_s"])]))
    keys = pd.MultiIndex.from_arrays([windows["path"], _offset_keys(windows["offset_s"])])
    positions = labelled.index.get_indexer(keys)
    windows["label"] = np.where(positions >= 0, calls["label"].to_numpy()[positions], None)
    windows["selected"] = positions >= 0
    selection = f"planted_calls_snr>={min_snr_db:g}dB"
    inputs = {"archive_dir": str(archive_dir), "checkpoints": _checkpoint_names(checkpoints),
              "min_snr_db": min_snr_db, "group_by": group_by}
    return run_validation(windows, logmel, checkpoints, out_dir, config, selection, skipped, inputs)


def load_scores(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The tidy scores table of a finished validation (`scores.csv`)."""
    return pd.read_csv(Path(out_dir) / "scores.csv")


def scores_table(scores: pd.DataFrame, metrics: Sequence[str] = ("knn_accuracy", "kmeans_nmi",
                                                                  "kmeans_ari", "kmeans_v_measure")
                 ) -> pd.DataFrame:
    """Output spaces x metrics, each cell "value [ci_low, ci_high]" as text, for display."""
    shown = scores[scores["metric"].isin(metrics)].copy()
    shown["cell"] = [f"{v:.3f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                     zip(shown["value"], shown["ci_low"], shown["ci_high"])]
    table = shown.pivot_table(index=["space", "pooling"], columns="metric", values="cell",
                              aggfunc="first")
    return table[[m for m in metrics if m in table.columns]]


def build_parser() -> argparse.ArgumentParser:
    from ..pipeline.cli import add_dataclass_options

    parser = argparse.ArgumentParser(
        prog="soundscape-ssl validate",
        description="Score output spaces (SSL checkpoints with each pooling, BirdNET V2.4, the "
                    "log-mel baseline) on labelled recordings: KMeans NMI/ARI/V-measure with "
                    "k = number of labels, and kNN accuracy with folds grouped by recording.")
    parser.add_argument("--labels", type=Path, required=True,
                        help="CSV with a path (relative to --audio-dir) and a label per recording")
    parser.add_argument("--audio-dir", type=Path, required=True, help="folder the paths are relative to")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]CKPT",
                        help="a pretraining checkpoint.pth (repeatable); NAME= names its space")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_dataclass_options(parser.add_argument_group("validation"), ValidateConfig)
    return parser


def _parse_checkpoints(values: Sequence[str]) -> dict[str, Path] | list[Path]:
    named = [v for v in values if "=" in v and not Path(v).exists()]
    if not named:
        return [Path(v) for v in values]
    if len(named) != len(values):
        raise ValueError("name every --checkpoint (NAME=PATH) or none")
    return {name: Path(path) for name, path in (v.split("=", 1) for v in values)}


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl validate` / `python -m soundscape_ssl.analysis.validate`; prints the scores table."""
    from ..pipeline.cli import dataclass_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = dataclass_from_args(ValidateConfig, args)
        checkpoints = _parse_checkpoints(args.checkpoint)
    except ValueError as error:
        parser.error(str(error))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    scores = validate(args.labels, args.audio_dir, checkpoints, args.out, config)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(scores_table(scores).to_string())
    print(f"wrote {args.out / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
