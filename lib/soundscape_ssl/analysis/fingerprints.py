"""Acoustic fingerprints of an ecosystem over time, and acoustic indices beside the embeddings.

The journal sequel of the study ("Acoustic fingerprints in nature", Ecological Informatics 83,
2024) reads an SSL output space as a fingerprint of the soundscape: which clusters are active
where and when. This module computes what notebook 08 shows, from arrays aligned with the tile
index:

* `tile_times`: hour of day, day and ISO week of every tile;
* `cluster_groups`: each cluster named by its level-based verdict (notebook 04) and, where the
  archive has planted sources, the commonest source kind of its tiles (bird, insect, rain, wind,
  traffic, silence): "signal: bird", "near-silent: silence" ...;
* `activity_shares`: the share of each cluster (or group) among the tiles of each recorder x hour
  (or habitat x week): the fingerprint heatmaps; `diel_curves`: the share of the tiles of each hour
  that fall in bird, insect, rain or silence clusters;
* `separation_table`: grouped kNN accuracy of recorder, habitat, hour of day and week read off
  several output spaces, on the protocol of `compare` (the BirdNET comparison): folds grouped by
  recorder for habitat, hour and week (a held-out recorder's hours are read from the other
  recorders: a recorder hears its own birds and background in all its files), by file for the
  recorder task (a held-out file of a recorder is recognised), a bootstrap interval over the
  groups and the majority-class share as chance;
* `index_space`: the index vector of each tile as a finite matrix; `index_cluster_effects`: which
  indices differ most between clusters (rank eta squared, the Kruskal-Wallis effect size);
  `index_diel_tracking`: which index's hourly median follows a cluster group's diel curve
  (Spearman correlation over the hours).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from . import compare, metrics
from .compare import CompareConfig

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("bird", "insect", "rain", "wind", "traffic", "silence")
SILENCE = "silence"        # the planted "background" kind (nothing audible) under its ecological name
DIEL_GROUPS = ("bird", "insect", "rain", "silence")


def tile_times(tile_index: pd.DataFrame) -> pd.DataFrame:
    """hour (Int64), day ("2024-05-24") and week ("2024-W21") of each tile's timestamp; NA without one."""
    times = pd.to_datetime(tile_index["timestamp"].reset_index(drop=True), errors="coerce")
    day = times.dt.strftime("%Y-%m-%d").where(times.notna(), pd.NA).astype(object)
    return pd.DataFrame({"hour": compare.hour_of_day(times), "day": day, "week": compare.iso_week(times)})


def source_kinds(tile_kinds: Sequence[Any]) -> np.ndarray:
    """The planted kind of each tile with "background" (nothing audible) named "silence"."""
    kinds = pd.Series(tile_kinds, dtype=object).replace({"background": SILENCE})
    return kinds.to_numpy(dtype=object)


