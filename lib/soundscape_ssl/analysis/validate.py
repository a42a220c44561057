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

Windows. The grid is the one window rule of `soundscape_ssl.core.audio` with window and hop
`window_s` from 0 s (no overlap, so no two windows share audio), read through the one audio
reader, so the windows are those the tile store, `embed --audio` and BirdNET cut from the same
file. The rule keeps a last partial window, zero-padded, when at least half of it is audio;
such padded windows are listed in windows.csv (`valid_s`, `padded`) but never scored: zero
padding would give every space an artefact to key on. Which whole windows are scored is
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

* kNN accuracy and macro-F1, folds grouped (`metrics.knn_cross_validate`: no group is ever on
  both sides of a split; checked on every call), with a percentile bootstrap interval over the
  groups (`knn_accuracy`, `knn_macro_f1`) and a t-interval across folds
  (`knn_accuracy_fold_mean`);
* KMeans with k = number of labels on the standardised embedding (`cluster.fit_clusters`): NMI,
  ARI and V-measure against the labels, with a percentile bootstrap interval over the groups of
  the fixed clustering (the clustering is not refitted per resample: the interval is about the
  sample of recordings, not about KMeans' initialisation; for NMI and V-measure, biased upwards
  in resamples, it is a spread, not a confidence interval, and its method says so).

Groups (`group_by`). The unit the folds never split and the bootstrap resamples: "recording"
(default), or a column of the labels table or of a metadata table joined on the path
(`metadata_csv`), e.g. "recordist": one recordist's recordings may share a site, a day and a
bird, so grouping by recordist is the stricter test where a table names them
(`xeno-canto-phoebe-10sp/metadata.csv`, the Acrocephalus `labels.csv`). Several columns joined
with "+" ("recordist+date") group one session. On a synthetic archive the groups are the
recorders (each recorder hears the same individual birds in all its files) or the files. Every
score row names its grouping; too few groups for the folds is an error that names the grouping.

