"""Baseline output spaces computed straight from log-mel tiles, no learning beyond PCA.

An SSL embedding is only interesting if it beats these:

- `logmel_stats_features`: per mel band, the mean and the standard deviation over time of the
  tile's dB values (2 x n_mels features), optionally also of their time derivatives (deltas,
  4 x n_mels). The DESIGN's measured baseline: kNN 0.57 on four congeneric warblers.
- `fit_tile_pca` + `tile_pca_features`: principal components of the flattened raw tiles
  (n_mels x n_frames values), fitted by randomized SVD on a random subsample.

Tiles are read in batches, so any of these work on a memory-mapped store: `tiles` is an array
(N, n_mels, n_frames) in dB (float16 or float32, a `np.load(mmap_mode="r")` map included) or a
`soundscape_ssl.tiles.store.TileStore` (anything with `__len__`, `__getitem__(i)` and
`read_range(start, stop)`). Every batch is converted to float32 before arithmetic: float16
sums over 256 frames would lose ~0.1 dB.

The features themselves are (N, D): given an `out_path` (or `compute_baselines(out_dir=...)`),
they are written batch by batch into a `.npy` file (`core.stage.atomic_npy_memmap`) and returned
memory-mapped, so memory stays bounded by the batch whatever N is; without one they are an
in-memory array (small stores, tests). Both give the same values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from ..core.stage import atomic_npy_memmap

logger = logging.getLogger(__name__)


@dataclass
class BaselineConfig:
    """Which baseline output spaces `compute_baselines` makes, and how. Serialisable."""

    logmel_stats: bool = True
    with_deltas: bool = False          # add mean/std of time deltas (4 x n_mels features)
    delta_width_frames: int = 2        # half-width N of the regression delta (HTK style)
    pca: bool = True
    pca_n_components: int = 64
    pca_fit_subsample: int | None = 10_000   # tiles PCA is fitted on; None = all
    batch_tiles: int = 512             # tiles read and processed at once (512 x 128 x 256 x 4 B = 64 MiB)
    seed: int = 0                      # PCA subsample draw

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- reading tiles

def _n_tiles(tiles: Any) -> int:
    return len(tiles)


def _tile_shape(tiles: Any) -> tuple[int, int]:
    shape = tuple(getattr(tiles, "tile_shape", None) or np.shape(tiles)[1:])
    if len(shape) != 2:
        raise ValueError(f"tiles must be (N, n_mels, n_frames), got tile shape {shape}")
    return int(shape[0]), int(shape[1])


def _read_range(tiles: Any, start: int, stop: int) -> np.ndarray:
    """Tiles [start, stop) as float32 (one contiguous read from a store or a memory map)."""
    reader = getattr(tiles, "read_range", None)
    batch = reader(start, stop) if callable(reader) else tiles[start:stop]
    return np.asarray(batch, dtype=np.float32)


def _read_rows(tiles: Any, rows: np.ndarray) -> np.ndarray:
    """Tiles at the given (sorted) rows as float32."""
    if isinstance(tiles, np.ndarray):
        return np.asarray(tiles[rows], dtype=np.float32)
    reader = getattr(tiles, "read_rows", None)   # a TileStore: shard by shard, no shard left mapped
    if callable(reader):
        return np.asarray(reader(rows), dtype=np.float32)
    return np.stack([np.asarray(tiles[int(row)], dtype=np.float32) for row in rows])


def iter_tile_batches(tiles: Any, batch_tiles: int = 512, desc: str | None = None
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """(start_row, float32 batch) over all tiles in order, with a progress bar when desc is set."""
    if batch_tiles < 1:
        raise ValueError(f"batch_tiles must be >= 1, got {batch_tiles}")
    n_tiles = _n_tiles(tiles)
    starts = range(0, n_tiles, batch_tiles)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None or len(starts) < 2):
        yield start, _read_range(tiles, start, min(n_tiles, start + batch_tiles))


@contextlib.contextmanager
def _features_out(out_path: str | os.PathLike | None, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """Where features are written: an in-memory float32 array, or a .npy file at out_path."""
    if out_path is None:
        yield np.empty(shape, dtype=np.float32)
    else:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_npy_memmap(out_path, shape, np.float32) as out:
            yield out


def _features_result(out_path: str | os.PathLike | None, features: np.ndarray) -> np.ndarray:
    return features if out_path is None else np.load(out_path, mmap_mode="r")


def _warn_non_finite(n_bad: int, n_tiles: int, what: str) -> None:
    if n_bad:
        logger.warning("%d of %d tiles contain NaN or inf: their %s rows are NaN", n_bad, n_tiles, what)


# --------------------------------------------------------------------------- log-mel statistics

def time_deltas(batch: np.ndarray, width_frames: int = 2) -> np.ndarray:
    """Regression deltas along the last (time) axis, HTK style, edges padded by repetition.

    d_t = sum_{n=1..N} n (c_{t+n} - c_{t-n}) / (2 sum_{n=1..N} n^2), in dB per frame.
    """
    if width_frames < 1:
        raise ValueError(f"width_frames must be >= 1, got {width_frames}")
    n_frames = batch.shape[-1]
    padded = np.pad(batch, [(0, 0)] * (batch.ndim - 1) + [(width_frames, width_frames)], mode="edge")
    deltas = np.zeros_like(batch, dtype=np.float32)
    for n in range(1, width_frames + 1):
        ahead = padded[..., width_frames + n:width_frames + n + n_frames]
        behind = padded[..., width_frames - n:width_frames - n + n_frames]
        deltas += n * (ahead - behind)
    return deltas / (2 * sum(n * n for n in range(1, width_frames + 1)))


def logmel_stats_feature_names(n_mels: int, with_deltas: bool = False) -> list[str]:
    """Column names matching `logmel_stats_features`: mel_mean_000 ... [delta_std_127]."""
    blocks = ["mel_mean", "mel_std"] + (["delta_mean", "delta_std"] if with_deltas else [])
    return [f"{block}_{band:03d}" for block in blocks for band in range(n_mels)]


def logmel_stats_features(tiles: Any, with_deltas: bool = False, delta_width_frames: int = 2,
                          batch_tiles: int = 512, progress: bool = True,
                          out_path: str | os.PathLike | None = None) -> np.ndarray:
    """Per mel band, mean and std (population, over time) of each tile's dB values: (N, 2 n_mels).

    With deltas, the mean and std of `time_deltas` follow: (N, 4 n_mels). Column order:
    `logmel_stats_feature_names`. float32. A tile with NaN/inf values gives a NaN row (logged),
    so rows stay aligned with the tile index. With `out_path`, written there batch by batch and
    returned memory-mapped.
    """
    n_tiles = _n_tiles(tiles)
    n_mels, _ = _tile_shape(tiles)
    n_features = (4 if with_deltas else 2) * n_mels
    n_bad = 0
    with _features_out(out_path, (n_tiles, n_features)) as features:
        for start, batch in iter_tile_batches(tiles, batch_tiles, "log-mel statistics" if progress else None):
            stop = start + batch.shape[0]
            block = np.empty((batch.shape[0], n_features), dtype=np.float32)
            block[:, :n_mels] = batch.mean(axis=2)
            block[:, n_mels:2 * n_mels] = batch.std(axis=2)
            if with_deltas:
                deltas = time_deltas(batch, delta_width_frames)
                block[:, 2 * n_mels:3 * n_mels] = deltas.mean(axis=2)
                block[:, 3 * n_mels:] = deltas.std(axis=2)
            bad = ~np.isfinite(batch).all(axis=(1, 2))
            block[bad] = np.nan
            features[start:stop] = block
            n_bad += int(bad.sum())
    _warn_non_finite(n_bad, n_tiles, "log-mel statistics")
    return _features_result(out_path, features)


# --------------------------------------------------------------------------- PCA of raw tiles

def fit_tile_pca(tiles: Any, n_components: int = 64, fit_subsample: int | None = 10_000,
                 batch_tiles: int = 512, seed: int = 0, progress: bool = True) -> PCA:
    """PCA of flattened tiles (n_mels x n_frames values), fitted on a random subsample.

    Randomized SVD (Halko et al.) on the subsample held in memory as float32: 10k tiles of
    128 x 256 are 1.3 GB, and the fit takes seconds. IncrementalPCA, which holds one batch at a
    time, was measured 100x slower here (271 s against ~3 s for 2880 tiles on 2 cores): each
    partial fit is a full SVD of a (batch + components) x 32768 matrix. The subsample bounds the
    memory; the transform streams in batches. Tiles with NaN/inf are left out (logged).
    Centred, not whitened.
    """
    n_tiles = _n_tiles(tiles)
    n_mels, n_frames = _tile_shape(tiles)
    if n_components < 1 or n_components > n_mels * n_frames:
        raise ValueError(f"n_components must be in 1..{n_mels * n_frames}, got {n_components}")
    if fit_subsample is None or fit_subsample >= n_tiles:
        rows = np.arange(n_tiles)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n_tiles, size=fit_subsample, replace=False))
    if rows.size < n_components:
        raise ValueError(f"PCA with {n_components} components needs at least {n_components} "
                         f"fit tiles, got {rows.size}")
    sample = np.empty((rows.size, n_mels * n_frames), dtype=np.float32)
    batches = [(start, min(start + batch_tiles, rows.size)) for start in range(0, rows.size, batch_tiles)]
    for start, stop in tqdm(batches, desc="PCA fit tiles", unit="batch", disable=not progress or len(batches) < 2):
        sample[start:stop] = _read_rows(tiles, rows[start:stop]).reshape(stop - start, -1)
    finite = np.isfinite(sample).all(axis=1)
    if not finite.all():
        logger.warning("%d of %d PCA fit tiles contain NaN or inf and were left out", int((~finite).sum()), rows.size)
        sample = sample[finite]
    if sample.shape[0] < n_components:
        raise ValueError(f"only {sample.shape[0]} finite fit tiles for {n_components} components")
    pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(sample)
    logger.info("tile PCA: %d components explain %.1f%% of the variance of %d tiles", n_components,
                100 * float(pca.explained_variance_ratio_.sum()), sample.shape[0])
    return pca


def tile_pca_features(tiles: Any, pca: PCA, batch_tiles: int = 512,
                      progress: bool = True, out_path: str | os.PathLike | None = None) -> np.ndarray:
    """Project every tile onto a fitted tile PCA: (N, n_components) float32, in tile order.
    With `out_path`, written there batch by batch and returned memory-mapped."""
    n_tiles = _n_tiles(tiles)
    n_mels, n_frames = _tile_shape(tiles)
    if n_mels * n_frames != pca.components_.shape[1]:
        raise ValueError(f"tiles have {n_mels * n_frames} values, the PCA was fitted on "
                         f"{pca.components_.shape[1]}")
    # (x - mean) @ components.T in float32: sklearn's transform would upcast a 64 MiB batch
    mean = pca.mean_.astype(np.float32)
    components_t = np.ascontiguousarray(pca.components_.astype(np.float32).T)
    n_bad = 0
    with _features_out(out_path, (n_tiles, pca.n_components_)) as features:
        for start, batch in iter_tile_batches(tiles, batch_tiles, "PCA transform" if progress else None):
            flat = batch.reshape(batch.shape[0], -1)
            finite = np.isfinite(flat).all(axis=1)
            projected = np.full((flat.shape[0], pca.n_components_), np.nan, dtype=np.float32)
            projected[finite] = (flat[finite] - mean) @ components_t
            features[start:start + flat.shape[0]] = projected
            n_bad += int((~finite).sum())
    _warn_non_finite(n_bad, n_tiles, "PCA")
    return _features_result(out_path, features)


def compute_baselines(tiles: Any, config: BaselineConfig | None = None,
                      progress: bool = True, out_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The baseline output spaces the config asks for, by name: "logmel_stats", "pca<n>".

    With `out_dir`, each is written to `out_dir/<name>.npy` batch by batch and returned
    memory-mapped (memory bounded by `config.batch_tiles` and the PCA fit subsample, not by N);
    the files are rewritten on every call (seconds per thousand tiles)."""
    config = config or BaselineConfig()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)

    def path_of(name: str) -> Path | None:
        return None if out_dir is None else Path(out_dir) / f"{name}.npy"

    spaces: dict[str, np.ndarray] = {}
    if config.logmel_stats:
        name = "logmel_stats_deltas" if config.with_deltas else "logmel_stats"
        spaces[name] = logmel_stats_features(tiles, config.with_deltas, config.delta_width_frames,
                                             config.batch_tiles, progress, out_path=path_of(name))
    if config.pca:
        pca = fit_tile_pca(tiles, config.pca_n_components, config.pca_fit_subsample,
                           config.batch_tiles, config.seed, progress)
        name = f"pca{config.pca_n_components}"
        spaces[name] = tile_pca_features(tiles, pca, config.batch_tiles, progress, out_path=path_of(name))
    return spaces
