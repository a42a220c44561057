"""KMeans clusters and a 2-D UMAP map of an embedding (one row per tile), fitted on subsamples.

The study's recipe: standardise the full-dimensional embedding (not a 2-D projection), fit
KMeans with k = 100 on a random 50k-row subsample, then assign every row to its nearest
centroid. Fitting on a subsample keeps the cost independent of the archive size (a 1M-tile
archive costs the same fit as a 50k one); assignment is one chunked matrix product per block of
rows, so 1M x 384 float32 never needs a second full-size copy in memory.

Determinism: with the same `seed`, `fit_clusters` returns the same labels on the same machine
(subsample, k-means++ initialisation and restarts are seeded). `umap_2d` is reproducible only
with `umap_deterministic=True`, which makes umap-learn run single-threaded (its parallel
nearest-neighbour search and layout optimisation are not order-stable).

Products of `ClusterResult.save(out_dir)`::

    model.npz          centroids (standardised space), scaler mean/scale, cluster sizes,
                       fit-subsample row indices, inertia, silhouette, iterations
    assignments.parquet   one row per embedding row: row, cluster, distance_to_centroid
    config.json        the ClusterConfig, the numbers of rows and clusters, the silhouette
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from ..core.config import config_from_mapping
from ..core.provenance import write_config_json
from ..core.stage import atomic_write

logger = logging.getLogger(__name__)

STAGE = "cluster"
MODEL_FILE = "model.npz"
ASSIGNMENTS_FILE = "assignments.parquet"
CONFIG_FILE = "config.json"


@dataclass
class ClusterConfig:
    """How an embedding is clustered and mapped to 2-D. Serialisable with `to_dict` / `from_dict`."""

    n_clusters: int = 100                 # KMeans k (the study: 100); clipped to the rows available
    fit_subsample: int | None = 50_000    # rows the scaler and KMeans are fitted on; None = all rows
    standardize: bool = True              # z-score every dimension (scaler fitted on the subsample)
    seed: int = 0                         # subsample draw, k-means++ initialisation, UMAP
    n_init: int = 3                       # KMeans restarts; the lowest-inertia one is kept
    max_iter: int = 300                   # Lloyd iterations per restart
    # Above this many fit rows MiniBatchKMeans replaces KMeans: full Lloyd costs
    # n_init x iterations x rows x k x dim (50k x 100 x 384 is ~4 GFLOP per iteration, seconds),
    # which grows linearly past ~10 minutes on a few cores at a few million rows, while
    # MiniBatchKMeans touches a fixed number of rows per step at a small inertia cost.
    minibatch_above_rows: int = 250_000
    minibatch_batch_size: int = 4096
    assign_chunk_rows: int = 32_768       # rows standardised and assigned at once (memory bound)
    silhouette_subsample: int = 10_000    # silhouette is O(n^2): scored on this many random rows
    umap_n_neighbors: int = 15
    umap_min_dist: float = 0.1
    umap_metric: str = "euclidean"        # on the standardised embedding
    # UMAP is fitted on this many random rows and the others are placed with `transform`;
    # None fits on all rows. Transformed rows sit less faithfully in the map (see `umap_2d`),
    # so keep this as large as the time allows (25-30 s per 50k x 384 single-threaded, measured).
    umap_subsample: int | None = 100_000
    umap_deterministic: bool = True       # seeded and single-threaded; False: parallel, not repeatable

    def __post_init__(self) -> None:
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        for name in ("fit_subsample", "umap_subsample"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2 or None, got {value}")
        if self.n_init < 1 or self.max_iter < 1 or self.assign_chunk_rows < 1:
            raise ValueError("n_init, max_iter and assign_chunk_rows must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClusterConfig":
        """Inverse of `to_dict`; unknown keys are an error so a typo never passes silently."""
        return config_from_mapping(cls, values)


@dataclass
class ClusterResult:
    """KMeans clusters of an embedding: per-row labels and distances, the fitted model.

    `centroids` live in the standardised space: ``(x - scaler_mean) / scaler_scale``
    (mean 0 and scale 1 when the config did not standardise). `distances` are Euclidean
    distances in that space from each row to its own centroid.
    """

    labels: np.ndarray            # (N,) int32 cluster of every row
    distances: np.ndarray         # (N,) float32 distance to the own centroid
    centroids: np.ndarray         # (k, D) float32, standardised space
    scaler_mean: np.ndarray       # (D,) float64
    scaler_scale: np.ndarray      # (D,) float64
    cluster_sizes: np.ndarray     # (k,) int64 rows per cluster, over all N rows
    fit_indices: np.ndarray       # (n_fit,) int64 rows the scaler and KMeans were fitted on
    inertia: float                # KMeans objective on the fit subsample
    silhouette: float             # on a random subsample of all rows (NaN when undefined)
    n_iter: int                   # Lloyd / mini-batch iterations of the kept restart
    config: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def n_clusters(self) -> int:
        """Clusters actually fitted (the config's k, clipped to the fit rows)."""
        return int(self.centroids.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def standardize(self, embeddings: np.ndarray) -> np.ndarray:
        """Rows in the standardised space the centroids live in (float32)."""
        return _standardize(embeddings, self.scaler_mean, self.scaler_scale)

    def assign(self, embeddings: np.ndarray, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid and its distance for new rows (e.g. a labelled set, same model)."""
        embeddings = _check_embeddings(embeddings)
        if embeddings.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"embeddings have {embeddings.shape[1]} dimensions, the centroids "
                             f"{self.centroids.shape[1]}")
        return assign_to_centroids(embeddings, self.centroids, self.scaler_mean, self.scaler_scale,
                                   self.config.assign_chunk_rows, progress=progress)

    def central_indices(self, k_per_cluster: int) -> dict[int, np.ndarray]:
        """For every cluster, its `k_per_cluster` rows nearest the centroid, nearest first.

        The rows a cluster gallery shows. A cluster with fewer rows gives all of them; an empty
        cluster gives an empty array. Ties in distance are broken by row index.
        """
        if k_per_cluster < 1:
            raise ValueError(f"k_per_cluster must be >= 1, got {k_per_cluster}")
        # Sort by (label, distance, row): each cluster's rows become one contiguous run.
        order = np.lexsort((np.arange(len(self)), self.distances, self.labels))
        run_starts = np.concatenate([[0], np.cumsum(self.cluster_sizes)[:-1]])
        return {
            cluster: order[start:start + min(int(size), k_per_cluster)].astype(np.int64)
            for cluster, (start, size) in enumerate(zip(run_starts, self.cluster_sizes))
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write model.npz, assignments.parquet and config.json into `out_dir`; returns it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / MODEL_FILE) as model_tmp, open(model_tmp, "wb") as handle:
            np.savez(handle, centroids=self.centroids, scaler_mean=self.scaler_mean,
                     scaler_scale=self.scaler_scale, cluster_sizes=self.cluster_sizes,
                     fit_indices=self.fit_indices, inertia=np.float64(self.inertia),
                     silhouette=np.float64(self.silhouette), n_iter=np.int64(self.n_iter))
        table = pa.table({
            "row": pa.array(np.arange(len(self), dtype=np.int64)),
            "cluster": pa.array(self.labels.astype(np.int32)),
            "distance_to_centroid": pa.array(self.distances.astype(np.float32)),
        })
        with atomic_write(out_dir / ASSIGNMENTS_FILE) as assignments_tmp:
            pq.write_table(table, assignments_tmp)
        # config.json last: a folder without it is an unfinished save.
        write_config_json(out_dir, STAGE, self.config, n_rows=len(self), n_clusters=self.n_clusters,
                          n_fit_rows=int(self.fit_indices.size), inertia=self.inertia,
                          silhouette=None if np.isnan(self.silhouette) else self.silhouette)
        return out_dir

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "ClusterResult":
        """Inverse of `save`."""
        out_dir = Path(out_dir)
        config_path = out_dir / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} is missing: not a finished cluster folder")
        payload = json.loads(config_path.read_text())
        if payload.get("stage") != STAGE:
            raise ValueError(f"{config_path} is a {payload.get('stage')!r} config, not {STAGE!r}")
        with np.load(out_dir / MODEL_FILE) as model:
            arrays = {name: model[name] for name in model.files}
        table = pq.read_table(out_dir / ASSIGNMENTS_FILE)
        rows = table.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(len(rows))):
            raise ValueError(f"{out_dir / ASSIGNMENTS_FILE}: rows are not 0..N-1 in order")
        return cls(
            labels=table.column("cluster").to_numpy().astype(np.int32),
            distances=table.column("distance_to_centroid").to_numpy().astype(np.float32),
            centroids=arrays["centroids"], scaler_mean=arrays["scaler_mean"],
            scaler_scale=arrays["scaler_scale"], cluster_sizes=arrays["cluster_sizes"],
            fit_indices=arrays["fit_indices"], inertia=float(arrays["inertia"]),
            silhouette=float(arrays["silhouette"]), n_iter=int(arrays["n_iter"]),
            config=ClusterConfig.from_dict(payload["config"]),
        )


def _check_embeddings(embeddings: np.ndarray, chunk_rows: int = 65_536,
                      rows: np.ndarray | None = None) -> np.ndarray:
    """A 2-D float array with finite values (checked in chunks: works on memory maps).

    With `rows` (sorted row indices), only those rows are checked."""
    embeddings = np.asarray(embeddings)  # a view of a memory map, not a copy
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows, dims), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    n_rows = embeddings.shape[0] if rows is None else len(rows)
    if n_rows == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings are empty: shape {embeddings.shape}, {n_rows} rows chosen")
    bad_rows = 0
    first_bad = None
    for start, stop in _chunks(n_rows, chunk_rows):
        finite = np.isfinite(take_rows(embeddings, rows, start, stop)).all(axis=1)
        if not finite.all():
            bad_rows += int((~finite).sum())
            if first_bad is None:
                position = start + int(np.flatnonzero(~finite)[0])
                first_bad = position if rows is None else int(rows[position])
    if bad_rows:
        raise ValueError(f"{bad_rows} of {n_rows} embedding rows contain NaN or inf "
                         f"(first: row {first_bad}); drop or recompute them before clustering")
    return embeddings


def _chunks(n_rows: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, chunk_rows):
        yield start, min(n_rows, start + chunk_rows)


def take_rows(embeddings: np.ndarray, rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Chosen rows [start, stop) of `embeddings`: a slice when every row is chosen (rows None),
    else the rows `rows[start:stop]`. Reads only those rows of a memory map."""
    return embeddings[start:stop] if rows is None else embeddings[rows[start:stop]]


def _chosen(embeddings: np.ndarray, rows: np.ndarray | None, positions: np.ndarray) -> np.ndarray:
    """The chosen rows at `positions` (positions count chosen rows, not all rows)."""
    return embeddings[positions] if rows is None else embeddings[rows[positions]]


def _as_row_indices(rows: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    """Sorted int64 row indices from a boolean mask or indices (None stays None: all rows)."""
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n_rows,):
            raise ValueError(f"a row mask must have {n_rows} entries, got shape {rows.shape}")
        return np.flatnonzero(rows).astype(np.int64)
    rows = np.sort(rows.astype(np.int64))
    if rows.size and (rows[0] < 0 or rows[-1] >= n_rows):
        raise ValueError(f"row indices must be in 0..{n_rows - 1}")
    return rows


def subsample_indices(n_rows: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted random rows without replacement (all rows when size is None or >= n_rows).

    Sorted so that reading them from a memory map walks the file forwards. The rows UMAP is
    fitted on in `umap_2d` are ``subsample_indices(N, config.umap_subsample, config.seed)``.
    """
    if size is None or size >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=size, replace=False)).astype(np.int64)


def _fit_scaler(sample: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale; a constant dimension gets scale 1 (as StandardScaler does)."""
    dims = sample.shape[1]
    if not standardize:
        return np.zeros(dims), np.ones(dims)
    sample64 = sample.astype(np.float64)
    mean = sample64.mean(axis=0)
    scale = sample64.std(axis=0)
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, scale


def _standardize(rows: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return ((np.asarray(rows, dtype=np.float64) - mean) / scale).astype(np.float32)


def assign_to_centroids(embeddings: np.ndarray, centroids: np.ndarray, scaler_mean: np.ndarray,
                        scaler_scale: np.ndarray, chunk_rows: int = 32_768,
                        progress: bool = False, rows: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int32) and Euclidean distance to it (float32) for every row
    (or for the sorted row indices `rows`, in their order).

    Rows are standardised and scored one chunk at a time, so the peak extra memory is
    about chunk_rows x (dims + k) floats whatever N is. Ties go to the lower cluster index,
    as in sklearn's `KMeans.predict`.
    """
    centroids = np.asarray(centroids, dtype=np.float32)
    centroid_sq_norms = np.einsum("kd,kd->k", centroids, centroids)
    n_rows = embeddings.shape[0] if rows is None else len(rows)
    labels = np.empty(n_rows, dtype=np.int32)
    distances = np.empty(n_rows, dtype=np.float32)
    chunks = list(_chunks(n_rows, chunk_rows))
    for start, stop in tqdm(chunks, desc="assign to centroids", unit="chunk",
                            disable=not progress or len(chunks) < 2):
        chunk = _standardize(take_rows(embeddings, rows, start, stop), scaler_mean, scaler_scale)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one BLAS call per chunk
        sq = np.einsum("nd,nd->n", chunk, chunk)[:, None] - 2.0 * (chunk @ centroids.T) + centroid_sq_norms
        nearest = np.argmin(sq, axis=1)
        labels[start:stop] = nearest
        # The expansion cancels digits in float32; the distance to the chosen centroid is
        # recomputed directly (one subtraction per row, no k factor).
        distances[start:stop] = np.linalg.norm(chunk - centroids[nearest], axis=1)
    return labels, distances


def fit_clusters(embeddings: np.ndarray, config: ClusterConfig | None = None,
                 progress: bool = True, rows: np.ndarray | None = None) -> ClusterResult:
    """KMeans on the standardised, full-dimensional embedding, fitted on a subsample; all rows assigned.

    embeddings: (N, D) float array (a memory map works; only the subsample and one chunk at a time
    are held as float32 copies). The scaler and KMeans are fitted on `config.fit_subsample`
    random rows; every row is then assigned to its nearest centroid. `config.n_clusters` is
    clipped, with a warning, when there are fewer fit rows than clusters. The silhouette is
    computed on `config.silhouette_subsample` random rows of all N (it is quadratic in rows).

    rows: cluster only these rows (a boolean mask or row indices; default all), read from
    `embeddings` where they lie, so a subset of a memory map is never copied whole. The result
    then describes the chosen rows in order (labels[i] is row rows[i]; `fit_indices` count chosen
    rows), exactly as if `embeddings[rows]` had been passed.
    """
    config = config or ClusterConfig()
    rows = _as_row_indices(rows, np.shape(embeddings)[0])
    embeddings = _check_embeddings(embeddings, rows=rows)
    n_rows = embeddings.shape[0] if rows is None else len(rows)
    dims = embeddings.shape[1]
    started = time.perf_counter()

    fit_indices = subsample_indices(n_rows, config.fit_subsample, config.seed)
    fit_rows = np.asarray(_chosen(embeddings, rows, fit_indices), dtype=np.float32)
    scaler_mean, scaler_scale = _fit_scaler(fit_rows, config.standardize)
    fit_rows = _standardize(fit_rows, scaler_mean, scaler_scale)

    n_clusters = config.n_clusters
    n_fit = fit_rows.shape[0]
    # Duplicate rows (e.g. silent tiles) can leave fewer distinct points than clusters, which
    # KMeans answers with duplicate centroids; counting them is only worth it when it can matter.
    n_distinct = len(np.unique(fit_rows, axis=0)) if n_fit <= 20 * n_clusters else n_fit
    if n_clusters > n_distinct:
        logger.warning("%d clusters requested but the fit subsample has only %d distinct rows "
                       "(of %d); using k = %d", n_clusters, n_distinct, n_fit, n_distinct)
        n_clusters = n_distinct

    if fit_rows.shape[0] > config.minibatch_above_rows:
        model: KMeans | MiniBatchKMeans = MiniBatchKMeans(
            n_clusters=n_clusters, n_init=config.n_init, max_iter=config.max_iter,
            batch_size=config.minibatch_batch_size, random_state=config.seed)
        algorithm = "MiniBatchKMeans"
    else:
        model = KMeans(n_clusters=n_clusters, n_init=config.n_init, max_iter=config.max_iter,
                       random_state=config.seed)
        algorithm = "KMeans"
    model.fit(fit_rows)
    centroids = model.cluster_centers_.astype(np.float32)
    logger.info("%s k=%d fitted on %d of %d rows x %d dims in %d iterations (%.1f s)", algorithm,
                n_clusters, fit_rows.shape[0], n_rows, dims, model.n_iter_,
                time.perf_counter() - started)

    labels, distances = assign_to_centroids(embeddings, centroids, scaler_mean, scaler_scale,
                                            config.assign_chunk_rows, progress=progress, rows=rows)
    cluster_sizes = np.bincount(labels, minlength=n_clusters).astype(np.int64)
    silhouette = _subsample_silhouette(embeddings, labels, scaler_mean, scaler_scale,
                                       config.silhouette_subsample, config.seed, rows)
    return ClusterResult(labels=labels, distances=distances, centroids=centroids,
                         scaler_mean=scaler_mean, scaler_scale=scaler_scale,
                         cluster_sizes=cluster_sizes, fit_indices=fit_indices,
                         inertia=float(model.inertia_), silhouette=silhouette,
                         n_iter=int(model.n_iter_), config=config)


def _subsample_silhouette(embeddings: np.ndarray, labels: np.ndarray, scaler_mean: np.ndarray,
                          scaler_scale: np.ndarray, size: int, seed: int,
                          rows: np.ndarray | None = None) -> float:
    """Mean silhouette (Euclidean, standardised space) on `size` random (chosen) rows; NaN when undefined."""
    # A different stream from the fit subsample's, so the score is not taken on the fitted rows only.
    positions = subsample_indices(len(labels), size, seed + 1)
    sample_labels = labels[positions]
    n_labels = len(np.unique(sample_labels))
    if not 2 <= n_labels <= positions.size - 1:
        return float("nan")
    sample = _standardize(_chosen(embeddings, rows, positions), scaler_mean, scaler_scale)
    return float(silhouette_score(sample, sample_labels, metric="euclidean"))


def umap_2d(embeddings: np.ndarray, config: ClusterConfig | None = None) -> np.ndarray:
    """A 2-D UMAP map of the standardised embedding: (N, 2) float32.

    UMAP (and the scaler) are fitted on `config.umap_subsample` random rows
    (`subsample_indices`); when N is larger, the remaining rows are placed with
    `UMAP.transform`, which embeds new points against the fitted neighbour graph without moving
    the fitted ones. That bounds the fit's time and memory at archive scale, at a price: in
    benchmarks/cluster.py (50k x 384 Gaussian mixture, a busy 2-core machine) fitting 10k rows
    and transforming 40k took 23 s against 24-32 s for fitting all 50k, but the share of a
    row's 10 map neighbours from its own mixture component fell from 1.00 to 0.70 (0.64 for
    the transformed rows). So subsample only beyond what a full fit can afford, and prefer the
    fitted rows for figures that show fine structure.
    With `umap_deterministic` the map is seeded and umap-learn runs single-threaded (the same
    map on every run on one machine); otherwise it uses all cores, unseeded, and the layout
    differs from run to run (on a busy 2-core machine it was not faster).
    """
    import umap  # numba compiles on first import (seconds): only pay that when a map is asked for

    config = config or ClusterConfig()
    embeddings = _check_embeddings(embeddings)
    n_rows = embeddings.shape[0]
    if n_rows < 3:
        raise ValueError(f"UMAP needs at least 3 rows, got {n_rows}")
    fit_indices = subsample_indices(n_rows, config.umap_subsample, config.seed)
    fit_rows = np.asarray(embeddings[fit_indices], dtype=np.float32)
    scaler_mean, scaler_scale = _fit_scaler(fit_rows, config.standardize)
    fit_rows = _standardize(fit_rows, scaler_mean, scaler_scale)

    n_neighbors = min(config.umap_n_neighbors, fit_rows.shape[0] - 1)
    if n_neighbors < config.umap_n_neighbors:
        logger.warning("umap_n_neighbors %d clipped to %d (only %d fit rows)",
                       config.umap_n_neighbors, n_neighbors, fit_rows.shape[0])
    seeded = {"random_state": config.seed, "n_jobs": 1} if config.umap_deterministic else {"n_jobs": -1}
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=config.umap_min_dist,
                        metric=config.umap_metric, transform_seed=config.seed, **seeded)
    started = time.perf_counter()
    coordinates = np.empty((n_rows, 2), dtype=np.float32)
    coordinates[fit_indices] = reducer.fit_transform(fit_rows)
    logger.info("UMAP fitted on %d of %d rows (%.1f s)", fit_indices.size, n_rows,
                time.perf_counter() - started)

    rest = np.setdiff1d(np.arange(n_rows), fit_indices, assume_unique=True)
    chunks = list(_chunks(rest.size, config.assign_chunk_rows))
    for start, stop in tqdm(chunks, desc="UMAP transform", unit="chunk", disable=len(chunks) < 2):
        rows = rest[start:stop]
        coordinates[rows] = reducer.transform(_standardize(embeddings[rows], scaler_mean, scaler_scale))
    return coordinates
