"""Scores of an output space (an embedding, one row per tile) against reference labels.

Three families, each a function that takes arrays and returns numbers or tidy DataFrames:

- clustering agreement (`clustering_agreement`, `contingency_table`, `cluster_purity_table`):
  NMI, ARI, V-measure with homogeneity and completeness, purity: how well clusters found
  without labels line up with species (or BirdNET pseudo-labels);
- BirdNET detection rate per cluster (`detection_rate_per_cluster`, `summarize_detection_rates`):
  the original study's yardstick, the share of a cluster's tiles where BirdNET detected a bird;
- grouped kNN classification (`knn_cross_validate`): accuracy and macro-F1 of a k-nearest-
  neighbour vote with folds split by recording, so that windows of one recording are never on
  both sides of a split (neighbouring windows of one recording share noise, gain and often the
  same individual bird: a split by window measures recording identity, not species).

`score_output_space` runs whichever of them its inputs allow and returns one flat dict, the row
of a table of output spaces x metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier

logger = logging.getLogger(__name__)


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


def _check_finite_embeddings(embeddings: Any) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows, dims), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.number):
        raise ValueError(f"embeddings must be numeric, got {embeddings.dtype}")
    finite_rows = np.isfinite(embeddings).all(axis=1)
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
    grow with the number of clusters; ARI is chance-corrected (0 expected for random).
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
    confidence_level: float = 0.95
    n_bootstrap: int = 2000          # resamples of groups for the bootstrap interval; 0 = none

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


@dataclass
class KnnResult:
    """Out-of-fold kNN scores.

    Two confidence intervals, because they answer different questions:
    - `*_ci_t`: Student t-interval of the per-fold scores (mean +- t * sd / sqrt(n_folds)).
      Folds share training rows, so their scores are correlated and this interval is
      optimistic (Nadeau & Bengio 2003); it describes the spread over splits.
    - `*_ci_bootstrap`: percentile bootstrap over groups of the pooled out-of-fold predictions
      (groups drawn with replacement, `n_bootstrap` times): how much the score would move with
      another sample of recordings, the quantity a reader usually wants. Preferred for reports.
    `accuracy` and `macro_f1` are pooled over all out-of-fold predictions; `*_fold_mean` are the
    means of the per-fold scores.
    """

    fold_scores: pd.DataFrame          # fold, n_train, n_test, n_test_groups, accuracy, macro_f1
    accuracy: float
    macro_f1: float
    accuracy_fold_mean: float
    macro_f1_fold_mean: float
    accuracy_ci_t: tuple[float, float]
    macro_f1_ci_t: tuple[float, float]
    accuracy_ci_bootstrap: tuple[float, float]
    macro_f1_ci_bootstrap: tuple[float, float]
    predictions: np.ndarray            # (N,) out-of-fold predicted label of every row
    true_labels: np.ndarray            # (N,) the labels that were scored
    fold_of_row: np.ndarray            # (N,) int, the fold in which the row was tested
    classes: np.ndarray                # sorted class labels
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
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}accuracy_fold_mean": self.accuracy_fold_mean,
            f"{prefix}accuracy_ci_t_low": self.accuracy_ci_t[0],
            f"{prefix}accuracy_ci_t_high": self.accuracy_ci_t[1],
            f"{prefix}accuracy_ci_bootstrap_low": self.accuracy_ci_bootstrap[0],
            f"{prefix}accuracy_ci_bootstrap_high": self.accuracy_ci_bootstrap[1],
            f"{prefix}macro_f1": self.macro_f1,
            f"{prefix}macro_f1_fold_mean": self.macro_f1_fold_mean,
            f"{prefix}macro_f1_ci_t_low": self.macro_f1_ci_t[0],
            f"{prefix}macro_f1_ci_t_high": self.macro_f1_ci_t[1],
            f"{prefix}macro_f1_ci_bootstrap_low": self.macro_f1_ci_bootstrap[0],
            f"{prefix}macro_f1_ci_bootstrap_high": self.macro_f1_ci_bootstrap[1],
        }


def grouped_folds(labels: Any, groups: Any, n_folds: int = 5, stratified: bool = True,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_rows, test_rows) per fold such that no group is ever on both sides.

    Raises ValueError when there are fewer distinct groups than folds. The no-leak property
    and the cover-every-row-once property are checked on every call, not assumed.
    """
    labels = _as_1d(labels, "labels")
    groups = _as_1d(groups, "groups")
    n_rows = _same_length(labels=labels, groups=groups)
    if _missing(groups).any():
        raise ValueError(f"{int(_missing(groups).sum())} rows have no group")
    group_codes, group_index = np.unique(groups.astype(str), return_inverse=True)
    if len(group_codes) < n_folds:
        raise ValueError(f"{len(group_codes)} distinct groups cannot fill {n_folds} folds: "
                         "lower n_folds or add recordings")
    _, label_codes = np.unique(labels.astype(str), return_inverse=True)
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


def _t_interval(values: np.ndarray, confidence_level: float) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean()
    if values.size < 2:
        return (float("nan"), float("nan"))
    half_width = stats.t.ppf(0.5 + confidence_level / 2, df=values.size - 1) * \
        values.std(ddof=1) / np.sqrt(values.size)
    return (float(mean - half_width), float(mean + half_width))


