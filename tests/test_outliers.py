"""Tests of the outlier ranking: known answers on hand-made embeddings (a planted outlier ranks
first, distances to the nearest other tiles, chunking and memory maps change nothing, the
reference subsample) and precision@k on a known ranking."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from soundscape_ssl.analysis.outliers import (OutlierConfig, outlier_scores, planted_rare_tiles,
                                              precision_at_k, read_outliers_table, top_outliers_table)


def _clusters_with_outliers(seed: int = 0) -> tuple[np.ndarray, int, tuple[int, int]]:
    """300 rows in three tight groups of 100 (8-D), one lone outlier and a pair of look-alike
    outliers (a group smaller than k); returns (rows, lone outlier row, pair rows)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 5.0
    rows = np.concatenate([c + 0.3 * rng.standard_normal((100, 8)) for c in centres])
    lone = 5.0 * np.eye(8)[5] + 0.3 * rng.standard_normal(8)
    pair = 5.0 * (np.eye(8)[6] + np.eye(8)[7]) / math.sqrt(2) + 0.3 * rng.standard_normal((2, 8))
    embeddings = np.concatenate([rows[:150], lone[None], rows[150:], pair]).astype(np.float32)
    return embeddings, 150, (301, 302)


def test_a_planted_outlier_ranks_first_and_a_small_group_next() -> None:
    embeddings, lone, pair = _clusters_with_outliers()
    result = outlier_scores(embeddings, OutlierConfig(n_neighbors=5), show_progress=False)
    assert result.ranking[0] == lone
    assert set(result.ranking[1:3]) == set(pair)   # two look-alikes, k = 5: still outliers
    assert result.reference_size == len(embeddings)
    assert sorted(result.ranking.tolist()) == list(range(len(embeddings)))
    assert np.all(np.diff(result.scores[result.ranking]) <= 0)


def test_scores_are_mean_cosine_distances_to_the_nearest_other_rows() -> None:
    angles_deg = np.array([0.0, 10.0, 20.0, 90.0])
    rows = np.stack([np.cos(np.radians(angles_deg)), np.sin(np.radians(angles_deg))], axis=1) * [[1], [2], [3], [0.5]]
    result = outlier_scores(rows, OutlierConfig(n_neighbors=1, standardize=False), show_progress=False)
    d10, d70 = 1 - math.cos(math.radians(10)), 1 - math.cos(math.radians(70))
    # k = 1: each row's nearest *other* row (itself, at distance 0, never counts); lengths do not matter.
    assert result.scores == pytest.approx([d10, d10, d10, d70], abs=1e-6)
    result2 = outlier_scores(rows, OutlierConfig(n_neighbors=2, standardize=False), show_progress=False)
    d20 = 1 - math.cos(math.radians(20))
    assert result2.scores == pytest.approx([(d10 + d20) / 2, d10, (d10 + d20) / 2,
                                            (d70 + 1 - math.cos(math.radians(80))) / 2], abs=1e-6)
    assert result.ranking.tolist() == [3, 0, 1, 2]   # ties broken by the lower row


def test_an_exact_duplicate_is_a_neighbour_at_distance_zero() -> None:
    rows = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    result = outlier_scores(rows, OutlierConfig(n_neighbors=1, standardize=False), show_progress=False)
    assert result.scores[:2] == pytest.approx([0.0, 0.0], abs=1e-7)
    assert result.scores[2] == pytest.approx(0.2, abs=1e-6)   # 1 - cos to (0.6, 0.8)


def test_chunked_and_memory_mapped_equal_unchunked(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((500, 16)).astype(np.float32)
    whole = outlier_scores(embeddings, OutlierConfig(chunk_rows=10_000), show_progress=False)
    path = tmp_path / "embeddings.npy"
    np.save(path, embeddings)
    mapped = np.load(path, mmap_mode="r")
    chunked = outlier_scores(mapped, OutlierConfig(chunk_rows=37), show_progress=False)
    np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-5, atol=1e-6)
    assert chunked.ranking[:50].tolist() == whole.ranking[:50].tolist()