Products in `out_dir`::

    scores.csv / scores.json   tidy: space, pooling, metric, value, interval_low, interval_high,
                               interval_level, interval_method (how the interval was made),
                               n_windows, n_recordings, n_groups, grouping, n_labels, n_dims,
                               window_selection
                               (the JSON adds the run's metadata and the skipped spaces)
    windows.csv                every grid window: recording, path, label, group, offset_s,
                               window_s, valid_s, padded, in_band_db, energy_rank (1 = loudest
                               whole window of its recording; empty for padded ones), selected
    predictions.csv            per selected window and output space: the out-of-fold kNN
                               prediction, its fold, and the KMeans cluster
    fold_scores.csv            per output space and fold: sizes, accuracy, macro-F1
    embeddings/SPACE__POOLING.npy  each space's rows for the selected windows (windows.csv order)
    ssl/NAME/, birdnet/        the embedding stages' own products (with their provenance)
    skipped.csv                recordings that gave no window, and windows lost to bad audio,
                               with a reason
    config.json                the ValidateConfig, inputs and counts (written last)

`validate_synthetic_archive` builds a labelled set from a synthetic archive's annotations instead
(one window per planted bird call of sufficient SNR, labelled by species) and runs the same
scoring, so the demo validates without any external data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .baselines import logmel_stats_features
from . import metrics
from .spaces import checkpoint_names
from .metrics import KnnConfig, SpaceScores
from ..core.audio import AudioFile, AudioOpenError, WindowLoss, grid_windows, read_info
from ..core.cli import CommandParser, run_command
from ..core.config import add_config_options, config_from_options
from ..core.provenance import to_jsonable, write_config_json
from ..core.stage import atomic_save_npy, atomic_write, atomic_write_text
from ..core.stats import GroupBootstrap, paired_table
from ..pretrain.pooling import POOLINGS
from ..recordings.archive import probe_recording
from ..tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig
from ..tiles.store import in_band_energy_db

logger = logging.getLogger(__name__)

STAGE = "validate"
WINDOW_SELECTIONS = ("all", "top_k_energy")
BIRDNET_SPACE = "birdnet_v2.4"
BIRDNET_POOLING = "global_avg_pool"     # BirdNET's own embedding: its penultimate layer
LOGMEL_SPACE = "logmel_stats"
LOGMEL_POOLING = "mean_std_over_time"
METRICS = ("knn_accuracy", "knn_macro_f1", "knn_accuracy_fold_mean", "kmeans_nmi", "kmeans_ari",
           "kmeans_v_measure")
SCORE_COLUMNS = ("space", "pooling", "metric", "value", "interval_low", "interval_high", "interval_level",
                 "interval_method", "n_windows", "n_recordings", "n_groups", "grouping", "n_labels", "n_dims",
                 "window_selection")
RECORDING_GROUPING = "recording"
WINDOW_COLUMNS = ("window", "recording", "path", "label", "group", "offset_s", "window_s",
                  "valid_s", "padded", "in_band_db", "energy_rank", "selected")
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
    group_by: str = RECORDING_GROUPING     # the unit folds never split: "recording", or a column of the
                                           # labels or metadata table ("recordist"; "recordist+date")
    metadata_csv: str = ""                 # a table joined on the path column that may hold group_by
    min_recordings_per_label: int = 2      # labels with fewer groups are dropped (never testable)
    poolings: tuple[str, ...] = POOLINGS   # SSL poolings scored: "mean", "cls", "band"
    n_folds: int = 5                       # grouped kNN folds (clipped to the number of groups)
    k_neighbours: int = 10                 # kNN vote size
    knn_metric: str = "cosine"             # on features standardised per training fold
    n_bootstrap: int = 2000                # resamples of recordings for the intervals
    confidence_level: float = 0.95
    seed: int = 0                          # folds, KMeans, bootstrap
    include_birdnet: bool = True           # skipped with a note when BirdNET is not installed
    include_logmel: bool = True
    device: str = "auto"                   # SSL embedding: "auto", "cpu" or "cuda"
    precision: str = "auto"                # SSL embedding: "auto" (bf16 on CUDA), "bf16" or "fp32"
    compile: bool = False                  # SSL embedding: torch.compile the forward pass
    batch_size: int = 64                   # SSL embedding batch
    birdnet_threads: int = 1               # LiteRT threads
    progress: bool = True
    allow_outside_paths: bool = False      # let labels name files outside audio_dir (refused by
                                           # default: a labels file must not reach elsewhere)

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
        unknown = set(self.poolings) - set(POOLINGS)
        if unknown or not self.poolings:
            raise ValueError(f"poolings must be a non-empty subset of {POOLINGS}, got {self.poolings}")
        if not self.group_by.strip() or "" in self.grouping_columns():
            raise ValueError(f"group_by must be 'recording' or column names joined by '+', got {self.group_by!r}")
        if self.min_recordings_per_label < 2:
            raise ValueError("min_recordings_per_label must be >= 2: a label held by one recording "
                             "is never on both sides of a grouped split")
        # The kNN settings are checked where they are defined.
        self.knn_config(self.n_folds)

    def grouping_columns(self) -> tuple[str, ...]:
        """The table columns that form the groups; () when grouping by recording."""
        if self.group_by.strip() == RECORDING_GROUPING:
            return ()
        return tuple(part.strip() for part in self.group_by.split("+"))

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
class SpaceResult(SpaceScores):
    """One output space's rows and scores (`metrics.SpaceScores`), with its space and pooling."""

    space: str = ""
    pooling: str = ""


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

    def spaces_to_show(self) -> dict[str, SpaceResult]:
        """The spaces a reader looks at first, by title: the best SSL space by kNN accuracy (the
        untrained control excluded), and BirdNET (the log-mel baseline when BirdNET was not scored)."""
        shown: dict[str, SpaceResult] = {}
        best_ssl = self.best("ssl_", exclude_prefix="ssl_untrained")
        if best_ssl is not None:
            shown[f"{best_ssl.space} · {best_ssl.pooling} (best SSL)"] = best_ssl
        reference = (self.spaces.get(space_key(BIRDNET_SPACE, BIRDNET_POOLING))
                     or self.spaces.get(space_key(LOGMEL_SPACE, LOGMEL_POOLING)))
        if reference is not None:
            shown[f"{reference.space} · {reference.pooling}"] = reference
        return shown

    def majority_label_share(self) -> float:
        """The share of the most frequent label among the scored windows: what always guessing it scores."""
        return float(self.selected["label"].value_counts(normalize=True).max())


def space_key(space: str, pooling: str) -> str:
    return f"{space}/{pooling}"


# ----------------------------------------------------------------------------------------------
# Labelled recordings


def recording_groups(table: pd.DataFrame, config: ValidateConfig) -> pd.Series:
    """The group of each row of a labels table (same index), by `config.group_by`.

    "recording": the path as written. Otherwise the values of the named columns (joined with
    " | " when several), taken from the labels table or, for columns it lacks, from
    `config.metadata_csv` joined on the path column. A column found nowhere, a metadata table
    with a path twice, or a recording without a value is an error that names them: a recording
    never falls back to its own group silently.
    """
    paths = table[config.path_column].astype(str)
    columns = config.grouping_columns()
    if not columns:
        return paths.rename("group")
    values = table[[c for c in columns if c in table.columns]].copy()
    from_metadata = [c for c in columns if c not in table.columns]
    if from_metadata:
        if not config.metadata_csv:
            raise ValueError(f"group_by {config.group_by!r}: the labels table lacks {from_metadata} "
                             f"(it has {list(table.columns)}) and no metadata_csv is given")
        metadata = pd.read_csv(config.metadata_csv)
        lacking = [c for c in (config.path_column, *from_metadata) if c not in metadata.columns]
        if lacking:
            raise ValueError(f"group_by {config.group_by!r}: {config.metadata_csv} lacks {lacking}; "
                             f"it has {list(metadata.columns)}")
        keys = metadata[config.path_column].astype(str)
        if keys.duplicated().any():
            raise ValueError(f"{config.metadata_csv}: paths listed twice, e.g. {keys[keys.duplicated()].iloc[0]!r}")
        joined = metadata.assign(**{config.path_column: keys}).set_index(config.path_column)[from_metadata]
        for column in from_metadata:
            values[column] = paths.map(joined[column]).to_numpy()
    values = values[list(columns)]
    absent = values.isna().any(axis=1) | (values.astype(str).apply(lambda c: c.str.strip()) == "").any(axis=1)
    if absent.any():
        raise ValueError(f"group_by {config.group_by!r}: {int(absent.sum())} recording(s) have no value, "
                         f"e.g. {paths[absent].iloc[0]!r}: fill them in, or group by recording")
    return values.astype(str).agg(" | ".join, axis=1).rename("group")


def read_labelled_recordings(labels: str | os.PathLike | pd.DataFrame, audio_dir: str | os.PathLike,
                             config: ValidateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(recordings, skipped): one row per usable recording (recording, path, label, group).

    `recording` is the path as written in the labels table, `path` the resolved absolute path.
    Every path must resolve (symbolic links and `..` followed) to a file under `audio_dir`: a
    row naming anything outside is an error naming the row, unless `allow_outside_paths`. One
    file listed twice with two labels is an error naming both rows; twice with the same label,
    the second row is a logged "duplicate" skip. Rows without a label or whose file does not
    exist go to `skipped` (logged), not to an error.
    """
    from_file = not isinstance(labels, pd.DataFrame)
    table = pd.read_csv(labels) if from_file else labels.copy()
    label_column = config.label_column
    if label_column == "auto":
        label_column = next((c for c in ("label", "species") if c in table.columns), "label")
    missing = [c for c in (config.path_column, label_column) if c not in table.columns]
    if missing:
        raise ValueError(f"labels table lacks columns {missing}; it has {list(table.columns)}")
    table = table.reset_index(drop=True)

    def row_name(i: int) -> str:
        """Where a row is: its line in the CSV (line 1 is the header), or its DataFrame row."""
        return f"line {i + 2} of {labels}" if from_file else f"row {i} of the labels table"

    audio_root = Path(audio_dir).resolve()
    written = table[config.path_column].astype(str)
    resolved: list[str | None] = []
    outside: list[str] = []
    for i, text in enumerate(written):
        path = Path(text) if Path(text).is_absolute() else audio_root / text
        try:
            target = path.resolve()
        except (OSError, RuntimeError):              # a symbolic link loop
            resolved.append(None)
            continue
        if not config.allow_outside_paths and not target.is_relative_to(audio_root):
            outside.append(f"{row_name(i)} names {text!r}, which resolves to {target}")
        resolved.append(str(target))
    if outside:
        raise ValueError(f"labels name {len(outside)} file(s) outside the audio folder "
                         f"{audio_root} (refused; allow_outside_paths / --allow-outside-paths "
                         f"permits it): {outside[0]}" + (f"; and {len(outside) - 1} more"
                                                         if len(outside) > 1 else ""))
    recordings = pd.DataFrame({
        "recording": written,
        "path": [p if p is not None else str(audio_root / t) for p, t in zip(resolved, written)],
        "label": table[label_column],
    })
    recordings["group"] = recording_groups(table, config).to_numpy()
    no_label = (recordings["label"].isna()
                | (recordings["label"].astype(str).str.strip() == "")).to_numpy()
    no_file = np.array([p is None or not Path(p).is_file() for p in resolved], dtype=bool)
    usable = ~no_label & ~no_file
    conflicts = []
    for path, rows in recordings[usable].groupby("path", sort=False).groups.items():
        labels_here = recordings.loc[rows, "label"].astype(str).to_numpy()
        differing = np.flatnonzero(labels_here != labels_here[0])
        if len(differing):
            first, second = int(rows[0]), int(rows[differing[0]])
            conflicts.append(f"{row_name(first)} labels {path} {labels_here[0]!r} but "
                             f"{row_name(second)} labels it {labels_here[differing[0]]!r}")
    if conflicts:
        raise ValueError(f"{len(conflicts)} file(s) listed with two labels: {conflicts[0]}"
                         + (f"; and {len(conflicts) - 1} more" if len(conflicts) > 1 else ""))
    # The same file under the same label twice: the later rows are dropped, with a note.
    duplicated = np.zeros(len(recordings), dtype=bool)
    duplicated[usable] = recordings.loc[usable, "path"].duplicated(keep="first").to_numpy()
    skipped = []
    for reason, mask in (("no_label", no_label), ("not_found", no_file & ~no_label),
                         ("duplicate", duplicated)):
        for i in np.flatnonzero(mask):
            skipped.append({"recording": recordings.at[i, "recording"], "reason": reason,
                            "detail": row_name(int(i)) if reason == "duplicate" else ""})
    if skipped:
        logger.warning("%d of %d labelled recordings skipped: %s", len(skipped), len(recordings),
                       pd.Series([s["reason"] for s in skipped]).value_counts().to_dict())
    keep = usable & ~duplicated
    recordings = recordings[keep].reset_index(drop=True)
    recordings["label"] = recordings["label"].astype(str)
    return recordings, pd.DataFrame(skipped, columns=["recording", "reason", "detail"])


# ----------------------------------------------------------------------------------------------
# Windows: the grid, its in-band energy and log-mel tiles


def window_table(recordings: pd.DataFrame, config: ValidateConfig
                 ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Every window of every recording by the one window rule: (windows, log-mel features, skipped).

    windows: one row per window (WINDOW_COLUMNS but `selected`, which the caller sets), padded
    ones included (`select_windows` never selects them); the log-mel statistics (N, 2 n_mels) are
    row-aligned with it. Recordings are read through the one audio reader; a recording nothing
    can be read from, or too short for a window, and windows lost to bad audio are logged and
    listed in `skipped`.
    """
    spectrogram = config.spectrogram_config()
    rule = spectrogram.window_rule
    front_end = LogMelFrontEnd(spectrogram, "cpu")
    frames: list[pd.DataFrame] = []
    features: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []

    def skip(recording: Any, reason: str, detail: str) -> None:
        logger.warning("skip %s [%s] %s", recording.path, reason, detail)
        skipped.append({"recording": recording.recording, "reason": reason, "detail": detail})

    for recording in tqdm(recordings.itertuples(index=False), total=len(recordings), unit="file",
                          desc="windows", disable=not config.progress):
        probe = probe_recording(recording.path)
        if not probe.readable:
            skip(recording, probe.reason, probe.detail)
            continue
        if probe.damage:
            logger.warning("%s is damaged (%s), read up to the break: %s", recording.path,
                           probe.damage, probe.damage_detail)
        rate_hz = probe.sample_rate_hz
        if not spectrogram.accepts_sample_rate(rate_hz):
            skip(recording, "unsupported_sample_rate",
                 f"{rate_hz} Hz outside {spectrogram.min_input_sample_rate_hz}-"
                 f"{spectrogram.max_input_sample_rate_hz} Hz")
            continue
        n_windows = rule.count(probe.frames, rate_hz)
        if n_windows == 0:
            skip(recording, "no_frames", "the file holds no audio frames")
            continue
        try:
            audio = AudioFile(recording.path, frames=probe.frames, piece_s=config.window_s)
        except AudioOpenError as error:
            skip(recording, "unreadable", str(error))
            continue
        losses: list[WindowLoss] = []
        tiles, offsets, valid, padded = [], [], [], []
        with audio:
            for batch in grid_windows(audio, rule, 0, n_windows, losses, device="cpu",
                                      lowpass_filter_width=spectrogram.resample_lowpass_filter_width,
                                      rolloff=spectrogram.resample_rolloff):
                tiles.append(front_end(batch.waveforms).log_mel_db.numpy())
                offsets.append(batch.offset_s)
                valid.append(batch.valid_s)
                padded.append(batch.padded)
        for loss in losses:
            skip(recording, loss.reason, f"{len(loss.numbers)} window(s) from {loss.offset_s:g} s: "
                                         f"{loss.detail}")
        if not tiles:
            continue
        tiles_db = np.concatenate(tiles)
        offsets_s, padded_mask = np.concatenate(offsets), np.concatenate(padded)
        energy_db = in_band_energy_db(tiles_db, spectrogram, config.energy_f_low_hz,
                                      config.energy_f_high_hz)
        # Rank 1 = loudest whole window; ties broken by time so the ranking is reproducible.
        # Padded windows are never scored, so they take no rank.
        whole = np.flatnonzero(~padded_mask)
        order = whole[np.lexsort((offsets_s[whole], -energy_db[whole]))]
        rank = pd.array(np.full(len(tiles_db), pd.NA), dtype="Int64")
        rank[order] = np.arange(1, len(order) + 1)
        frames.append(pd.DataFrame({
            "recording": recording.recording, "path": recording.path,
            "label": getattr(recording, "label", None), "group": recording.group,
            "offset_s": offsets_s.astype(np.float64), "window_s": config.window_s,
            "valid_s": np.concatenate(valid).astype(np.float64), "padded": padded_mask,
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
    """Boolean mask of the windows `config.window_selection` keeps; never a padded window."""
    whole = ~windows["padded"].to_numpy(dtype=bool)
    if config.window_selection == "all":
        return whole
    rank = pd.to_numeric(windows["energy_rank"]).to_numpy(dtype=np.float64, na_value=np.inf)
    return whole & (rank <= config.top_k)


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
    # Whole windows by the one window rule, in exact integers (the rule's window set does not
    # depend on the rate it is computed at).
    rule = SpectrogramConfig(tile_s=window_s, tile_hop_s=window_s).window_rule
    n_whole = {}
    for file in calls["file"].unique():
        info = read_info(str(archive_dir / file))
        n_whole[file] = rule.n_whole(info.frames, info.sample_rate_hz)
    whole = calls["span"] < calls["file"].map(n_whole)
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


def check_checkpoints(checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                      config: ValidateConfig) -> dict[str, Path]:
    """Named checkpoints (`_checkpoint_names`), each verified before any work: it exists, is a
    soundscape-ssl checkpoint (see `checkpoint.load_checkpoint`) and cuts `config.window_s`
    tiles. A requested space that cannot be scored is an error naming the path, never a skip."""
    from ..pretrain.checkpoint import load_checkpoint

    named = checkpoint_names(checkpoints)
    for path in named.values():
        _check_window_length(load_checkpoint(path), path, config)
    return named


def _check_window_length(metadata: Mapping[str, Any], checkpoint: str | os.PathLike,
                         config: ValidateConfig) -> None:
    tile_s = (metadata.get("spectrogram_config") or {}).get("tile_s")
    if tile_s is None or not math.isclose(float(tile_s), config.window_s):
        raise ValueError(f"{checkpoint} embeds {tile_s} s tiles, the windows are {config.window_s} s")


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

    The windows' spans of the audio command's grid (the checkpoint's tile length and hop from
    0 s) are embedded and their rows picked by path and offset, so the checkpoint must cut
    `window_s` tiles on a hop that lands on the windows' offsets.
    """
    from ..pretrain.checkpoint import load_checkpoint
    from .embed import EmbedConfig, audio_output_paths, embed_audio_files

    _check_window_length(load_checkpoint(checkpoint), checkpoint, config)
    embed_config = EmbedConfig(pooling=",".join(config.poolings), batch_size=config.batch_size,
                               device=config.device, precision=config.precision, compile=config.compile)
    out_path = work_dir / "embeddings.npy"
    paths = sorted(windows["path"].unique())
    # only the windows scored: a recording's other spans are never read into the model
    spans = {path: group.to_numpy() for path, group in windows.groupby("path", sort=True)["offset_s"]}
    embed_audio_files(paths, checkpoint, out_path, embed_config, show_progress=config.progress,
                      spans=spans)
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


def paired_against(result: "ValidationResult", reference: str, n_bootstrap: int = 2000,
                   confidence_level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Every other scored space against `reference` ("space/pooling"), paired over the groups
    (`metrics.paired_against`: kNN accuracy, KMeans NMI and ARI on the same resamples). Tidy:
    space, pooling, then `core.stats.PAIRED_COLUMNS`; `share_not_better` is the share of
    resamples in which the space did not beat the reference, not a p-value."""
    groups = result.selected["group"].to_numpy()
    grouping = str(result.scores["grouping"].iloc[0]) if len(result.scores) else "group"
    table = metrics.paired_against(result.spaces, reference, groups, grouping, n_bootstrap, confidence_level, seed)
    names = table.pop("output_space").str.split("/", n=1, expand=True) if len(table) else None
    table.insert(0, "space", names[0] if names is not None else pd.Series(dtype=object))
    table.insert(1, "pooling", names[1] if names is not None else pd.Series(dtype=object))
    return table


# What two validations must share, window by window, for their scores to be paired.
_PAIRED_WINDOW_COLUMNS = ("window", "recording", "offset_s", "label", "group")


def scored_predictions(out_dir: str | os.PathLike, key: str) -> pd.DataFrame:
    """One scored space's rows from a validation's products (`out_dir`, as `run_validation` wrote
    it): each selected window (`_PAIRED_WINDOW_COLUMNS`) with its out-of-fold kNN prediction and
    KMeans cluster, in window order. A space the validation did not score is a KeyError naming
    those it did."""
    out_dir = Path(out_dir)
    predictions = pd.read_csv(out_dir / "predictions.csv", dtype={"label": str, "knn_predicted": str})
    space, pooling = key.split("/", 1)
    rows = predictions[(predictions["space"] == space) & (predictions["pooling"] == pooling)]
    if rows.empty:
        scored = sorted(set(predictions["space"] + "/" + predictions["pooling"]))
        raise KeyError(f"{out_dir} scored no space {key!r}; it scored: {scored}")
    windows = pd.read_csv(out_dir / "windows.csv", dtype={"label": str, "group": str})
    rows = rows.drop(columns="label").merge(windows[list(_PAIRED_WINDOW_COLUMNS)], on="window", how="left",
                                            validate="one_to_one")
    return rows.sort_values("window", kind="mergesort").reset_index(drop=True)


def paired_between_runs(out_dir: str | os.PathLike, key: str, reference_dir: str | os.PathLike,
                        reference_key: str, n_bootstrap: int = 2000, confidence_level: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Space `key` ("space/pooling") of the validation in `out_dir` against space `reference_key`
    of the validation in `reference_dir`, paired over the groups: e.g. one recipe trained with two
    seeds, or two recipes, each scored on the same labelled set in its own run.

    Both validations must have scored the same windows (recording, offset, label and group,
    window by window); otherwise the scores are not paired and it is a ValueError. Each space's
    fixed kNN predictions and KMeans clustering are read back from `predictions.csv`
    (`metrics.paired_predictions`). Tidy: `core.stats.PAIRED_COLUMNS`. The interval is over the
    resampled groups only: two trainings of one recipe differ by more than it shows when training
    itself is noisy, which is what comparing two seeds measures.
    """
    rows = scored_predictions(out_dir, key)
    reference = scored_predictions(reference_dir, reference_key)
    columns = list(_PAIRED_WINDOW_COLUMNS)
    key_columns = rows[columns].assign(offset_s=_offset_keys(rows["offset_s"]))
    reference_columns = reference[columns].assign(offset_s=_offset_keys(reference["offset_s"]))
    if len(rows) != len(reference) or not key_columns.equals(reference_columns):
        raise ValueError(f"{out_dir} ({len(rows)} windows) and {reference_dir} ({len(reference)} windows) "
                         "did not score the same windows: validate both with the same labelled set, "
                         "window selection and grouping to pair them")
    grouping = str(pd.read_csv(Path(out_dir) / "scores.csv", usecols=["grouping"], nrows=1)["grouping"].iloc[0])
    bootstrap = GroupBootstrap(rows["group"].to_numpy(), n_bootstrap, seed, unit=grouping)
    differences = metrics.paired_predictions(rows["label"].to_numpy(), rows["knn_predicted"].to_numpy(),
                                             reference["knn_predicted"].to_numpy(), rows["kmeans_cluster"].to_numpy(),
                                             reference["kmeans_cluster"].to_numpy(), bootstrap, confidence_level)
    return paired_table(differences)


def score_space(space: str, pooling: str, embeddings: np.ndarray, labels: np.ndarray,
                groups: np.ndarray, config: ValidateConfig, grouping: str = RECORDING_GROUPING) -> SpaceResult:
    """Grouped kNN and KMeans (k = number of labels, all rows) scores of one output space, with
    intervals over the groups (`metrics.score_space`). Fewer groups than `config.n_folds` is an
    error naming the grouping."""
    scores = metrics.score_space(space_key(space, pooling), embeddings, labels, groups, grouping,
                                 config.knn_config(config.n_folds))
    return SpaceResult(**{f.name: getattr(scores, f.name) for f in dataclasses.fields(SpaceScores)},
                       space=space, pooling=pooling)


def score_rows(result: SpaceResult, n_recordings: int, window_selection: str) -> list[dict[str, Any]]:
    """The tidy rows (SCORE_COLUMNS) of one space."""
    knn, agreement, intervals = result.knn, result.agreement, result.agreement_intervals
    values = {
        "knn_accuracy": (knn.accuracy, knn.accuracy_interval),
        "knn_macro_f1": (knn.macro_f1, knn.macro_f1_interval),
        "knn_accuracy_fold_mean": (knn.accuracy_fold_mean, knn.accuracy_fold_interval),
        "kmeans_nmi": (agreement["nmi"], intervals["nmi"]),
        "kmeans_ari": (agreement["ari"], intervals["ari"]),
        "kmeans_v_measure": (agreement["v_measure"], intervals["v_measure"]),
    }
    common = {"n_windows": len(result.embeddings), "n_recordings": n_recordings,
              "n_groups": knn.n_groups, "grouping": knn.grouping, "n_labels": len(knn.classes),
              "n_dims": int(result.embeddings.shape[1]), "window_selection": window_selection}
    return [{"space": result.space, "pooling": result.pooling, "metric": metric, "value": float(value),
             **interval.columns(), **common}
            for metric, (value, interval) in values.items()]


def _drop_rare_labels(windows: pd.DataFrame, config: ValidateConfig, grouping: str
                      ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Unselect windows of labels held by fewer than `min_recordings_per_label` groups; returns
    the windows and the labels left out with their number of groups."""
    selected = windows[windows["selected"]]
    groups_per_label = selected.groupby("label")["group"].nunique()
    rare = groups_per_label[groups_per_label < config.min_recordings_per_label]
    if len(rare):
        logger.warning("labels held by fewer than %d groups (grouping by %s) left out: %s",
                       config.min_recordings_per_label, grouping, rare.to_dict())
        windows = windows.copy()
        windows.loc[windows["label"].isin(rare.index), "selected"] = False
    return windows, {str(label): int(n) for label, n in rare.items()}


def run_validation(windows: pd.DataFrame, logmel_features: np.ndarray | None,
                   checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                   out_dir: str | os.PathLike, config: ValidateConfig, window_selection: str,
                   skipped_recordings: pd.DataFrame | None = None,
                   inputs: dict[str, Any] | None = None, grouping: str = RECORDING_GROUPING
                   ) -> ValidationResult:
    """Score every output space on the selected windows and write the products (module docstring).

    windows: WINDOW_COLUMNS (from `window_table` with `selected` set); logmel_features: rows
    aligned with `windows` (None skips the baseline); `grouping` names what the windows' `group`
    column holds (written into every score row). Fewer groups than `config.n_folds` is an error
    that names the grouping, raised before any space is embedded. An output space that cannot be
    computed (a checkpoint that cannot be read, BirdNET not installed ...) is logged and listed
    in `skipped_spaces`; the others are still scored.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    windows, labels_left_out = _drop_rare_labels(windows.reset_index(drop=True), config, grouping)
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
    logger.info("scoring %d windows of %d recordings (%d groups by %s), %d labels, selection %s",
                len(selected), n_recordings, n_groups, grouping, n_labels, window_selection)
    if n_groups < config.n_folds:
        raise ValueError(f"grouping by {grouping} gives {n_groups} groups, fewer than n_folds={config.n_folds}: "
                         f"lower n_folds to at most {n_groups}, or group by a finer unit")

    candidates: dict[str, np.ndarray] = {}
    skipped_spaces: dict[str, str] = {}
    for name, checkpoint in checkpoint_names(checkpoints).items():
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
            spaces[key] = score_space(space, pooling, values, labels, groups, config, grouping)
        except ValueError as error:           # e.g. NaN rows: one space, not the whole run
            logger.warning("output space %s not scored: %s", key, error)
            skipped_spaces[key] = f"{type(error).__name__}: {error}"

    rows = [row for result in spaces.values()
            for row in score_rows(result, n_recordings, window_selection)]
    scores = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    windows = windows.assign(selected=selected_mask)
    _write_products(out_dir, scores, windows, selected, spaces, skipped_spaces,
                    skipped_recordings, config, window_selection, inputs or {},
                    {"n_windows_selected": len(selected), "n_windows_grid": len(windows),
                     "n_recordings": n_recordings, "n_groups": n_groups, "grouping": grouping,
                     "labels_left_out": labels_left_out, "n_labels": n_labels, "n_folds": config.n_folds,
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
    check_checkpoints(checkpoints, config)
    recordings, skipped = read_labelled_recordings(labels, audio_dir, config)
    windows, logmel, unreadable = window_table(recordings, config)
    windows["selected"] = select_windows(windows, config)
    inputs = {"labels": labels if not isinstance(labels, pd.DataFrame) else "DataFrame",
              "audio_dir": str(audio_dir), "checkpoints": checkpoint_names(checkpoints)}
    inputs["group_by"] = config.group_by
    if config.metadata_csv:
        inputs["metadata_csv"] = config.metadata_csv
    return run_validation(windows, logmel, checkpoints, out_dir, config, config.describe_selection(),
                          pd.concat([skipped, unreadable], ignore_index=True), inputs,
                          grouping=config.group_by.strip())


def validate_synthetic_archive(archive_dir: str | os.PathLike,
                               checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                               out_dir: str | os.PathLike, config: ValidateConfig | None = None,
                               min_snr_db: float = 10.0, group_by: str = "recorder") -> ValidationResult:
    """The same scoring on a synthetic archive's planted bird calls (`synthetic_call_windows`).

    The window selection is the calls' windows (reported as "planted_calls_snr>=X_dB"); the
    config's `window_selection`, `top_k` and `group_by` do not apply: the groups are `group_by`
    here, "recorder" (default: a recorder hears the same individual birds in all its files, so
    grouping by file would let one bird sit on both sides of a split) or "file".
    """
    config = config or ValidateConfig()
    check_checkpoints(checkpoints, config)
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
    inputs = {"archive_dir": str(archive_dir), "checkpoints": checkpoint_names(checkpoints),
              "min_snr_db": min_snr_db, "group_by": group_by}
    return run_validation(windows, logmel, checkpoints, out_dir, config, selection, skipped, inputs,
                          grouping=group_by)


def load_scores(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The tidy scores table of a finished validation (`scores.csv`)."""
    return pd.read_csv(Path(out_dir) / "scores.csv")


def scores_table(scores: pd.DataFrame, metrics: Sequence[str] = ("knn_accuracy", "kmeans_nmi",
                                                                  "kmeans_ari", "kmeans_v_measure")
                 ) -> pd.DataFrame:
    """Output spaces x metrics, each cell "value [interval_low, interval_high]" as text, for
    display (each interval's level and method are in the scores' columns)."""
    shown = scores[scores["metric"].isin(metrics)].copy()
    shown["cell"] = [f"{v:.3f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                     zip(shown["value"], shown["interval_low"], shown["interval_high"])]
    table = shown.pivot_table(index=["space", "pooling"], columns="metric", values="cell",
                              aggfunc="first")
    return table[[m for m in metrics if m in table.columns]]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
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
    add_config_options(parser, ValidateConfig, title="validation")
    return parser


def _parse_checkpoints(values: Sequence[str]) -> dict[str, Path] | list[Path]:
    named = [v for v in values if "=" in v and not Path(v).exists()]
    if not named:
        return [Path(v) for v in values]
    if len(named) != len(values):
        raise ValueError("name every --checkpoint (NAME=PATH) or none")
    return {name: Path(path) for name, path in (v.split("=", 1) for v in values)}


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl validate` / `python -m soundscape_ssl.analysis.validate`; prints the scores
    table. Returns the exit code; errors are one line on stderr (`core.cli.run_command`)."""
    return run_command("soundscape-ssl validate", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_options(ValidateConfig, args)
    try:
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
