"""Scores of an output space (an embedding, one row per tile) against reference labels.

Three families, each a function that takes arrays and returns numbers or tidy DataFrames:

- clustering agreement (`clustering_agreement`, `contingency_table`, `cluster_purity_table`):
  NMI, ARI, V-measure with homogeneity and completeness, purity: how well clusters found
  without labels line up with species (or BirdNET pseudo-labels);
- BirdNET detection rate per cluster (`detection_rate_per_cluster`, `summarize_detection_rates`):
  the original study's yardstick, the share of a cluster's tiles where BirdNET detected a bird;
- grouped kNN classification (`knn_cross_validate`): accuracy and macro-F1 of a k-nearest-
  neighbour vote with folds grouped by the unit that carries identity, so that rows of one group
  are never on both sides of a split. Which unit is a property of the data: neighbouring windows
  of one recording share noise, gain and often the same individual bird (group at least by
  recording); on the synthetic archive every recorder hears the same individual birds in all its
  files (group by recorder); recordings of one recordist may share a site and a bird (group by
  recordist where a table gives one). Too few groups for the folds is an error that names the
  grouping, never a silent fallback.

`score_space` scores one output space against labels (grouped kNN, a KMeans clustering's
agreement, each with an interval over resampled groups); `score_spaces` does it for a dict of
spaces with one clustering config, `spaces_table` makes their table, and `paired_against`
compares every space with a reference space on the same resamples of groups. The statistics
themselves (group bootstrap, intervals, paired differences) live in `core.stats`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from sklearn import metrics as skm
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from tqdm.auto import tqdm

from .cluster import ClusterConfig, fit_clusters, subsample_indices
from ..core.stats import (DEFAULT_LEVEL, PAIRED_COLUMNS, GroupBootstrap, Interval, agreement_intervals, codes,
                          PairedDifference, paired_accuracy, paired_agreement, paired_table, t_interval)

logger = logging.getLogger(__name__)

# Above this many rows, `score_space` scores a seeded random subsample of rows (the same rows for
# every space of one `score_spaces` call) and says so in `n_scored`: brute-force kNN is quadratic
# in rows and every bootstrap resample recomputes the agreement over all rows, while the scores'
# intervals are set by the number of groups, not of rows. Notebook 06 caps its kNN tasks likewise
# (knn_max_rows = 20000).
SCORE_MAX_ROWS = 20_000
# scikit-learn's brute-force neighbour search holds test x train distances in blocks of at most
# this many MiB (its default, 1024, let a 20k-row fold hold 0.5 GB at once: benchmarks/scale.py).
# Blocks split the test rows only; the demo's folds (~600 x 2,300 rows) fit in one block, so its
# scores are unchanged.
KNN_WORKING_MEMORY_MIB = 64


# --------------------------------------------------------------------------- input checks

def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _missing(values: np.ndarray) -> np.ndarray:
    """True where a label is missing (None, NaN, pd.NA)."""
    return np.asarray(pd.isna(pd.Series(values, dtype=object)), dtype=bool)


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs differ in length: {lengths}")
    return next(iter(lengths.values()))


def _check_finite_embeddings(embeddings: Any, chunk_rows: int = 65_536) -> np.ndarray:
    embeddings = np.asarray(embeddings)  # a memory map stays one: checked in chunks, never copied whole
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows, dims), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.number):
        raise ValueError(f"embeddings must be numeric, got {embeddings.dtype}")
    finite_rows = np.concatenate([np.isfinite(embeddings[start:start + chunk_rows]).all(axis=1)
                                  for start in range(0, len(embeddings), chunk_rows)] or [np.ones(0, bool)])
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise ValueError(f"{bad.size} of {len(embeddings)} embedding rows contain NaN or inf "
                         f"(first rows: {bad[:5].tolist()}); drop or recompute them before scoring")
    return embeddings


# --------------------------------------------------------------------------- clustering agreement

def contingency_table(cluster_labels: Any, reference_labels: Any) -> pd.DataFrame:
    """Counts of rows per (cluster, reference label): clusters as rows, labels as columns, sorted."""
    clusters = _as_1d(cluster_labels, "cluster_labels")
    reference = _as_1d(reference_labels, "reference_labels")
    _same_length(cluster_labels=clusters, reference_labels=reference)
    table = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(reference, name="label"))
    return table.sort_index(axis=0).sort_index(axis=1)


def purity(cluster_labels: Any, reference_labels: Any) -> float:
    """Share of rows whose reference label is their cluster's majority label.

    1 for a perfect clustering, but also for one cluster per row: read it with the number of
    clusters (or with completeness / NMI), never alone.
    """
    table = contingency_table(cluster_labels, reference_labels)
    total = table.to_numpy().sum()
    if total == 0:
        raise ValueError("no rows to score")
    return float(table.to_numpy().max(axis=1).sum() / total)


def cluster_purity_table(cluster_labels: Any, reference_labels: Any) -> pd.DataFrame:
    """One row per cluster: n_rows, majority_label, majority_count, purity (majority share).

    Ties for the majority go to the label that sorts first. Sorted by cluster.
    """
    table = contingency_table(cluster_labels, reference_labels)
    counts = table.to_numpy()
    majority = counts.argmax(axis=1)
    n_rows = counts.sum(axis=1)
    return pd.DataFrame({
        "cluster": table.index.to_numpy(),
        "n_rows": n_rows.astype(np.int64),
        "majority_label": table.columns.to_numpy()[majority],
        "majority_count": counts[np.arange(len(counts)), majority].astype(np.int64),
        "purity": counts[np.arange(len(counts)), majority] / n_rows,
    })


def clustering_agreement(cluster_labels: Any, reference_labels: Any) -> dict[str, float | int]:
    """NMI, ARI, homogeneity, completeness, V-measure and purity of clusters against labels.

    Rows with a missing reference label (None / NaN) are left out and counted in
    `n_rows_unlabelled`. NMI uses the arithmetic mean of the two entropies (sklearn's default),
    so it equals the V-measure. NMI and V-measure are ~0 for an independent clustering but
    grow with the number of clusters; ARI is chance-corrected (0 expected for random). These
    are scikit-learn's own scores; resampled ones come from `core.stats`.
    """
    clusters = _as_1d(cluster_labels, "cluster_labels")
    reference = _as_1d(reference_labels, "reference_labels")
    n_total = _same_length(cluster_labels=clusters, reference_labels=reference)
    labelled = ~_missing(reference)
    clusters, reference = clusters[labelled], reference[labelled]
    if clusters.size == 0:
        raise ValueError("no row has a reference label")
    homogeneity, completeness, v_measure = skm.homogeneity_completeness_v_measure(reference, clusters)
    return {
        "nmi": float(skm.normalized_mutual_info_score(reference, clusters)),
        "ari": float(skm.adjusted_rand_score(reference, clusters)),
        "homogeneity": float(homogeneity),
        "completeness": float(completeness),
        "v_measure": float(v_measure),
        "purity": purity(clusters, reference),
        "n_clusters": int(len(np.unique(clusters))),
        "n_reference_labels": int(len(pd.unique(reference))),
        "n_rows": int(clusters.size),
        "n_rows_unlabelled": int(n_total - clusters.size),
    }


# --------------------------------------------------------------------------- BirdNET detection rate

def detection_rate_per_cluster(cluster_labels: Any, detected: Any) -> pd.DataFrame:
    """Per cluster: n_tiles, n_detected, detection_rate (share of its tiles with a detection).

    `detected` is a boolean per tile, e.g. ``birdnet_max_confidence >= 0.5`` for the study's
    yardstick (which threshold: the caller's choice, say it in the figure). Sorted by
    detection_rate, highest first, then by cluster.
    """
    clusters = _as_1d(cluster_labels, "cluster_labels")
    detected = _as_1d(detected, "detected")
    _same_length(cluster_labels=clusters, detected=detected)
    if detected.dtype != bool:
        raise ValueError(f"detected must be a boolean array (e.g. confidence >= threshold), "
                         f"got {detected.dtype}")
    frame = pd.DataFrame({"cluster": clusters, "detected": detected})
    table = frame.groupby("cluster", sort=True)["detected"].agg(n_tiles="size", n_detected="sum")
    table = table.reset_index()
    table["n_detected"] = table["n_detected"].astype(np.int64)
    table["detection_rate"] = table["n_detected"] / table["n_tiles"]
    return table.sort_values(["detection_rate", "cluster"], ascending=[False, True],
                             ignore_index=True)


def summarize_detection_rates(rates: pd.DataFrame, n_top: int = 10,
                              min_tiles: int = 1) -> dict[str, Any]:
    """The top clusters by detection rate, against the archive-wide rate.

    rates: the output of `detection_rate_per_cluster`. Only clusters with at least `min_tiles`
    tiles compete for the top (a 2-tile cluster with one detection is no finding). Returns
    overall_rate, top_clusters, top_mean_rate (pooled over the top clusters' tiles),
    top_lift (top_mean_rate / overall_rate), top_tile_share (their share of all tiles) and
    top_detection_share (their share of all detections: how much of what BirdNET finds they hold).
    """
    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}")
    n_tiles = int(rates["n_tiles"].sum())
    n_detected = int(rates["n_detected"].sum())
    if n_tiles == 0:
        raise ValueError("no tiles in the detection-rate table")
    eligible = rates[rates["n_tiles"] >= min_tiles]
    top = eligible.sort_values(["detection_rate", "cluster"], ascending=[False, True]).head(n_top)
    overall_rate = n_detected / n_tiles
    top_tiles, top_detected = int(top["n_tiles"].sum()), int(top["n_detected"].sum())
    top_mean_rate = top_detected / top_tiles if top_tiles else float("nan")
    return {
        "overall_rate": overall_rate,
        "n_top": int(len(top)),
        "top_clusters": top["cluster"].tolist(),
        "top_rates": top["detection_rate"].tolist(),
        "top_mean_rate": top_mean_rate,
        "top_lift": top_mean_rate / overall_rate if overall_rate > 0 else float("nan"),
        "top_tile_share": top_tiles / n_tiles,
        "top_detection_share": top_detected / n_detected if n_detected else float("nan"),
    }


# --------------------------------------------------------------------------- grouped kNN

@dataclass
class KnnConfig:
    """Grouped k-fold kNN classification. Serialisable with `to_dict`."""

    k: int = 10                      # neighbours that vote
    n_folds: int = 5
    metric: str = "cosine"           # "cosine" or "euclidean", on standardised features
    standardize: bool = True         # z-score with a scaler fitted on each training fold only
    weights: str = "uniform"         # "uniform" majority vote or "distance" weighted
    stratified: bool = True          # StratifiedGroupKFold (balance classes) instead of GroupKFold
    seed: int = 0                    # fold shuffling (StratifiedGroupKFold) and the bootstrap
    confidence_level: float = 0.95   # level of the intervals
    n_bootstrap: int = 2000          # resamples of groups for the bootstrap intervals; 0 = none

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {self.metric!r}")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), got {self.confidence_level}")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Words for grouping columns of a tile index, in table columns, interval methods and errors.
_GROUPING_NAMES = {"relpath": "file", "path": "file"}


def grouping_name(column: str) -> str:
    """How a grouping column is named in tables: "relpath" -> "file", others as they are."""
    return _GROUPING_NAMES.get(column, column)


def group_bootstrap(groups: Any, config: KnnConfig, grouping: str) -> GroupBootstrap | None:
    """The resamples of groups every interval of one scoring shares (None when n_bootstrap is 0)."""
    if config.n_bootstrap == 0:
        return None
    return GroupBootstrap(groups, config.n_bootstrap, config.seed, unit=grouping)


def _no_bootstrap(config: KnnConfig) -> Interval:
    return Interval.undefined(config.confidence_level, "no bootstrap (n_bootstrap = 0)")


@dataclass
class KnnResult:
    """Out-of-fold kNN scores.

    `accuracy` and `macro_f1` are pooled over all out-of-fold predictions, each with a percentile
    bootstrap interval over the groups (`*_interval`: the fixed predictions rescored on groups
    drawn with replacement; how much the score would move with another sample of groups, the
    models not refitted). `*_fold_mean` are the means of the per-fold scores with a t-interval
    over the folds (`*_fold_interval`: folds share training rows, so it is optimistic; it
    describes the spread over splits). Each interval's `method` says how it was made.
    """

    fold_scores: pd.DataFrame          # fold, n_train, n_test, n_test_groups, accuracy, macro_f1
    accuracy: float
    macro_f1: float
    accuracy_fold_mean: float
    macro_f1_fold_mean: float
    accuracy_interval: Interval
    macro_f1_interval: Interval
    accuracy_fold_interval: Interval
    macro_f1_fold_interval: Interval
    predictions: np.ndarray            # (N,) out-of-fold predicted label of every row
    true_labels: np.ndarray            # (N,) the labels that were scored
    fold_of_row: np.ndarray            # (N,) int, the fold in which the row was tested
    classes: np.ndarray                # sorted class labels
    grouping: str                      # what the groups are: "recording", "recorder", "file" ...
    n_groups: int
    config: KnnConfig

    def confusion_matrix(self, normalize: str | None = None) -> pd.DataFrame:
        """Out-of-fold confusion matrix: true labels as rows, predicted as columns.

        normalize: None (counts), "true" (rows sum to 1: per-class recall on the diagonal),
        "pred" or "all", as in `sklearn.metrics.confusion_matrix`.
        """
        matrix = skm.confusion_matrix(self.true_labels, self.predictions, labels=self.classes,
                                      normalize=normalize)
        return pd.DataFrame(matrix, index=pd.Index(self.classes, name="true"),
                            columns=pd.Index(self.classes, name="predicted"))

    def summary(self, prefix: str = "knn_") -> dict[str, Any]:
        """The scalar scores as a flat dict (keys prefixed), one row of a results table."""
        return {
            f"{prefix}k": self.config.k,
            f"{prefix}metric": self.config.metric,
            f"{prefix}n_folds": self.config.n_folds,
            f"{prefix}grouping": self.grouping,
            f"{prefix}n_groups": self.n_groups,
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}accuracy_interval_low": self.accuracy_interval.low,
            f"{prefix}accuracy_interval_high": self.accuracy_interval.high,
            f"{prefix}macro_f1": self.macro_f1,
            f"{prefix}macro_f1_interval_low": self.macro_f1_interval.low,
            f"{prefix}macro_f1_interval_high": self.macro_f1_interval.high,
            f"{prefix}interval_level": self.accuracy_interval.level,
            f"{prefix}interval_method": self.accuracy_interval.method,
            f"{prefix}accuracy_fold_mean": self.accuracy_fold_mean,
            f"{prefix}accuracy_fold_interval_low": self.accuracy_fold_interval.low,
            f"{prefix}accuracy_fold_interval_high": self.accuracy_fold_interval.high,
            f"{prefix}macro_f1_fold_mean": self.macro_f1_fold_mean,
            f"{prefix}fold_interval_method": self.accuracy_fold_interval.method,
        }


def grouped_folds(labels: Any, groups: Any, n_folds: int = 5, stratified: bool = True,
                  seed: int = 0, grouping: str = "group") -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_rows, test_rows) per fold such that no group is ever on both sides.

    Raises ValueError, naming the `grouping`, when there are fewer distinct groups than folds:
    the folds are never silently made from a finer unit. The no-leak property and the
    cover-every-row-once property are checked on every call, not assumed.
    """
    labels = _as_1d(labels, "labels")
    groups = _as_1d(groups, "groups")
    n_rows = _same_length(labels=labels, groups=groups)
    if _missing(groups).any():
        raise ValueError(f"{int(_missing(groups).sum())} rows have no group ({grouping})")
    group_codes, group_index = np.unique(groups.astype(str), return_inverse=True)
    if len(group_codes) < n_folds:
        raise ValueError(f"{len(group_codes)} distinct groups cannot fill {n_folds} folds when grouping by "
                         f"{grouping}: lower n_folds, or add data with more {grouping} groups")
    label_codes = codes(labels)
    if stratified:
        splitter: StratifiedGroupKFold | GroupKFold = StratifiedGroupKFold(
            n_splits=n_folds, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=n_folds)
    folds = [(np.asarray(train, np.int64), np.asarray(test, np.int64))
             for train, test in splitter.split(np.zeros(n_rows), label_codes, group_index)]
    tested = np.zeros(n_rows, dtype=np.int64)
    for fold, (train, test) in enumerate(folds):
        leaked = np.intersect1d(group_index[train], group_index[test])
        if leaked.size:
            raise AssertionError(f"fold {fold}: groups {group_codes[leaked][:5].tolist()} are in "
                                 "both the training and the test rows")
        if len(train) + len(test) != n_rows or np.intersect1d(train, test).size:
            raise AssertionError(f"fold {fold}: training and test rows overlap or miss rows")
        tested[test] += 1
    if not (tested == 1).all():
        raise AssertionError("every row must be tested in exactly one fold")
    return folds


def _standardize_fold(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale == 0] = 1.0  # a dimension constant in training carries no information
    return (train - mean) / scale, (test - mean) / scale


def knn_cross_validate(embeddings: Any, labels: Any, groups: Any,
                       config: KnnConfig | None = None, grouping: str = "group") -> KnnResult:
    """Grouped k-fold kNN accuracy and macro-F1 of an embedding, with out-of-fold predictions.

    embeddings: (N, D) numbers, finite; labels: (N,) classes; groups: (N,) the unit that must not
    be split, named by `grouping` ("recording", "recorder" ...) in intervals and errors. In each
    fold the scaler is fitted on the training rows only, then a k-NN vote (`config.metric`,
    `config.weights`) predicts the test rows. k is clipped to the smallest training fold, with a
    warning.
    """
    config = config or KnnConfig()
    embeddings = _check_finite_embeddings(embeddings).astype(np.float64)
    labels = _as_1d(labels, "labels")
    groups = _as_1d(groups, "groups")
    _same_length(embeddings=embeddings, labels=labels, groups=groups)
    if _missing(labels).any():
        raise ValueError(f"{int(_missing(labels).sum())} rows have no label: drop them first")
    classes, true_codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"kNN classification needs at least 2 classes, got {classes.tolist()}")
    folds = grouped_folds(labels, groups, config.n_folds, config.stratified, config.seed, grouping)
    group_index = codes(groups)

    k = min(config.k, min(len(train) for train, _ in folds))
    if k < config.k:
        logger.warning("k=%d clipped to %d, the size of the smallest training fold", config.k, k)

    predicted_codes = np.full(len(labels), -1, dtype=np.int64)
    fold_of_row = np.full(len(labels), -1, dtype=np.int64)
    rows = []
    for fold, (train, test) in enumerate(folds):
        train_x, test_x = embeddings[train], embeddings[test]
        if config.standardize:
            train_x, test_x = _standardize_fold(train_x, test_x)
        classifier = KNeighborsClassifier(n_neighbors=k, metric=config.metric,
                                          weights=config.weights, algorithm="brute")
        classifier.fit(train_x, true_codes[train])
        with sklearn.config_context(working_memory=KNN_WORKING_MEMORY_MIB):
            predicted_codes[test] = classifier.predict(test_x)
        fold_of_row[test] = fold
        missing_classes = np.setdiff1d(np.unique(true_codes[test]), np.unique(true_codes[train]))
        if missing_classes.size:
            logger.warning("fold %d: classes %s are tested but absent from training (always wrong)",
                           fold, classes[missing_classes].tolist())
        rows.append({
            "fold": fold,
            "n_train": int(len(train)),
            "n_test": int(len(test)),
            "n_test_groups": int(len(np.unique(group_index[test]))),
            "accuracy": float(skm.accuracy_score(true_codes[test], predicted_codes[test])),
            "macro_f1": float(skm.f1_score(true_codes[test], predicted_codes[test],
                                           average="macro", zero_division=0)),
        })
    fold_scores = pd.DataFrame(rows)
    bootstrap = group_bootstrap(groups, config, grouping)
    if bootstrap is None:
        accuracy_interval = macro_f1_interval = _no_bootstrap(config)
    else:
        note = "fixed out-of-fold predictions"
        accuracy_interval = bootstrap.interval(bootstrap.resampled_accuracy(true_codes == predicted_codes),
                                               config.confidence_level, note)
        macro_f1_interval = bootstrap.interval(
            bootstrap.resampled_macro_f1(true_codes, predicted_codes, len(classes)), config.confidence_level, note)
    return KnnResult(
        fold_scores=fold_scores,
        accuracy=float(skm.accuracy_score(true_codes, predicted_codes)),
        macro_f1=float(skm.f1_score(true_codes, predicted_codes, average="macro", zero_division=0)),
        accuracy_fold_mean=float(fold_scores["accuracy"].mean()),
        macro_f1_fold_mean=float(fold_scores["macro_f1"].mean()),
        accuracy_interval=accuracy_interval,
        macro_f1_interval=macro_f1_interval,
        accuracy_fold_interval=t_interval(fold_scores["accuracy"], config.confidence_level, "fold"),
        macro_f1_fold_interval=t_interval(fold_scores["macro_f1"], config.confidence_level, "fold"),
        predictions=classes[predicted_codes],
        true_labels=labels,
        fold_of_row=fold_of_row,
        classes=classes,
        grouping=grouping,
        n_groups=int(group_index.max()) + 1,
        config=config,
    )


# --------------------------------------------------------------------------- output spaces against labels

@dataclass
class SpaceScores:
    """One output space scored against labels: grouped kNN and a fixed KMeans clustering.

    `agreement` is `clustering_agreement` of `clusters` with the labels (scikit-learn's scores);
    `agreement_intervals` their percentile intervals over the same resamples of groups as the
    kNN intervals (NMI's and V-measure's say they are a spread, the statistic being biased).
    """

    name: str
    embeddings: np.ndarray             # (n_scored, D) the rows that were scored
    knn: KnnResult
    clusters: np.ndarray               # (n_scored,) KMeans cluster of every scored row
    agreement: dict[str, Any]
    agreement_intervals: dict[str, Interval]
    silhouette: float                  # of the clustering (NaN when not computed)
    scored_rows: np.ndarray            # (n_scored,) sorted indices of the scored rows among all rows
    n_total_rows: int                  # rows of the space (n_scored < n_total_rows: a subsample)

    @property
    def n_scored(self) -> int:
        return int(self.scored_rows.size)

    def row(self) -> dict[str, Any]:
        """The space's scalar scores as one flat table row (n_rows: all rows; n_scored: those scored)."""
        row: dict[str, Any] = {"output_space": self.name, "n_rows": self.n_total_rows,
                               "n_scored": self.n_scored, "n_dims": int(self.embeddings.shape[1])}
        row.update(self.knn.summary())
        for name in ("nmi", "ari", "v_measure"):
            row[name] = self.agreement[name]
            interval = self.agreement_intervals[name]
            row[f"{name}_interval_low"], row[f"{name}_interval_high"] = interval.bounds
            row[f"{name}_interval_method"] = interval.method
        row.update({key: value for key, value in self.agreement.items() if key not in row})
        row["silhouette"] = self.silhouette
        return row


def score_space(name: str, embeddings: Any, labels: Any, groups: Any, grouping: str,
                knn_config: KnnConfig | None = None, cluster_config: ClusterConfig | None = None,
                cluster_labels: Any = None, silhouette: float = float("nan"),
                max_rows: int | None = SCORE_MAX_ROWS) -> SpaceScores:
    """Grouped kNN and KMeans agreement of one output space, with intervals over resampled groups.

    labels, groups: one per row (no missing label); `grouping` names the groups ("recorder" ...).
    The clustering is `cluster_labels` when given (with its `silhouette`), else
    `cluster.fit_clusters(embeddings, cluster_config)` (default: k = the number of labels, all
    scored rows). Rows with NaN are an error (see `knn_cross_validate`).

    With more than `max_rows` rows (None: no cap), everything is scored on
    `cluster.subsample_indices(N, max_rows, knn_config.seed)`: only those rows of a memory map
    are read, and `scored_rows` / the table's `n_scored` say which and how many. At or below the
    cap every row is scored, as before.
    """
    knn_config = knn_config or KnnConfig()
    embeddings = _check_finite_embeddings(embeddings)
    labels = _as_1d(labels, "labels")
    groups = _as_1d(groups, "groups")
    n_total = _same_length(embeddings=embeddings, labels=labels, groups=groups)
    scored_rows = subsample_indices(n_total, max_rows, knn_config.seed)
    if scored_rows.size < n_total:
        logger.info("%s: scoring a seeded subsample of %d of %d rows", name, scored_rows.size, n_total)
        embeddings, labels, groups = embeddings[scored_rows], labels[scored_rows], groups[scored_rows]
        if cluster_labels is not None:
            cluster_labels = _as_1d(cluster_labels, "cluster_labels")
            if len(cluster_labels) != n_total:
                raise ValueError(f"cluster_labels have {len(cluster_labels)} rows, the space {n_total}")
            cluster_labels = cluster_labels[scored_rows]
    knn = knn_cross_validate(embeddings, labels, groups, knn_config, grouping)
    if cluster_labels is None:
        cluster_config = cluster_config or ClusterConfig(n_clusters=len(knn.classes), fit_subsample=None,
                                                         seed=knn_config.seed)
        clustering = fit_clusters(np.asarray(embeddings, dtype=np.float32), cluster_config, progress=False)
        cluster_labels, silhouette = clustering.labels, clustering.silhouette
    cluster_labels = _as_1d(cluster_labels, "cluster_labels")
    _same_length(embeddings=embeddings, cluster_labels=cluster_labels)
    bootstrap = group_bootstrap(groups, knn_config, grouping)
    intervals = ({name: _no_bootstrap(knn_config) for name in ("nmi", "v_measure", "ari")} if bootstrap is None
                 else agreement_intervals(bootstrap, labels, cluster_labels, knn_config.confidence_level))
    return SpaceScores(name, np.asarray(embeddings), knn, cluster_labels,
                       clustering_agreement(cluster_labels, labels), intervals, float(silhouette),
                       scored_rows, n_total)


def score_spaces(spaces: Mapping[str, Any], labels: Any, groups: Any, grouping: str,
                 knn_config: KnnConfig | None = None, cluster_config: ClusterConfig | None = None,
                 cluster_labels: Mapping[str, Any] | None = None, silhouettes: Mapping[str, float] | None = None,
                 progress: bool = True, max_rows: int | None = SCORE_MAX_ROWS) -> dict[str, SpaceScores]:
    """`score_space` for every space (name -> (N, D), rows aligned with labels and groups), all
    clustered with one `cluster_config` unless their `cluster_labels` are given. Above `max_rows`
    every space is scored on the same seeded subsample of rows (so `paired_against` pairs them)."""
    cluster_labels, silhouettes = dict(cluster_labels or {}), dict(silhouettes or {})
    return {name: score_space(name, array, labels, groups, grouping, knn_config, cluster_config,
                              cluster_labels.get(name), silhouettes.get(name, float("nan")), max_rows)
            for name, array in tqdm(spaces.items(), desc="scoring", unit="space", disable=not progress)}


def spaces_table(scored: Mapping[str, SpaceScores]) -> pd.DataFrame:
    """One row per scored space (`SpaceScores.row`), indexed by output_space."""
    return pd.DataFrame([result.row() for result in scored.values()]).set_index("output_space")


def paired_predictions(labels: Any, predictions: Any, reference_predictions: Any, clusters: Any,
                       reference_clusters: Any, bootstrap: GroupBootstrap, level: float = DEFAULT_LEVEL,
                       agreement: Mapping[str, float] | None = None,
                       reference_agreement: Mapping[str, float] | None = None) -> list[PairedDifference]:
    """kNN accuracy, KMeans NMI and ARI of one space's fixed predictions and clustering against a
    reference's on the same rows, over the same resamples of `bootstrap`'s groups. The agreement
    estimates on the data are computed here unless given (`clustering_agreement`)."""
    agreement = agreement or clustering_agreement(clusters, labels)
    reference_agreement = reference_agreement or clustering_agreement(reference_clusters, labels)
    differences = [paired_accuracy(labels, predictions, reference_predictions, bootstrap, level)]
    differences += paired_agreement(labels, clusters, reference_clusters, bootstrap, agreement,
                                    reference_agreement, level, metrics=("nmi", "ari"))
    return differences


def paired_against(scored: Mapping[str, SpaceScores], reference: str, groups: Any, grouping: str,
                   n_bootstrap: int = 2000, level: float = DEFAULT_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Every other scored space against `reference`, on the same resamples of groups.

    Per space: kNN accuracy (the out-of-fold predictions, `core.stats.paired_accuracy`) and the
    KMeans NMI and ARI (the fixed clusterings, `core.stats.paired_agreement`). Tidy: output_space,
    then `core.stats.PAIRED_COLUMNS` (difference, its interval with level and method, and
    share_not_better: the share of resamples in which the space did not beat the reference,
    not a p-value).
    """
    if reference not in scored:
        raise KeyError(f"no space {reference!r} was scored; scored: {sorted(scored)}")
    base = scored[reference]
    for name, result in scored.items():
        if not np.array_equal(result.scored_rows, base.scored_rows):
            raise ValueError(f"{name!r} and {reference!r} were scored on different rows: score them in one "
                             "score_spaces call (one subsample) to pair them")
    groups = _as_1d(groups, "groups")
    if len(groups) == base.n_total_rows and base.n_scored < base.n_total_rows:
        groups = groups[base.scored_rows]   # groups of all rows: keep those of the scored subsample
    bootstrap = GroupBootstrap(groups, n_bootstrap, seed, unit=grouping)
    tables = []
    for name, result in scored.items():
        if name == reference:
            continue
        differences = paired_predictions(result.knn.true_labels, result.knn.predictions, base.knn.predictions,
                                         result.clusters, base.clusters, bootstrap, level,
                                         result.agreement, base.agreement)
        tables.append(paired_table(differences, output_space=name))
    columns = ["output_space", *PAIRED_COLUMNS]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)