def test_reference_subsample_is_seeded_reported_and_searched_without_self() -> None:
    rng = np.random.default_rng(2)
    embeddings = rng.standard_normal((400, 6))
    config = OutlierConfig(n_neighbors=3, reference_cap=100, chunk_rows=64, seed=4, standardize=False)
    result = outlier_scores(embeddings, config, show_progress=False)
    assert result.reference_size == 100 and result.describe()["subsampled"]
    # Known answer by brute force: the seeded reference rows, each row's 3 nearest of them but itself.
    reference = np.sort(np.random.default_rng(4).choice(400, size=100, replace=False))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = 1.0 - unit @ unit[reference].T
    distances[reference, np.arange(100)] = np.inf
    expected = np.sort(distances, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    again = outlier_scores(embeddings, config, show_progress=False)
    np.testing.assert_array_equal(again.scores, result.scores)


def test_bad_input_is_refused_with_one_line() -> None:
    with pytest.raises(ValueError, match="n_neighbors"):
        OutlierConfig(n_neighbors=0)
    with pytest.raises(ValueError, match="more than n_neighbors"):
        outlier_scores(np.ones((5, 3)), OutlierConfig(n_neighbors=5), show_progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        outlier_scores(np.array([[1.0, np.nan]] + [[1.0, 0.0]] * 20), show_progress=False)


def test_precision_at_k_against_base_rate() -> None:
    ranking = np.array([4, 7, 0, 9, 1, 2, 3, 5, 6, 8])
    is_event = np.zeros(10, dtype=bool)
    is_event[[7, 9, 8]] = True
    result = precision_at_k(ranking, is_event, k=4)
    assert result["precision"] == 0.5 and result["hits"] == 2
    assert result["base_rate"] == pytest.approx(0.3)
    assert result["lift"] == pytest.approx(0.5 / 0.3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["best_possible"] == 0.75   # only 3 events: 3 of 4 at best
    assert precision_at_k(ranking, is_event, k=10)["precision"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(ranking, is_event, k=11)
    with pytest.raises(ValueError, match="same length"):
        precision_at_k(ranking, is_event[:5], k=2)


def test_top_outliers_table_names_the_tiles(tmp_path: Path) -> None:
    embeddings, lone, _ = _clusters_with_outliers()
    result = outlier_scores(embeddings, OutlierConfig(n_neighbors=5), show_progress=False)
    index = pd.DataFrame({"relpath": [f"R{i // 20}/f{i // 20}.wav" for i in range(len(embeddings))],
                          "offset_s": [3.0 * (i % 20) for i in range(len(embeddings))],
                          "recorder": [f"R{i % 3}" for i in range(len(embeddings))],
                          "timestamp": pd.Timestamp("2024-05-24 05:00") + pd.to_timedelta(
                              np.arange(len(embeddings)) * 3, unit="s")})
    table = top_outliers_table(result, index, n=3)
    assert table["rank"].tolist() == [1, 2, 3]
    first = table.iloc[0]
    assert (first["tile_id"], first["file"], first["offset_s"], first["recorder"]) == (lone, "R7/f7.wav", 30.0, "R0")
    assert first["score"] == pytest.approx(result.scores[lone])
    table.to_csv(tmp_path / "outliers.csv", index=False)
    assert read_outliers_table(tmp_path / "outliers.csv")["tile_id"].tolist() == table["tile_id"].tolist()
    with pytest.raises(ValueError, match="different tile stores"):
        top_outliers_table(result, index.iloc[:10])


def test_planted_rare_tiles_follow_the_ground_truth_rules() -> None:
    annotations = pd.DataFrame({
        "file": ["a.wav", "a.wav", "a.wav", "b.wav"], "start_s": [1.0, 5.9, 7.0, 0.5], "end_s": [2.0, 6.5, 7.5, 2.5],
        "f_low_hz": [100.0] * 4, "f_high_hz": [9000.0] * 4, "label": ["gunshot", "chainsaw", "whistler", "bellbird"],
        "kind": ["anthropogenic", "anthropogenic", "bird", "rare_bird"], "snr_db": [20.0, 20.0, 20.0, -10.0]})
    tiles = pd.DataFrame({"relpath": ["a.wav"] * 3 + ["b.wav"], "offset_s": [0.0, 3.0, 6.0, 0.0]})
    # gunshot in tile 0; chainsaw: 0.1 s in tile 1 (too little), 0.5 s in tile 2; b's bellbird is inaudible.
    assert planted_rare_tiles(annotations, tiles, tile_s=3.0).tolist() == [True, False, True, False]
