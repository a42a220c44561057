"""Baseline output spaces from log-mel tiles: known statistics, streaming, PCA of planted structure."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from soundscape_ssl.analysis.baselines import (BaselineConfig, compute_baselines, fit_tile_pca,
                                      logmel_stats_feature_names, logmel_stats_features,
                                      tile_pca_features, time_deltas)

N_MELS, N_FRAMES = 16, 32


class ToyStore:
    """The reading interface of a TileStore: len, tile_shape, store[i], read_range(start, stop)."""

    def __init__(self, tiles: np.ndarray) -> None:
        self._tiles = tiles
        self.tile_shape = tiles.shape[1:]
        self.range_reads = 0

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self._tiles[i])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        self.range_reads += 1
        return np.array(self._tiles[start:stop])


def random_tiles(n_tiles: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(-60, 8, size=(n_tiles, N_MELS, N_FRAMES))).astype(np.float16)


def test_constant_tile_has_its_level_as_mean_and_zero_spread():
    tiles = np.full((3, N_MELS, N_FRAMES), -42.5, dtype=np.float16)
    features = logmel_stats_features(tiles, with_deltas=True, progress=False)
    assert features.shape == (3, 4 * N_MELS) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, :N_MELS], -42.5)
    np.testing.assert_allclose(features[:, N_MELS:], 0.0, atol=1e-6)


def test_per_band_mean_and_std_are_known():
    # band b: level -b dB plus a +-b/2 square wave over time, so mean -b and std b/2
    bands = np.arange(N_MELS, dtype=np.float32)
    square = np.where(np.arange(N_FRAMES) % 2 == 0, 1.0, -1.0).astype(np.float32)
    tile = -bands[:, None] + (bands / 2)[:, None] * square[None, :]
    features = logmel_stats_features(tile[None], progress=False)
    assert features.shape == (1, 2 * N_MELS)
    np.testing.assert_allclose(features[0, :N_MELS], -bands, atol=1e-5)
    np.testing.assert_allclose(features[0, N_MELS:], bands / 2, atol=1e-5)
    names = logmel_stats_feature_names(N_MELS, with_deltas=True)
    assert len(names) == 4 * N_MELS and names[0] == "mel_mean_000" and names[-1] == "delta_std_015"


def test_regression_deltas_of_a_ramp_are_its_slope():
    ramp = (0.5 * np.arange(N_FRAMES, dtype=np.float32))[None, None, :].repeat(N_MELS, axis=1)
    deltas = time_deltas(ramp, width_frames=2)
    np.testing.assert_allclose(deltas[..., 2:-2], 0.5, atol=1e-6)  # edges see a padded, flat end
    # first frame: padding repeats frame 0, so (1 (c1 - c0) + 2 (c2 - c0)) / 10 = (0.5 + 2) / 10
    np.testing.assert_allclose(deltas[..., 0], 0.25, atol=1e-6)


def test_statistics_stream_over_batches_from_a_memory_map_or_a_store(tmp_path):
    tiles = random_tiles(23)
    np.save(tmp_path / "tiles.npy", tiles)
    mapped = np.load(tmp_path / "tiles.npy", mmap_mode="r")
    whole = logmel_stats_features(tiles, with_deltas=True, batch_tiles=1000, progress=False)
    np.testing.assert_array_equal(logmel_stats_features(mapped, with_deltas=True, batch_tiles=5,
                                                        progress=False), whole)
    store = ToyStore(tiles)
    np.testing.assert_array_equal(logmel_stats_features(store, with_deltas=True, batch_tiles=4,
                                                        progress=False), whole)
    assert store.range_reads == 6  # ceil(23 / 4) contiguous reads, no per-tile access
    # the float16 values, averaged in float32
    np.testing.assert_allclose(whole[:, :N_MELS], tiles.astype(np.float64).mean(axis=2), atol=1e-4)


def test_a_broken_tile_gives_a_nan_row_and_a_warning(caplog):
    tiles = random_tiles(6).astype(np.float32)
    tiles[4, 3, 7] = np.nan
    with caplog.at_level(logging.WARNING, logger="soundscape_ssl.analysis.baselines"):
        features = logmel_stats_features(tiles, batch_tiles=4, progress=False)
    assert np.isnan(features[4]).all() and np.isfinite(np.delete(features, 4, axis=0)).all()
    assert "1 of 6 tiles contain NaN" in caplog.text


def test_pca_on_a_subsample_recovers_planted_rank_two_structure(tmp_path):
    rng = np.random.default_rng(0)
    n_tiles, dims = 400, N_MELS * N_FRAMES
    basis = np.linalg.qr(rng.normal(size=(dims, 2)))[0].T          # two orthonormal patterns
    scores = rng.normal(0, [20.0, 5.0], size=(n_tiles, 2))
    flat = -50.0 + scores @ basis
    tiles = flat.reshape(n_tiles, N_MELS, N_FRAMES).astype(np.float32)
    pca = fit_tile_pca(tiles, n_components=2, fit_subsample=150, batch_tiles=40, seed=0, progress=False)
    assert pca.n_samples_ == 150
    assert pca.explained_variance_ratio_.sum() == pytest.approx(1.0, abs=1e-4)
    # the same plane as the planted patterns (within it the axes may turn a little: the
    # subsample's scores are not exactly uncorrelated), so all principal angles are ~0
    cosines = np.linalg.svd(pca.components_ @ basis.T, compute_uv=False)
    np.testing.assert_allclose(cosines, [1.0, 1.0], atol=1e-5)

    features = tile_pca_features(ToyStore(tiles), pca, batch_tiles=64, progress=False)
    assert features.shape == (n_tiles, 2) and features.dtype == np.float32
    # the projections are an affine map of the planted scores of every tile, fitted or not
    design = np.column_stack([features, np.ones(n_tiles)])
    coefficients = np.linalg.lstsq(design, scores, rcond=None)[0]
    np.testing.assert_allclose(design @ coefficients, scores, atol=1e-2)


def test_pca_needs_enough_tiles():
    with pytest.raises(ValueError, match="at least 8 fit tiles"):
        fit_tile_pca(random_tiles(5), n_components=8, progress=False)


def test_compute_baselines_names_its_spaces():
    tiles = random_tiles(50)
    spaces = compute_baselines(tiles, BaselineConfig(with_deltas=True, pca_n_components=4,
                                                     pca_fit_subsample=30, batch_tiles=16),
                               progress=False)
    assert {name: space.shape for name, space in spaces.items()} == {
        "logmel_stats_deltas": (50, 4 * N_MELS), "pca4": (50, 4)}


def test_baselines_written_to_files_equal_the_in_memory_ones_and_come_back_memory_mapped(tmp_path):
    """Streaming the features into .npy files batch by batch changes no value; the returned
    arrays are memory maps of the files (nothing N x D stays in memory)."""
    tiles = random_tiles(70).astype(np.float32)
    tiles[9, 2, 3] = np.inf                                   # a broken tile stays a NaN row on disk too
    config = BaselineConfig(with_deltas=True, pca_n_components=4, pca_fit_subsample=40, batch_tiles=16)
    in_memory = compute_baselines(tiles, config, progress=False)
    on_disk = compute_baselines(ToyStore(tiles), config, progress=False, out_dir=tmp_path / "baselines")
    assert sorted(on_disk) == sorted(in_memory) == ["logmel_stats_deltas", "pca4"]
    for name, features in on_disk.items():
        assert isinstance(features, np.memmap) and Path(features.filename) == tmp_path / "baselines" / f"{name}.npy"
        np.testing.assert_array_equal(np.asarray(features), in_memory[name])
        assert np.isnan(features[9]).all()
    # the single-feature entry points take an out_path too, and refuse a PCA of another tile shape
    path = tmp_path / "stats.npy"
    np.testing.assert_array_equal(logmel_stats_features(tiles, batch_tiles=7, progress=False, out_path=path),
                                  logmel_stats_features(tiles, batch_tiles=70, progress=False))
    pca = fit_tile_pca(tiles[:, :, :16], n_components=2, progress=False)
    with pytest.raises(ValueError, match="fitted on"):
        tile_pca_features(tiles, pca, progress=False, out_path=tmp_path / "pca.npy")
    assert not (tmp_path / "pca.npy").exists()