def cluster_groups(cluster_labels: Any, clusters_table: pd.DataFrame,
                   tile_kinds: Sequence[Any] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """(group of each tile, one row per cluster: cluster, verdict, kind, group, kind_share).

    `clusters_table`: `report.cluster_report.describe_clusters` (cluster, verdict). With
    `tile_kinds` (the planted kind per tile, synthetic archives) each cluster also gets its
    commonest kind and the share of its tiles of that kind; the group is "verdict: kind". Without,
    the group is the verdict alone.
    """
    clusters = np.asarray(cluster_labels)
    table = clusters_table[["cluster", "verdict"]].copy()
    if tile_kinds is not None:
        purity = metrics.cluster_purity_table(clusters, source_kinds(tile_kinds))
        table = table.merge(purity.rename(columns={"majority_label": "kind", "purity": "kind_share"})
                            [["cluster", "kind", "kind_share"]], on="cluster", how="left", validate="one_to_one")
        table["group"] = table["verdict"] + ": " + table["kind"].astype(str)
    else:
        table["kind"], table["kind_share"] = pd.NA, np.nan
        table["group"] = table["verdict"]
    mapping = dict(zip(table["cluster"], table["group"]))
    missing = set(np.unique(clusters)) - set(mapping)
    if missing:
        raise ValueError(f"clusters {sorted(missing)[:5]} are not in the clusters table")
    return np.array([mapping[c] for c in clusters], dtype=object), table


def activity_shares(keys: pd.DataFrame, categories: Sequence[Any]) -> pd.DataFrame:
    """Share of each category among the tiles of each key (rows: the keys' combinations present,
    sorted; columns: the categories, sorted; each row sums to 1) with the row's tile count in
    `n_tiles`. Rows whose key has a missing value are left out."""
    frame = keys.reset_index(drop=True).copy()
    frame["category"] = np.asarray(categories, dtype=object)
    frame = frame.dropna()
    if frame.empty:
        return pd.DataFrame(columns=["n_tiles"])
    by = list(keys.columns)
    counts = pd.crosstab([frame[column] for column in by], frame["category"])
    shares = counts.div(counts.sum(axis=1), axis=0)
    shares.columns = shares.columns.astype(str)
    shares["n_tiles"] = counts.sum(axis=1)
    return shares.sort_index()


def diel_curves(hours: Sequence[Any], groups: Sequence[Any], names: Sequence[str] = DIEL_GROUPS,
                group_kind: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Share of each hour's tiles that fall in each of `names` (rows: hours present; columns:
    names, and n_tiles). A tile counts for a name when its group is the name or, with
    `group_kind` (group -> kind), when its group's kind is."""
    groups = pd.Series(groups, dtype=object).reset_index(drop=True)
    kind = groups.map(group_kind) if group_kind else groups
    frame = pd.DataFrame({"hour": pd.Series(hours).reset_index(drop=True).astype("Int64"), "kind": kind})
    frame = frame.dropna(subset=["hour"])
    curves = pd.DataFrame({name: (frame["kind"] == name).groupby(frame["hour"]).mean() for name in names})
    curves["n_tiles"] = frame.groupby("hour").size()
    return curves.sort_index()


def separation_labels(tile_index: pd.DataFrame, config: CompareConfig) -> pd.DataFrame:
    """What the separation tasks are scored against, per tile: recorder, habitat, hour, week and the
    groups of `compare`'s protocol (`group`: config.group_column; `recorder_task_group`)."""
    index = tile_index.reset_index(drop=True)
    times = tile_times(index)
    return pd.DataFrame({
        "recorder": index["recorder"].astype(object),
        "habitat": index["habitat"].astype(object) if "habitat" in index else pd.NA,
        "hour": compare.hour_of_day(index["timestamp"], config.hour_bin_h),
        "week": times["week"],
        "group": index[config.group_column].astype(str).to_numpy(),
        "recorder_task_group": index[config.recorder_group_column].astype(str).to_numpy(),
    })


def rows_of(array: Any, rows: np.ndarray) -> Any:
    """The rows of an (N, D) array that have indices: the array itself (a memory map stays one)
    when they are all N rows in order, a copy of only those rows otherwise (at most `max_tiles`)."""
    rows = np.asarray(rows)
    if len(rows) == len(array) and np.array_equal(rows, np.arange(len(array))):
        return array
    return np.asarray(array[rows])


def separation_table(spaces: Mapping[str, Any], tile_index: pd.DataFrame,
                     config: CompareConfig | None = None) -> pd.DataFrame:
    """Grouped kNN accuracy of each separation task read off each space, one row per (task, space):
    task, space, grouping, accuracy, interval_low, interval_high, majority_share (chance: always
    guessing the commonest class), n_tiles, n_classes, n_groups, note (why a value is NaN).
    Every space is scored on the same tiles, drawn once per task; rows not finite in every space
    are left out of every space."""
    config = config or CompareConfig(knn_tasks=compare.SEPARATION_TASKS)
    labels = separation_labels(tile_index, config)
    keep = np.ones(len(labels), bool)
    for name, space in spaces.items():
        space = np.asarray(space)
        if space.shape[0] != len(labels):
            raise ValueError(f"space {name!r} has {space.shape[0]} rows; the tile index has {len(labels)}")
        keep &= compare.finite_rows(space)
    kept = labels[keep].reset_index(drop=True)
    kept_rows = np.flatnonzero(keep)
    rows = []
    for task_name in config.knn_tasks:
        task = compare.prepare_knn_task(task_name, kept, config)
        for name, space in spaces.items():
            scores, note = compare.score_knn(np.asarray(space), task, config.knn, kept_rows)
            row = {key.removeprefix(f"knn_{task_name}_"): value for key, value in scores.items()}
            rows.append({"task": task_name, "space": name, **row, "note": note})
    columns = ["task", "space", "grouping", "accuracy", "interval_low", "interval_high", "majority_share",
               "n_tiles", "n_classes", "n_groups", "note"]
    return pd.DataFrame(rows).reindex(columns=columns)


def separation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The separation table as tasks x spaces of "0.84 [0.80, 0.88]" (chance and grouping beside)."""
    def cell(row: pd.Series) -> str:
        if pd.isna(row["accuracy"]):
            return "n/a"
        return f"{row['accuracy']:.2f} [{row['interval_low']:.2f}, {row['interval_high']:.2f}]"

    wide = table.assign(cell=table.apply(cell, axis=1)).pivot(index="task", columns="space", values="cell")
    first = table.drop_duplicates("task").set_index("task")
    wide.insert(0, "grouped by", first["grouping"])
    wide.insert(1, "chance", first["majority_share"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.2f}"))
    return wide.reindex([task for task in table["task"].unique()])


# ------------------------------------------------------------------------------ indices and clusters

def index_space(table: pd.DataFrame, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The index vector of each row as a finite float64 matrix, and the names kept.

    An index that is NaN for every row, or constant, carries nothing and is dropped; other missing
    values (entropies of digital silence, windows the reader could not give) become the index's
    median, so that every tile keeps a row (the kNN standardises each column per fold)."""
    values = table.loc[:, list(names)].to_numpy(np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    kept = [j for j in range(values.shape[1])
            if np.isfinite(values[:, j]).any() and np.nanstd(values[:, j]) > 0]
    values = values[:, kept]
    medians = np.nanmedian(values, axis=0)
    rows, columns = np.nonzero(np.isnan(values))
    values[rows, columns] = medians[columns]
    return values, [names[j] for j in kept]


def index_cluster_effects(values: np.ndarray, names: Sequence[str], cluster_labels: Any,
                          min_tiles: int = 5) -> pd.DataFrame:
    """How much each index differs between clusters: the rank eta squared (Kruskal-Wallis H scaled
    to 0..1: (H - k + 1) / (n - k), the share of the ranks' variance between clusters), over
    clusters of at least `min_tiles` tiles; with the clusters of highest and lowest median.
    Sorted by eta_squared, largest first."""
    clusters = np.asarray(cluster_labels)
    sizes = pd.Series(clusters).value_counts()
    big = sizes[sizes >= min_tiles].index.to_numpy()
    rows = []
    for j, name in enumerate(names):
        column = np.asarray(values)[:, j]
        samples = [column[clusters == c] for c in big]
        n, k = sum(len(s) for s in samples), len(samples)
        if k < 2 or n <= k:
            eta = np.nan
        else:
            try:
                h_statistic = scipy_stats.kruskal(*samples).statistic
                eta = max(0.0, (h_statistic - k + 1) / (n - k))
            except ValueError:        # every value equal: no difference at all
                eta = 0.0
        medians = pd.Series([np.median(s) for s in samples], index=big)
        rows.append({"index": name, "eta_squared": eta,
                     "highest_cluster": medians.idxmax() if k else pd.NA,
                     "lowest_cluster": medians.idxmin() if k else pd.NA})
    return pd.DataFrame(rows).sort_values("eta_squared", ascending=False, ignore_index=True)


def index_diel_profiles(values: np.ndarray, names: Sequence[str], hours: Sequence[Any],
                        wanted: Sequence[str]) -> pd.DataFrame:
    """Hourly median of each `wanted` index (those in `names`), as z-scores across the hours (so
    that indices of different units share one axis), with the tiles per hour in n_tiles."""
    hours = pd.Series(hours).reset_index(drop=True).astype("Int64")
    frame = pd.DataFrame(np.asarray(values), columns=list(names)).assign(hour=hours).dropna(subset=["hour"])
    chosen = [name for name in wanted if name in names]
    hourly = frame.groupby("hour")[chosen].median()
    spread = hourly.std(ddof=0).replace(0.0, np.nan)
    profiles = (hourly - hourly.mean()) / spread
    profiles["n_tiles"] = frame.groupby("hour").size()
    return profiles.sort_index()


def index_diel_tracking(values: np.ndarray, names: Sequence[str], hours: Sequence[Any],
                        curve: pd.Series) -> pd.DataFrame:
    """Spearman correlation, over the hours, between each index's hourly median and `curve` (a diel
    curve: hour -> share), with the number of hours. Sorted by |rho|, largest first."""
    hours = pd.Series(hours).reset_index(drop=True).astype("Int64")
    frame = pd.DataFrame(np.asarray(values), columns=list(names)).assign(hour=hours).dropna(subset=["hour"])
    hourly = frame.groupby("hour").median()
    common = hourly.index.intersection(curve.dropna().index)
    rows = []
    for name in names:
        if len(common) < 3:
            rho = np.nan
        else:
            rho = scipy_stats.spearmanr(hourly.loc[common, name], curve.loc[common]).statistic
        rows.append({"index": name, "spearman_rho": rho, "n_hours": len(common)})
    table = pd.DataFrame(rows)
    order = table["spearman_rho"].abs().sort_values(ascending=False, na_position="last").index
    return table.loc[order].reset_index(drop=True)
