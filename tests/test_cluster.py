"""KMeans on a subsample of the standardised embedding, assignment of all rows, galleries, UMAP."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from soundscape_ssl.analysis.cluster import ClusterConfig, ClusterResult, assign_to_centroids, fit_clusters, umap_2d


def gaussian_blobs(n_rows: int, n_blobs: int, dims: int, seed: int = 0,
                   spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated blobs: centres 20 units apart on average, unit noise; dims on unequal scales."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(n_blobs, dims))
    truth = rng.integers(0, n_blobs, size=n_rows)
    points = centres[truth] + rng.normal(0, spread, size=(n_rows, dims))
    points *= rng.uniform(0.5, 50, size=dims)  # unequal units: standardisation has work to do
    return points.astype(np.float32), truth


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return gaussian_blobs(6000, n_blobs=8, dims=32)


@pytest.fixture(scope="module")
def fitted(blobs) -> ClusterResult:
    embeddings, _ = blobs
    config = ClusterConfig(n_clusters=8, fit_subsample=1000, seed=3, n_init=2,
                           assign_chunk_rows=700, silhouette_subsample=2000)
    return fit_clusters(embeddings, config, progress=False)


def test_kmeans_on_a_subsample_recovers_planted_blobs(blobs, fitted):
    embeddings, truth = blobs
    assert fitted.labels.shape == (6000,) and fitted.distances.shape == (6000,)
    assert fitted.fit_indices.size == 1000 and len(np.unique(fitted.fit_indices)) == 1000
    assert normalized_mutual_info_score(truth, fitted.labels) > 0.95
    assert fitted.cluster_sizes.sum() == 6000
    np.testing.assert_array_equal(fitted.cluster_sizes, np.bincount(fitted.labels, minlength=8))
    # full-dimensional, standardised: centroids have the embedding's 32 dims, the scaler is the
    # subsample's mean and (population) standard deviation
    assert fitted.centroids.shape == (8, 32)
    subsample = embeddings[fitted.fit_indices].astype(np.float64)
    np.testing.assert_allclose(fitted.scaler_mean, subsample.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(fitted.scaler_scale, subsample.std(axis=0), rtol=1e-6)
    assert fitted.silhouette > 0.5


def test_every_row_goes_to_its_nearest_centroid(blobs, fitted):
    embeddings, _ = blobs
    standardized = (embeddings.astype(np.float64) - fitted.scaler_mean) / fitted.scaler_scale
    centroids = fitted.centroids.astype(np.float64)
    all_distances = np.linalg.norm(standardized[:, None, :] - centroids[None], axis=2)
    np.testing.assert_array_equal(fitted.labels, all_distances.argmin(axis=1))
    np.testing.assert_allclose(fitted.distances, all_distances.min(axis=1), rtol=1e-5)
    # chunking does not change the answer
    labels, distances = assign_to_centroids(embeddings, fitted.centroids, fitted.scaler_mean,
                                            fitted.scaler_scale, chunk_rows=10_000)
    np.testing.assert_array_equal(labels, fitted.labels)
    np.testing.assert_allclose(distances, fitted.distances, rtol=1e-5)


def test_same_seed_same_clusters(blobs, fitted):
    again = fit_clusters(blobs[0], fitted.config, progress=False)
    np.testing.assert_array_equal(again.labels, fitted.labels)
    np.testing.assert_array_equal(again.fit_indices, fitted.fit_indices)


def test_central_indices_are_the_rows_closest_to_each_centroid(blobs, fitted):
    embeddings, _ = blobs
    central = fitted.central_indices(5)
    assert sorted(central) == list(range(8))
    standardized = fitted.standardize(embeddings).astype(np.float64)
    for cluster, rows in central.items():
        members = np.flatnonzero(fitted.labels == cluster)
        distance = np.linalg.norm(standardized[members] - fitted.centroids[cluster], axis=1)
        expected = members[np.argsort(distance, kind="stable")[:5]]
        np.testing.assert_array_equal(rows, expected)
    # a cluster smaller than k gives all of its rows
    everything = fitted.central_indices(10_000)
    assert sum(len(rows) for rows in everything.values()) == 6000


def test_too_few_rows_clip_the_number_of_clusters(caplog):
    embeddings = np.arange(10, dtype=np.float32).reshape(5, 2)
    with caplog.at_level(logging.WARNING, logger="soundscape_ssl.analysis.cluster"):
        result = fit_clusters(embeddings, ClusterConfig(n_clusters=100, seed=0), progress=False)
    assert result.n_clusters == 5
    assert "100 clusters requested" in caplog.text
    assert sorted(result.labels.tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(result.distances, 0, atol=1e-5)


def test_bad_embeddings_are_refused():
    embeddings = np.ones((20, 4), dtype=np.float32)
    embeddings[7, 2] = np.nan
    with pytest.raises(ValueError, match="1 of 20 embedding rows contain NaN.*row 7"):
        fit_clusters(embeddings, ClusterConfig(n_clusters=2), progress=False)
    with pytest.raises(ValueError, match="2-D"):
        fit_clusters(np.ones(5, dtype=np.float32), ClusterConfig(n_clusters=2), progress=False)


def test_save_load_round_trip(tmp_path, fitted):
    folder = fitted.save(tmp_path / "clusters")
    payload = json.loads((folder / "config.json").read_text())
    assert payload["stage"] == "cluster" and payload["n_clusters"] == 8 and payload["n_rows"] == 6000
    loaded = ClusterResult.load(folder)
    for name in ("labels", "distances", "centroids", "scaler_mean", "scaler_scale",
                 "cluster_sizes", "fit_indices"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name), err_msg=name)
    assert loaded.config == fitted.config
    assert loaded.inertia == fitted.inertia and loaded.silhouette == fitted.silhouette
    assert loaded.central_indices(3).keys() == fitted.central_indices(3).keys()


def test_config_round_trip_refuses_unknown_keys():
    config = ClusterConfig(n_clusters=7, umap_subsample=None)
    assert ClusterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_cluster"):
        ClusterConfig.from_dict({"n_cluster": 3})


@pytest.mark.slow  # numba compiles umap-learn's kernels on first use: ~20 s on one core
def test_umap_map_is_deterministic_and_keeps_blobs_apart():
    embeddings, truth = gaussian_blobs(300, n_blobs=3, dims=16, seed=1)
    config = ClusterConfig(umap_subsample=200, umap_n_neighbors=10, seed=0)
    first = umap_2d(embeddings, config)
    assert first.shape == (300, 2) and first.dtype == np.float32 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, umap_2d(embeddings, config))
    # every point's nearest neighbour in the map (fitted or transformed) is from its own blob
    distance = np.linalg.norm(first[:, None] - first[None], axis=2)
    np.fill_diagonal(distance, np.inf)
    assert (truth[distance.argmin(axis=1)] == truth).mean() > 0.98


def test_streamed_from_a_memory_map_and_in_chunks_equals_in_memory(tmp_path, blobs):
    """Bounded memory changes nothing: fitting on a read-only memory map with tiny assignment
    chunks gives the same model, labels and distances as one big in-memory chunk."""
    embeddings, _ = blobs
    path = tmp_path / "embeddings.npy"
    np.save(path, embeddings)
    mapped = np.load(path, mmap_mode="r")
    whole = ClusterConfig(n_clusters=8, fit_subsample=1000, seed=3, n_init=2,
                          assign_chunk_rows=len(embeddings), silhouette_subsample=2000)
    chunked = ClusterConfig(**{**whole.to_dict(), "assign_chunk_rows": 97})
    in_memory = fit_clusters(embeddings, whole, progress=False)
    streamed = fit_clusters(mapped, chunked, progress=False)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(streamed.labels, in_memory.labels)
    np.testing.assert_array_equal(streamed.distances, in_memory.distances)
    np.testing.assert_array_equal(streamed.centroids, in_memory.centroids)
    assert streamed.silhouette == in_memory.silhouette


def test_chosen_rows_cluster_as_if_they_were_copied_out(tmp_path, blobs):
    """`rows` reads a subset where it lies: the same result as clustering embeddings[rows]."""
    embeddings, _ = blobs
    path = tmp_path / "embeddings.npy"
    np.save(path, embeddings)
    mask = np.random.default_rng(5).random(len(embeddings)) < 0.6
    config = ClusterConfig(n_clusters=8, fit_subsample=1000, seed=3, n_init=2, assign_chunk_rows=333,
                           silhouette_subsample=1500)
    copied = fit_clusters(embeddings[mask], config, progress=False)
    for rows in (mask, np.flatnonzero(mask)):
        chosen = fit_clusters(np.load(path, mmap_mode="r"), config, progress=False, rows=rows)
        np.testing.assert_array_equal(chosen.labels, copied.labels)
        np.testing.assert_array_equal(chosen.distances, copied.distances)
        np.testing.assert_array_equal(chosen.fit_indices, copied.fit_indices)
        assert chosen.silhouette == copied.silhouette
    bad = embeddings.copy()
    bad[np.flatnonzero(~mask)[0]] = np.nan   # a NaN outside the chosen rows does not matter ...
    assert fit_clusters(bad, config, progress=False, rows=mask).labels.shape == (mask.sum(),)
    bad[np.flatnonzero(mask)[3]] = np.nan    # ... one inside does, named by its row
    with pytest.raises(ValueError, match=f"row {np.flatnonzero(mask)[3]}"):
        fit_clusters(bad, config, progress=False, rows=mask)