def _bootstrap_over_groups(true_codes: np.ndarray, predicted_codes: np.ndarray,
                           group_index: np.ndarray, n_classes: int, config: KnnConfig
                           ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile intervals of accuracy and macro-F1 with groups resampled with replacement.

    Vectorised: per-group counts of correct rows and of per-class true positives, false
    positives and false negatives are summed with multinomial group weights.
    """
    if config.n_bootstrap == 0:
        nan = (float("nan"), float("nan"))
        return nan, nan
    n_groups = int(group_index.max()) + 1
    correct = true_codes == predicted_codes
    rows_per_group = np.bincount(group_index, minlength=n_groups).astype(np.float64)
    correct_per_group = np.bincount(group_index, weights=correct, minlength=n_groups)
    tp = np.zeros((n_groups, n_classes))
    fp = np.zeros((n_groups, n_classes))
    fn = np.zeros((n_groups, n_classes))
    np.add.at(tp, (group_index[correct], true_codes[correct]), 1)
    np.add.at(fp, (group_index[~correct], predicted_codes[~correct]), 1)
    np.add.at(fn, (group_index[~correct], true_codes[~correct]), 1)

    rng = np.random.default_rng(config.seed)
    weights = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=config.n_bootstrap)
    accuracy = (weights @ correct_per_group) / (weights @ rows_per_group)
    tp_b, fp_b, fn_b = weights @ tp, weights @ fp, weights @ fn
    denominator = 2 * tp_b + fp_b + fn_b
    # A class absent from a resample (no true and no predicted row) does not enter its
    # macro average, as in sklearn's f1_score over the labels present.
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * tp_b / denominator, np.nan)
    macro_f1 = np.nanmean(f1, axis=1)
    tail = (1 - config.confidence_level) / 2 * 100
    return (tuple(float(v) for v in np.percentile(accuracy, [tail, 100 - tail])),
            tuple(float(v) for v in np.percentile(macro_f1, [tail, 100 - tail])))


def knn_cross_validate(embeddings: Any, labels: Any, groups: Any,
                       config: KnnConfig | None = None) -> KnnResult:
    """Grouped k-fold kNN accuracy and macro-F1 of an embedding, with out-of-fold predictions.

    embeddings: (N, D) numbers, finite; labels: (N,) classes; groups: (N,) the unit that must not
    be split (the recording or file). In each fold the scaler is fitted on the training rows
    only, then a k-NN vote (`config.metric`, `config.weights`) predicts the test rows.
    k is clipped to the smallest training fold, with a warning.
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
    folds = grouped_folds(labels, groups, config.n_folds, config.stratified, config.seed)
    _, group_index = np.unique(groups.astype(str), return_inverse=True)

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
    accuracy_ci_bootstrap, macro_f1_ci_bootstrap = _bootstrap_over_groups(
        true_codes, predicted_codes, group_index, len(classes), config)
    return KnnResult(
        fold_scores=fold_scores,
        accuracy=float(skm.accuracy_score(true_codes, predicted_codes)),
        macro_f1=float(skm.f1_score(true_codes, predicted_codes, average="macro", zero_division=0)),
        accuracy_fold_mean=float(fold_scores["accuracy"].mean()),
        macro_f1_fold_mean=float(fold_scores["macro_f1"].mean()),
        accuracy_ci_t=_t_interval(fold_scores["accuracy"].to_numpy(), config.confidence_level),
        macro_f1_ci_t=_t_interval(fold_scores["macro_f1"].to_numpy(), config.confidence_level),
        accuracy_ci_bootstrap=accuracy_ci_bootstrap,
        macro_f1_ci_bootstrap=macro_f1_ci_bootstrap,
        predictions=classes[predicted_codes],
        true_labels=labels,
        fold_of_row=fold_of_row,
        classes=classes,
        config=config,
    )


# --------------------------------------------------------------------------- one output space

def score_output_space(name: str, embeddings: Any, labels: Any = None, groups: Any = None,
                       cluster_labels: Any = None, detected: Any = None,
                       knn_config: KnnConfig | None = None, n_clusters: int | None = None,
                       seed: int = 0, n_top_detection_clusters: int = 10) -> dict[str, Any]:
    """Every score its inputs allow for one output space, as one flat dict (a table row).

    - labels + groups: grouped kNN (`knn_*` keys);
    - labels: clustering agreement of `cluster_labels` with them; when no cluster labels are
      given, `cluster.fit_clusters` runs here (standardised embedding, KMeans fitted on up to
      50k rows) with `n_clusters` (default: the number of classes), the usual "KMeans NMI"
      protocol, and the silhouette is added;
    - detected + cluster_labels: the BirdNET detection-rate summary (`detection_*` keys).
    Rows with NaN in the embedding are an error (see `knn_cross_validate`).
    """
    embeddings = _check_finite_embeddings(embeddings)
    row: dict[str, Any] = {"output_space": name, "n_rows": int(embeddings.shape[0]),
                           "n_dims": int(embeddings.shape[1])}
    if labels is not None and groups is not None:
        row.update(knn_cross_validate(embeddings, labels, groups, knn_config).summary())
    if labels is not None:
        if cluster_labels is None:
            from .cluster import ClusterConfig, fit_clusters  # clustering is only needed here

            reference = _as_1d(labels, "labels")
            k = n_clusters or len(pd.unique(reference[~_missing(reference)]))
            result = fit_clusters(embeddings.astype(np.float32), ClusterConfig(n_clusters=k, seed=seed),
                                  progress=False)
            cluster_labels = result.labels
            row["silhouette"] = result.silhouette
        row.update(clustering_agreement(cluster_labels, labels))
    if detected is not None:
        if cluster_labels is None:
            raise ValueError("a detection-rate summary needs cluster_labels (or labels to cluster by)")
        summary = summarize_detection_rates(detection_rate_per_cluster(cluster_labels, detected),
                                            n_top=n_top_detection_clusters)
        row.update({f"detection_{key}": value for key, value in summary.items()
                    if key not in ("top_clusters", "top_rates")})
    return row
