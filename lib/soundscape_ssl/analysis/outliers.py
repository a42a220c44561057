"""Outliers of an output space: the tiles that lie far from every other tile.

An ornithologist with a million unlabelled tiles cannot listen to them all, but can listen to the
few hundred that resemble nothing else: a rare species, a chainsaw, a gunshot, a broken
microphone. `outlier_scores` ranks every tile of an (N, D) embedding by its **mean cosine
distance to its k nearest neighbours** (scikit-learn's `NearestNeighbors`, brute force).

Why the mean over the k nearest, not the k-th distance alone: a rare event seldom comes alone.
The same gunshot spans two adjacent tiles, a rare bird calls a few times, and each copy is the
others' nearest neighbour. The k-th distance is set by one neighbour and so jumps with the exact
size of such a small group; the mean over k moves smoothly and stays large as long as the group
is smaller than k (k = 10 by default: a group of up to about ten look-alike tiles is still
"rare"). A common sound has many more than k close copies, so its mean stays small.

Why cosine after standardising each dimension (mean and scale from the reference set): the
spaces differ in scale (log-mel statistics are dB values near -60, SSL features are centred), and
the clustering of notebook 04 standardises too; cosine then compares what a tile holds, not how
far its vector happens to be from the origin.

Memory is bounded at millions of tiles. Queries are read from the (memory-mapped) embedding in
chunks of `chunk_rows`, and scikit-learn computes their distances to the reference in blocks of
at most `working_memory_mb`; the reference set the neighbours are searched in is held in memory, so
above `reference_cap` rows it is a seeded random subsample (`cluster.subsample_indices`, sorted,
so the memory map is read forwards), and the result reports its size. The trade-off: against a
subsample holding a fraction f of the tiles, a tile's k nearest reference neighbours are about
its k/f nearest in the whole set, so scores of common tiles get smoother and small groups of
rare tiles (which then have about f times as many copies in the reference) stand out a little
more; a tile whose only look-alikes were left out of the reference scores higher than it would
against everything. Cost is N x reference rows x D multiply-adds: at 1M tiles, 100k reference
rows and 384 dims about 4e13, hours on a laptop CPU and minutes on a GPU-sized BLAS.

A tile never counts as its own neighbour (its own row in the reference is dropped); an exact
duplicate of it elsewhere does count, at distance 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .cluster import _check_embeddings, subsample_indices

logger = logging.getLogger(__name__)

OUTLIERS_FILE = "outliers.csv"
TABLE_COLUMNS = ["rank", "tile_id", "file", "offset_s", "recorder", "timestamp", "score"]


@dataclass(frozen=True)
class OutlierConfig:
    """How tiles are scored."""

    n_neighbors: int = 10          # k: the score is the mean cosine distance to the k nearest other tiles
    reference_cap: int = 100_000   # neighbours are searched among at most this many tiles (seeded subsample)
    chunk_rows: int = 4096         # query tiles read from the embedding per chunk (bounds memory)
    working_memory_mb: int = 256   # scikit-learn's bound on one block of query x reference distances
    standardize: bool = True       # z-score each dimension (reference statistics) before cosine
    seed: int = 0                  # the reference subsample

    def __post_init__(self) -> None:
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        if self.reference_cap <= self.n_neighbors:
            raise ValueError(f"reference_cap must exceed n_neighbors={self.n_neighbors}, got {self.reference_cap}")
        if self.chunk_rows < 1 or self.working_memory_mb < 1:
            raise ValueError(f"chunk_rows and working_memory_mb must be >= 1, got {self.chunk_rows} "
                             f"and {self.working_memory_mb}")


@dataclass
class OutlierResult:
    """Every tile's score and the ranking, most outlying first."""

    scores: np.ndarray             # (N,) mean cosine distance to the k nearest other tiles
    ranking: np.ndarray            # (N,) tile indices by descending score (ties: lower index first)
    reference_size: int            # rows the neighbours were searched among (N, or the subsample)
    config: OutlierConfig

    @property
    def n_rows(self) -> int:
        return int(self.scores.shape[0])

    def describe(self) -> dict[str, Any]:
        return {"n_rows": self.n_rows, "reference_size": self.reference_size,
                "subsampled": self.reference_size < self.n_rows, **dataclasses.asdict(self.config)}


