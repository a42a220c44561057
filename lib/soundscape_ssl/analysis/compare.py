"""Output spaces scored against BirdNET pseudo-labels: one row of metrics per space.

An output space is one (N, D) array whose row i describes tile i of the tile index: an SSL
embedding (DINO, MAE, VICReg), BirdNET's own 1024-d embedding, or a baseline such as log-mel
statistics. Every space is clustered the same way (one `ClusterConfig`) on the same tiles and
scored against what BirdNET says about those tiles. This module only prepares labels and
wires the scores together; the scores themselves live in `metrics`, the clustering in `cluster`.

Pseudo-labels. A tile's pseudo-label is BirdNET's top species when its confidence is at or
above `confidence_threshold`, else "none" (`NO_DETECTION`); a tile BirdNET did not score
(unreadable span: `skip_reason` set) has no pseudo-label at all (NA). How the tiles without a
confident detection enter each metric, and why:

* NMI, ARI, V-measure, purity: on the confidently labelled tiles only. "none" is not a class:
  it pools silence, rain, insects, wind and every bird BirdNET missed, so a space would score
  by separating silence from rain. Clusters are still fitted on all comparable tiles (labelled
  or not), as in the study; only the scoring is restricted.
* Per-cluster detection rate: over all comparable tiles (a tile is "detected" when its
  top confidence is at or above the threshold), as the original study reported it.
* kNN of species: labelled tiles only; kNN of recorder, habitat and hour of day: all comparable
  tiles with a value. Folds are grouped, never split by tile: neighbouring 3 s tiles of one file
  share noise, gain and often the same bird, so a split by tile would score near-duplicates
  against each other (the original study scored kNN on its own training vectors, which
  overstates accuracy further). Species, habitat and hour are grouped by recorder
  (`group_column`): a recorder hears the same individual birds, the same site and the same
  background in all its files (on the synthetic archive by construction, in the field because
  birds hold territories), so grouping by file would let one individual sit on both sides of a
  split. The recorder task cannot be grouped by recorder (each class would be one group), so it
  is grouped by file (`recorder_group_column`): it asks whether a held-out file of a recorder
  is recognised. A class heard in fewer than `knn_min_groups_per_class` groups cannot be
  learned from other groups, so it is left out of that task (logged); too few groups for the
  folds gives NaN and a note naming the grouping.

Comparable tiles: BirdNET scored the tile and the tile's row is finite in every space, so every
space is scored on exactly the same tiles. A task without enough data (no confident detection,
a single recorder, fewer files than folds ...) gives NaN and a note in the `notes` column, never
an exception.

BirdNET's own embedding scored against BirdNET's own labels is circular: it is an upper
reference for how well these labels can be recovered from an embedding, not a competitor.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import metrics
from .cluster import ClusterConfig, fit_clusters
from .metrics import KnnConfig
from ..core.config import config_from_mapping

logger = logging.getLogger(__name__)

CHUNK_ROWS = 65_536   # rows of a space checked at once (memory maps are read in such chunks)

NO_DETECTION = "none"                       # pseudo-label of a scored tile without a confident detection
KNN_TASKS = ("species", "recorder", "habitat", "hour")   # BirdNET comparison (notebook 06)
SEPARATION_TASKS = ("recorder", "habitat", "hour", "week")  # the sequel's separation table (notebook 08)
CLUSTER_METRICS = ("nmi", "ari", "v_measure", "homogeneity", "completeness", "purity")


@dataclass
class CompareConfig:
    """How output spaces are compared against BirdNET. Serialisable with `to_dict` / `from_dict`."""

    confidence_threshold: float = 0.5       # BirdNET top confidence for a pseudo-label / a detection
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the same for every space
    knn: KnnConfig = field(default_factory=KnnConfig)              # the same for every task
    group_column: str = "recorder"          # the unit kNN folds of species, habitat and hour never split
    recorder_group_column: str = "relpath"  # the unit of the recorder task's folds (the file)
    knn_tasks: tuple[str, ...] = KNN_TASKS  # which kNN tasks to score
    knn_min_groups_per_class: int = 2       # classes heard in fewer groups are left out of a task
    knn_max_rows: int | None = 20_000       # random tiles per kNN task (same for every space); None: all
    hour_bin_h: int = 1                     # hour-of-day classes: floor(hour / bin) * bin
    min_labelled_tiles: int = 10            # fewer confidently labelled tiles: species metrics NaN
    n_top_clusters: int = 10                # clusters pooled for the top detection rate
    min_cluster_tiles: int = 10             # smaller clusters cannot enter the top (2 of 2 is no finding)
    seed: int = 0                           # kNN row subsample

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        unknown = set(self.knn_tasks) - set(KNN_TASKS) - set(SEPARATION_TASKS)
        if unknown:
            raise ValueError(f"unknown kNN tasks {sorted(unknown)}; choose from "
                             f"{sorted(set(KNN_TASKS) | set(SEPARATION_TASKS))}")
        if not 1 <= self.hour_bin_h <= 24 or 24 % self.hour_bin_h:
            raise ValueError(f"hour_bin_h must divide 24, got {self.hour_bin_h}")
        for name in ("knn_min_groups_per_class", "min_labelled_tiles", "n_top_clusters", "min_cluster_tiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.knn_max_rows is not None and self.knn_max_rows < 2:
            raise ValueError(f"knn_max_rows must be >= 2 or None, got {self.knn_max_rows}")
        self.knn_tasks = tuple(self.knn_tasks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompareConfig:
        """Inverse of `to_dict`; unknown keys (nested sections too) are an error so a typo never
        passes silently."""
        return config_from_mapping(cls, values)


# --------------------------------------------------------------------------- labels per tile

def pseudo_labels(top_species: Any, top_confidence: Any, threshold: float,
                  scored: Any = None) -> pd.Series:
    """BirdNET's top species where its confidence >= threshold, else "none"; NA where unscored.

    scored: boolean per tile, False where BirdNET did not score the tile (default: the tiles
    with a finite confidence). A scored tile without a top species (the location filter
    allowed none) is "none".
    """
    species = pd.Series(top_species, dtype=object).reset_index(drop=True)
    confidence = pd.to_numeric(pd.Series(top_confidence).reset_index(drop=True), errors="coerce")
    if len(species) != len(confidence):
        raise ValueError(f"top_species ({len(species)}) and top_confidence ({len(confidence)}) differ in length")
    scored = (confidence.notna() if scored is None
              else pd.Series(np.asarray(scored, dtype=bool)).reset_index(drop=True))
    confident = scored & (confidence >= threshold) & species.notna()
    labels = pd.Series(NO_DETECTION, index=species.index, dtype=object)
    labels[confident] = species[confident]
    labels[~scored] = pd.NA
    return labels


def hour_of_day(timestamps: Any, bin_h: int = 1) -> pd.Series:
    """Hour-of-day class of each timestamp (floor(hour / bin_h) * bin_h, nullable Int64; NA for NaT)."""
    hours = pd.to_datetime(pd.Series(timestamps).reset_index(drop=True), errors="coerce").dt.hour
    return (hours // bin_h * bin_h).astype("Int64")


def iso_week(timestamps: Any) -> pd.Series:
    """ISO year and week of each timestamp ("2024-W21"; NA for NaT): weeks never mix two years."""
    times = pd.to_datetime(pd.Series(timestamps).reset_index(drop=True), errors="coerce")
    calendar = times.dt.isocalendar()
    text = calendar["year"].astype(str) + "-W" + calendar["week"].astype(str).str.zfill(2)
    return text.where(times.notna(), pd.NA).astype(object)


def tile_labels(tile_index: pd.DataFrame, detections: pd.DataFrame,
                config: CompareConfig | None = None) -> pd.DataFrame:
    """One row per tile of `tile_index` (same order): what every metric is scored against.

    Columns: tile_id, group (`config.group_column`), recorder_task_group
    (`config.recorder_group_column`), recorder, habitat, hour, top_species, top_confidence, scored
    (BirdNET scored the tile), detected (scored and top_confidence >= threshold), pseudo_label
    (species, "none", or NA when unscored). Detections are matched by tile_id; a tile without a
    detections row counts as unscored (logged).
    """
    config = config or CompareConfig()
    for column in ("tile_id", config.group_column, config.recorder_group_column):
        if column not in tile_index.columns:
            raise ValueError(f"tile index lacks column {column!r}")
    missing = [c for c in ("tile_id", "top_species", "top_confidence") if c not in detections.columns]
    if missing:
        raise ValueError(f"detections lack columns {missing}")
    if detections["tile_id"].duplicated().any():
        raise ValueError("detections have duplicate tile_id values")
    index = tile_index.reset_index(drop=True)
    wanted = ["tile_id", "top_species", "top_confidence"] + (
        ["skip_reason"] if "skip_reason" in detections.columns else [])
    merged = index[["tile_id"]].merge(detections[wanted], on="tile_id", how="left", validate="one_to_one")
    confidence = pd.to_numeric(merged["top_confidence"], errors="coerce")
    matched = index["tile_id"].isin(detections["tile_id"]).to_numpy()
    if not matched.all():
        logger.warning("%d of %d tiles have no BirdNET row: treated as unscored", int((~matched).sum()), len(index))
    skipped = merged["skip_reason"].notna().to_numpy() if "skip_reason" in merged else np.zeros(len(index), bool)
    scored = matched & ~skipped & confidence.notna().to_numpy()
    frame = pd.DataFrame({
        "tile_id": index["tile_id"].to_numpy(np.int64),
        "group": index[config.group_column].astype(str).to_numpy(),
        "recorder_task_group": index[config.recorder_group_column].astype(str).to_numpy(),
        "recorder": index["recorder"].astype(object) if "recorder" in index else pd.NA,
        "habitat": index["habitat"].astype(object) if "habitat" in index else pd.NA,
        "hour": hour_of_day(index["timestamp"], config.hour_bin_h) if "timestamp" in index
        else pd.Series(pd.NA, index=index.index, dtype="Int64"),
        "top_species": merged["top_species"].astype(object),
        "top_confidence": confidence.astype(np.float32),
        "scored": scored,
        "detected": scored & (confidence >= config.confidence_threshold).to_numpy(),
    })
    frame["pseudo_label"] = pseudo_labels(frame["top_species"], frame["top_confidence"],
                                          config.confidence_threshold, scored)
    return frame


def finite_rows(space: Any) -> np.ndarray:
    """Boolean per row: every value finite. Read in chunks of rows (a memory map is never copied whole)."""
    space = np.asarray(space)
    return np.concatenate([np.isfinite(space[start:start + CHUNK_ROWS]).all(axis=1)
                           for start in range(0, len(space), CHUNK_ROWS)] or [np.ones(0, bool)])


def comparable_rows(spaces: Mapping[str, Any], labels: pd.DataFrame) -> np.ndarray:
    """Boolean per tile: BirdNET scored it and its row is finite in every space (logged counts)."""
    keep = labels["scored"].to_numpy(bool).copy()
    logger.info("%d of %d tiles were scored by BirdNET", int(keep.sum()), len(keep))
    for name, space in spaces.items():
        space = np.asarray(space)  # a memory map stays one
        if space.ndim != 2 or space.shape[0] != len(labels):
            raise ValueError(f"space {name!r} has shape {space.shape}; expected ({len(labels)}, D)")
        finite = finite_rows(space)
        if not finite.all():
            logger.warning("space %r: %d of %d rows are not finite and are left out of every space",
                           name, int((~finite).sum()), len(finite))
        keep &= finite
    return keep


# --------------------------------------------------------------------------- summary tables

def detection_summary(labels: pd.DataFrame, by: str = "recorder") -> pd.DataFrame:
    """Per value of `by` (and "all"): n_tiles, n_scored, n_detected, detection_rate (of scored), n_species."""
    frame = labels.assign(**{by: labels[by].astype(object).fillna("unknown")})
    detected = frame[frame["detected"]]

    def summarize(part: pd.DataFrame, confident: pd.DataFrame) -> dict[str, Any]:
        n_scored = int(part["scored"].sum())
        return {"n_tiles": len(part), "n_scored": n_scored, "n_detected": int(part["detected"].sum()),
                "detection_rate": part["detected"].sum() / n_scored if n_scored else np.nan,
                "n_species": int(confident["pseudo_label"].nunique())}

    rows = {key: summarize(part, detected[detected[by] == key]) for key, part in frame.groupby(by, sort=True)}
    rows["all"] = summarize(frame, detected)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)


def species_table(labels: pd.DataFrame, by: str, max_species: int | None = None) -> pd.DataFrame:
    """Confident detections (tiles) per species x value of `by` (e.g. recorder, hour), with a total.

    Species are sorted by their total, most detected first; `max_species` keeps the top ones.
    Empty (no rows) when nothing was detected at the threshold.
    """
    detected = labels[labels["detected"]]
    table = pd.crosstab(detected["pseudo_label"].rename("species"),
                        detected[by].astype(object).fillna("unknown"))
    table["total"] = table.sum(axis=1)
    table = table.sort_values("total", ascending=False, kind="mergesort")
    return table.head(max_species) if max_species else table


def cluster_species_shares(cluster_labels: Any, pseudo: Any, max_clusters: int | None = None,
                           max_species: int | None = None) -> pd.DataFrame:
    """Share of each cluster's tiles per pseudo-label ("none" included): clusters x labels.

    Rows are the clusters with the highest share of confident detections (`max_clusters` of
    them; all when None), columns the most frequent confident species (`max_species`), then "none".
    Rows sum to at most 1 (species outside the top ones are not shown).
    """
    table = metrics.contingency_table(np.asarray(cluster_labels), np.asarray(pseudo, dtype=object))
    shares = table.div(table.sum(axis=1), axis=0)
    species = [c for c in table.sum(axis=0).sort_values(ascending=False, kind="mergesort").index
               if c != NO_DETECTION]
    species = species[:max_species] if max_species else species
    columns = species + ([NO_DETECTION] if NO_DETECTION in table.columns else [])
    detected_share = 1.0 - shares[NO_DETECTION] if NO_DETECTION in shares else pd.Series(1.0, shares.index)
    order = detected_share.sort_values(ascending=False, kind="mergesort").index
    order = order[:max_clusters] if max_clusters else order
    return shares.loc[order, columns]


# --------------------------------------------------------------------------- clustering and scoring

def cluster_spaces(spaces: Mapping[str, Any], config: ClusterConfig, rows: np.ndarray | None = None,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """KMeans labels of every space with one config, fitted on `rows` (bool mask; default all).

    Returns full-length int32 arrays (one per tile); tiles outside `rows` get -1.
    """
    labels: dict[str, np.ndarray] = {}
    for name, space in spaces.items():
        space = np.asarray(space)
        mask = np.ones(space.shape[0], bool) if rows is None else np.asarray(rows, bool)
        full = np.full(space.shape[0], -1, dtype=np.int32)
        # the chosen rows are read where they lie (a memory map is never copied whole)
        result = fit_clusters(space, config, progress=progress, rows=None if rows is None else mask)
        full[mask] = result.labels
        labels[name] = full
        logger.info("space %r: %d clusters over %d tiles (silhouette %.3f)", name, result.n_clusters,
                    int(mask.sum()), result.silhouette)
    return labels


def _nan_knn(task: str) -> dict[str, Any]:
    row: dict[str, Any] = {f"knn_{task}_{key}": np.nan for key in
                           ("accuracy", "interval_low", "interval_high", "macro_f1", "majority_share", "n_tiles",
                            "n_groups", "n_classes")}
    row[f"knn_{task}_grouping"] = ""
    row[f"knn_{task}_interval_method"] = ""
    return row


@dataclass
class _KnnTask:
    """The rows, labels and groups of one kNN task (drawn once, shared by every space)."""

    name: str
    grouping: str                    # what the groups are ("recorder", "file")
    rows: np.ndarray | None          # positions among the comparable tiles; None: skipped
    labels: np.ndarray | None
    groups: np.ndarray | None
    note: str = ""


def prepare_knn_task(task: str, labels: pd.DataFrame, config: CompareConfig) -> _KnnTask:
    """Which comparable tiles enter a kNN task, with which labels and groups; or why it is skipped.

    `labels` holds a column named after the task (pseudo_label for species), `group` and
    `recorder_task_group` (as `tile_labels` makes them)."""
    column = {"species": "pseudo_label", "hour": "hour"}.get(task, task)
    group_source, group_column = (("recorder_task_group", config.recorder_group_column) if task == "recorder"
                                  else ("group", config.group_column))
    grouping = metrics.grouping_name(group_column)
    values = labels[column].astype(object)
    usable = values.notna().to_numpy().copy()
    if task == "species":
        usable &= (values != NO_DETECTION).to_numpy()
    frame = pd.DataFrame({"label": values.astype(str), "group": labels[group_source].to_numpy()})[usable]
    groups_per_class = frame.groupby("label")["group"].nunique()
    rare = groups_per_class[groups_per_class < config.knn_min_groups_per_class]
    if len(rare):
        logger.info("kNN %s: %d classes heard in fewer than %d %s groups are left out (%s)", task, len(rare),
                    config.knn_min_groups_per_class, grouping, ", ".join(map(str, rare.index[:5])))
        frame = frame[~frame["label"].isin(rare.index)]
    n_classes, n_groups = frame["label"].nunique(), frame["group"].nunique()
    minimum = config.min_labelled_tiles if task == "species" else 2
    if len(frame) < minimum:
        note = f"kNN {task}: {len(frame)} usable tiles (< {minimum})"
        if len(rare):
            note += (f" after leaving out {len(rare)} classes heard in fewer than "
                     f"{config.knn_min_groups_per_class} {grouping} groups")
    elif n_classes < 2:
        note = (f"kNN {task}: {n_classes} class in at least {config.knn_min_groups_per_class} "
                f"{grouping} groups (need 2)")
    elif n_groups < config.knn.n_folds:
        note = f"kNN {task}: {n_groups} {grouping} groups cannot fill {config.knn.n_folds} grouped folds"
    else:
        rows = frame.index.to_numpy()
        if config.knn_max_rows is not None and len(rows) > config.knn_max_rows:
            rng = np.random.default_rng(config.seed)
            rows = np.sort(rng.choice(rows, size=config.knn_max_rows, replace=False))
        return _KnnTask(task, grouping, rows, frame.loc[rows, "label"].to_numpy(),
                        frame.loc[rows, "group"].to_numpy())
    logger.warning("%s: skipped", note)
    return _KnnTask(task, grouping, None, None, None, note)


def score_knn(space: np.ndarray, task: _KnnTask, config: KnnConfig,
              kept_rows: np.ndarray | None = None) -> tuple[dict[str, Any], str]:
    """One kNN task on one space. `task.rows` count comparable tiles; `kept_rows` maps them to rows
    of `space` (None: `space` holds only the comparable tiles). Only the task's rows are read."""
    row = _nan_knn(task.name)
    row[f"knn_{task.name}_grouping"] = task.grouping
    if task.rows is None:
        return row, task.note
    space_rows = task.rows if kept_rows is None else kept_rows[task.rows]
    try:
        result = metrics.knn_cross_validate(np.asarray(space[space_rows], dtype=np.float32), task.labels,
                                            task.groups, config, task.grouping)
    except ValueError as error:  # e.g. a fold splitter that cannot honour the groups
        logger.warning("kNN %s skipped: %s", task.name, error)
        return row, f"kNN {task.name}: {error}"
    _, counts = np.unique(task.labels, return_counts=True)
    row.update({
        f"knn_{task.name}_accuracy": result.accuracy,
        f"knn_{task.name}_interval_low": result.accuracy_interval.low,
        f"knn_{task.name}_interval_high": result.accuracy_interval.high,
        f"knn_{task.name}_interval_method": result.accuracy_interval.method,
        f"knn_{task.name}_macro_f1": result.macro_f1,
        f"knn_{task.name}_majority_share": counts.max() / counts.sum(),  # accuracy of always guessing the commonest
        f"knn_{task.name}_n_tiles": len(task.rows),
        f"knn_{task.name}_n_groups": result.n_groups,
        f"knn_{task.name}_n_classes": len(counts),
    })
    return row, ""


def _score_clusters(clusters: np.ndarray, labels: pd.DataFrame, config: CompareConfig
                    ) -> tuple[dict[str, Any], list[str]]:
    """Agreement with the pseudo-labels (labelled tiles) and the detection-rate summary (all tiles)."""
    notes: list[str] = []
    row: dict[str, Any] = {name: np.nan for name in CLUSTER_METRICS}
    pseudo = labels["pseudo_label"].astype(object)
    labelled = (pseudo != NO_DETECTION).to_numpy()
    n_labelled = int(labelled.sum())
    n_species = int(pseudo[labelled].nunique())
    row.update({"n_clusters": len(np.unique(clusters)), "n_labelled_tiles": n_labelled,
                "n_species": n_species})
    if n_labelled < config.min_labelled_tiles:
        notes.append(f"cluster agreement: {n_labelled} confidently labelled tiles (< {config.min_labelled_tiles})")
    else:
        agreement = metrics.clustering_agreement(clusters[labelled], pseudo[labelled].to_numpy())
        row.update({name: agreement[name] for name in CLUSTER_METRICS})
        if n_species < 2:
            notes.append("cluster agreement: a single species, so NMI and ARI are degenerate")
    rates = metrics.detection_rate_per_cluster(clusters, labels["detected"].to_numpy(bool))
    summary = metrics.summarize_detection_rates(rates, n_top=config.n_top_clusters,
                                                min_tiles=config.min_cluster_tiles)
    row.update({
        "detection_rate_overall": summary["overall_rate"],
        "detection_rate_top": summary["top_mean_rate"],
        "detection_rate_top_lift": summary["top_lift"],
        "detection_top_tile_share": summary["top_tile_share"],
        "detection_top_detection_share": summary["top_detection_share"],
        "n_top_clusters": summary["n_top"],
    })
    if summary["n_top"] == 0:
        notes.append(f"detection rate: no cluster has {config.min_cluster_tiles} tiles")
    return row, notes