def _prepare(rows: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None) -> np.ndarray:
    """Standardised (when mean is given), unit-length float32 rows; a zero row stays zero."""
    rows = np.asarray(rows, dtype=np.float64)
    if mean is not None:
        rows = (rows - mean) / scale
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def outlier_scores(embeddings: np.ndarray, config: OutlierConfig | None = None,
                   show_progress: bool = True) -> OutlierResult:
    """Score every row of `embeddings` (an array or a read-only memory map, (N, D)) by its mean
    cosine distance to its `n_neighbors` nearest other rows (module docstring)."""
    from sklearn import config_context
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    config = config or OutlierConfig()
    embeddings = _check_embeddings(embeddings, config.chunk_rows)
    n_rows = embeddings.shape[0]
    if n_rows <= config.n_neighbors:
        raise ValueError(f"need more than n_neighbors={config.n_neighbors} rows to score outliers, got {n_rows}")
    reference_rows = subsample_indices(n_rows, config.reference_cap, config.seed)
    reference = np.asarray(embeddings[reference_rows], dtype=np.float64)
    mean = scale = None
    if config.standardize:
        scaler = StandardScaler().fit(reference)
        mean, scale = scaler.mean_, scaler.scale_
    # Unit rows: cosine distance is then 1 - dot product, and brute force is one matrix product.
    neighbours = NearestNeighbors(metric="cosine", algorithm="brute").fit(_prepare(reference, mean, scale))
    del reference
    # Where tile i sits in the reference (-1 when it was not drawn): its own row is skipped.
    position = np.full(n_rows, -1, dtype=np.int64)
    position[reference_rows] = np.arange(reference_rows.size)
    k = config.n_neighbors
    scores = np.empty(n_rows, dtype=np.float64)
    starts = range(0, n_rows, config.chunk_rows)
    for start in tqdm(starts, desc="outlier scores", unit="chunk", disable=not show_progress):
        stop = min(n_rows, start + config.chunk_rows)
        query = _prepare(embeddings[start:stop], mean, scale)
        with config_context(working_memory=config.working_memory_mb):
            distances, found = neighbours.kneighbors(query, n_neighbors=k + 1)
        is_self = found == position[start:stop, None]
        # Keep k of the k + 1: drop the tile itself where it was found, else the farthest.
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(found, dtype=bool)
        keep[np.arange(stop - start), drop] = False
        # Clip float noise: cosine distances of unit vectors lie in [0, 2].
        scores[start:stop] = np.clip(distances[keep].reshape(stop - start, k), 0.0, 2.0).mean(axis=1)
    ranking = np.lexsort((np.arange(n_rows), -scores))
    logger.info("outlier scores of %d tiles against %d reference tiles (k=%d)", n_rows, reference_rows.size, k)
    return OutlierResult(scores=scores, ranking=ranking, reference_size=int(reference_rows.size), config=config)


def precision_at_k(ranking: np.ndarray, is_event: np.ndarray, k: int = 50) -> dict[str, float | int]:
    """How many of the top `k` of `ranking` are events, against chance.

    Returns precision (events among the top k / k), base_rate (events / all tiles: the expected
    precision of a random ranking), lift (precision / base_rate), n_events, and best_possible
    (min(n_events, k) / k: with fewer events than k no ranking reaches 1), and recall (events in
    the top k / n_events).
    """
    ranking = np.asarray(ranking)
    is_event = np.asarray(is_event, dtype=bool)
    if ranking.ndim != 1 or is_event.ndim != 1 or ranking.size != is_event.size:
        raise ValueError(f"ranking and is_event must be 1-D of the same length, got {ranking.shape} and {is_event.shape}")
    if not 1 <= k <= ranking.size:
        raise ValueError(f"k must be in [1, {ranking.size}], got {k}")
    n_events = int(is_event.sum())
    hits = int(is_event[ranking[:k]].sum())
    base_rate = n_events / is_event.size
    precision = hits / k
    return {"k": k, "precision": precision, "base_rate": base_rate,
            "lift": precision / base_rate if base_rate > 0 else float("nan"), "n_events": n_events,
            "hits": hits, "recall": hits / n_events if n_events else float("nan"),
            "best_possible": min(n_events, k) / k}


def top_outliers_table(result: OutlierResult, index: pd.DataFrame, n: int = 50) -> pd.DataFrame:
    """The `n` most outlying tiles: rank (1 = most outlying), tile_id (row of the embedding),
    file (relpath), offset_s, recorder, timestamp (NaT without one) and score."""
    if len(index) != result.n_rows:
        raise ValueError(f"the tile index has {len(index)} rows, the outlier scores {result.n_rows}: "
                         "they are from different tile stores")
    top = result.ranking[:n]
    rows = index.reset_index(drop=True).iloc[top]
    timestamps = rows["timestamp"] if "timestamp" in rows else pd.Series(pd.NaT, index=rows.index)
    return pd.DataFrame({
        "rank": np.arange(1, top.size + 1), "tile_id": top.astype(np.int64),
        "file": rows["relpath"].astype(str).to_numpy(), "offset_s": rows["offset_s"].to_numpy(dtype=float),
        "recorder": rows["recorder"].astype(str).to_numpy(), "timestamp": timestamps.to_numpy(),
        "score": result.scores[top]}, columns=TABLE_COLUMNS)


def read_outliers_table(path: str | os.PathLike) -> pd.DataFrame:
    """An `outliers.csv` written by notebook 04, checked for its columns."""
    table = pd.read_csv(Path(path))
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} of an outliers table")
    return table


def planted_rare_tiles(annotations: pd.DataFrame, tiles: pd.DataFrame, tile_s: float) -> np.ndarray:
    """Per tile: does a planted rare event (the synthetic archive's `RARE_LABELS`) count in it
    (the ground-truth rules: audible and enough of it inside the tile)?"""
    from ..recordings.groundtruth import tile_label_overlaps
    from ..recordings.synth import RARE_LABELS

    overlaps = tile_label_overlaps(annotations, tiles, tile_s, labels=RARE_LABELS)
    return (overlaps.to_numpy() > 0).any(axis=1)