def compare_output_spaces(spaces: Mapping[str, Any], tile_index: pd.DataFrame, detections: pd.DataFrame,
                          config: CompareConfig | None = None,
                          cluster_labels: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per output space: clustering agreement, detection rates and grouped kNN scores.

    spaces: name -> (N, D) array, row i = row i of `tile_index`. detections: BirdNET's table
    (tile_id, top_species, top_confidence, skip_reason), matched by tile_id. cluster_labels:
    name -> (N,) labels from `cluster_spaces(spaces, config.cluster, comparable_rows(...))`, to
    reuse a clustering; spaces without them are clustered here with `config.cluster`.
    Columns: output_space, n_dims, n_tiles, n_clusters, n_labelled_tiles, n_species,
    nmi, ari, v_measure, homogeneity, completeness, purity (labelled tiles),
    detection_rate_overall / _top / _top_lift, detection_top_tile_share,
    detection_top_detection_share, n_top_clusters (all tiles), then per kNN task
    knn_<task>_{accuracy, interval_low, interval_high, interval_method, macro_f1, majority_share,
    n_tiles, grouping, n_groups, n_classes} (the interval: a percentile bootstrap over the task's
    groups, its method says over how many), and notes (why a value is NaN).
    """
    config = config or CompareConfig()
    if not spaces:
        raise ValueError("no output spaces to compare")
    labels = tile_labels(tile_index, detections, config)
    keep = comparable_rows(spaces, labels)
    if not keep.any():
        raise ValueError("no tile is comparable: BirdNET scored none, or every space has NaN rows")
    kept = labels[keep].reset_index(drop=True)
    tasks = [prepare_knn_task(task, kept, config) for task in config.knn_tasks]
    cluster_labels = dict(cluster_labels or {})
    missing = {name: space for name, space in spaces.items() if name not in cluster_labels}
    if missing:
        cluster_labels.update(cluster_spaces(missing, config.cluster, keep))

    rows = []
    kept_rows = np.flatnonzero(keep)   # row of `spaces` of each comparable tile
    for name, space in spaces.items():
        space = np.asarray(space)       # a memory map stays one; kNN reads only its task's rows
        clusters = np.asarray(cluster_labels[name])
        if clusters.shape != (len(labels),):
            raise ValueError(f"cluster labels of {name!r} have shape {clusters.shape}; expected ({len(labels)},)")
        clusters = clusters[keep]
        if (clusters < 0).any():
            raise ValueError(f"cluster labels of {name!r} leave comparable tiles unassigned (-1)")
        row: dict[str, Any] = {"output_space": name, "n_dims": int(space.shape[1]),
                               "n_tiles": int(keep.sum())}
        cluster_row, notes = _score_clusters(clusters, kept, config)
        row.update(cluster_row)
        for task in tasks:
            knn_row, note = score_knn(space, task, config.knn, kept_rows)
            row.update(knn_row)
            if note:
                notes.append(note)
        row["notes"] = "; ".join(notes)
        rows.append(row)
        logger.info("scored space %r on %d tiles", name, row["n_tiles"])
    return pd.DataFrame(rows)


def best_space(table: pd.DataFrame, candidates: list[str] | None = None,
               by: tuple[str, ...] = ("nmi", "detection_rate_top", "knn_species_accuracy")) -> str | None:
    """The candidate space with the highest first metric of `by` that is not NaN for all of them.

    Falls back to the first candidate when every metric is NaN; None when there is no candidate.
    """
    rows = table if candidates is None else table[table["output_space"].isin(candidates)]
    if rows.empty:
        return None
    for metric in by:
        if metric in rows and rows[metric].notna().any():
            return str(rows.loc[rows[metric].idxmax(), "output_space"])
    return str(rows["output_space"].iloc[0])
