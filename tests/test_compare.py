"""The comparison of output spaces against BirdNET pseudo-labels, on a hand-made archive.

Eight files of four tiles each: recorder R1 holds files 0-3 (grassland), R2 files 4-7 (canopy);
even files start at 05:00, odd ones at 12:00. Files 0, 1, 4, 5 are species A in every tile
(confidence 0.9); files 2, 3, 6, 7 are species B in tiles 0-1 (confidence 0.8, and exactly 0.5
in one tile: the threshold is inclusive) and below the threshold in tiles 2-3 ("none").
So 24 of 32 tiles are confidently labelled (16 A, 8 B). Every output space puts its tiles in
tight, far-apart blobs, so KMeans and the kNN votes are determined, and every expected value
below is worked out by hand. Two recorders are too few for folds grouped by recorder (the
default for species, habitat and hour), so most tests group those tasks by file; one test checks
that the default says so instead of scoring.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from soundscape_ssl.analysis import compare
from soundscape_ssl.analysis.cluster import ClusterConfig
from soundscape_ssl.analysis.metrics import KnnConfig

N_FILES, TILES_PER_FILE = 8, 4
A_FILES = {0, 1, 4, 5}


def _archive() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, detections = [], []
    for file in range(N_FILES):
        recorder = "R1" if file < 4 else "R2"
        start = pd.Timestamp(f"2024-05-24 {'05' if file % 2 == 0 else '12'}:00:00")
        for tile in range(TILES_PER_FILE):
            tile_id = file * TILES_PER_FILE + tile
            rows.append({"tile_id": tile_id, "recorder": recorder,
                         "habitat": "grassland" if recorder == "R1" else "canopy",
                         "relpath": f"{recorder}/file{file}.wav", "path": f"/x/{recorder}/file{file}.wav",
                         "offset_s": 3.0 * tile, "timestamp": start + pd.Timedelta(seconds=3 * tile)})
            if file in A_FILES:
                species, confidence = "Aus a_Species A", 0.9
            else:
                species = "Bus b_Species B"
                confidence = 0.8 if tile < 2 else 0.2
                if file == 2 and tile == 1:
                    confidence = 0.5  # exactly at the threshold: counts as a detection
            detections.append({"tile_id": tile_id, "top_species": species, "top_confidence": confidence,
                               "skip_reason": None})
    return pd.DataFrame(rows), pd.DataFrame(detections)


def _blobs(blob_of_tile: np.ndarray, seed: int) -> np.ndarray:
    """Tile i at 10 x unit vector of its blob, plus jitter far smaller than the blob spacing."""
    n_blobs = int(blob_of_tile.max()) + 1
    rng = np.random.default_rng(seed)
    return (10.0 * np.eye(n_blobs)[blob_of_tile] + rng.normal(0, 0.01, (len(blob_of_tile), n_blobs))
            ).astype(np.float32)


def _spaces(index: pd.DataFrame, detections: pd.DataFrame) -> dict[str, np.ndarray]:
    file = index["tile_id"].to_numpy() // TILES_PER_FILE
    tile = index["tile_id"].to_numpy() % TILES_PER_FILE
    in_a_file = np.isin(file, list(A_FILES))
    none = ~in_a_file & (tile >= 2)
    species_blob = np.where(in_a_file, 0, np.where(none, 2, 1))      # A | labelled B | none
    mixed_blob = np.where(tile < 2, 0, np.where(in_a_file, 1, 2))    # tiles 0-1 | A tiles 2-3 | none
    return {
        "species": _blobs(species_blob, 1),
        "mixed": _blobs(mixed_blob, 2),
        "recorder": _blobs((index["recorder"] == "R2").to_numpy().astype(int), 3),
        "hour": _blobs((file % 2).astype(int), 4),
    }


def _config(**overrides) -> compare.CompareConfig:
    values = dict(confidence_threshold=0.5, cluster=ClusterConfig(n_clusters=3, seed=0),
                  knn=KnnConfig(k=3, n_folds=4, n_bootstrap=200, seed=0), group_column="relpath",
                  min_labelled_tiles=5, n_top_clusters=2, min_cluster_tiles=1)
    values.update(overrides)
    return compare.CompareConfig(**values)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    index, detections = _archive()
    return compare.compare_output_spaces(_spaces(index, detections), index, detections, _config()
                                         ).set_index("output_space")


def test_pseudo_labels_threshold_is_inclusive_and_unscored_tiles_are_missing():
    labels = compare.pseudo_labels(["A", "B", "C", "D", None], [0.9, 0.5, 0.49, np.nan, 0.7], 0.5)
    assert labels.tolist()[:3] == ["A", "B", compare.NO_DETECTION]
    assert pd.isna(labels[3])                         # not scored by BirdNET
    assert labels[4] == compare.NO_DETECTION          # scored, but no species allowed


def test_tile_labels_and_detection_tables():
    index, detections = _archive()
    labels = compare.tile_labels(index, detections, _config())
    assert labels["detected"].sum() == 24
    assert (labels["pseudo_label"] == "Aus a_Species A").sum() == 16
    assert labels["hour"].tolist()[:8] == [5] * 4 + [12] * 4

    by_recorder = compare.detection_summary(labels, "recorder")
    assert by_recorder.loc["R1", ["n_tiles", "n_detected"]].tolist() == [16, 12]
    assert by_recorder.loc["all", "detection_rate"] == pytest.approx(0.75)
    assert by_recorder.loc["all", "n_species"] == 2

    species_by_recorder = compare.species_table(labels, "recorder")
    assert species_by_recorder.index.tolist() == ["Aus a_Species A", "Bus b_Species B"]
    assert species_by_recorder.loc["Aus a_Species A"].tolist() == [8, 8, 16]
    assert species_by_recorder.loc["Bus b_Species B"].tolist() == [4, 4, 8]
    species_by_hour = compare.species_table(labels, "hour")
    assert species_by_hour.loc["Bus b_Species B", [5, 12]].tolist() == [4, 4]


def test_a_space_that_separates_the_species_scores_perfectly(table):
    row = table.loc["species"]
    assert row["n_tiles"] == 32 and row["n_labelled_tiles"] == 24 and row["n_clusters"] == 3
    for metric in ("nmi", "ari", "v_measure", "purity"):
        assert row[metric] == pytest.approx(1.0)
    # clusters A (16 of 16 detected), B (8 of 8), none (0 of 8); top 2 pooled: 24 of 24
    assert row["detection_rate_overall"] == pytest.approx(0.75)
    assert row["detection_rate_top"] == pytest.approx(1.0)
    assert row["detection_rate_top_lift"] == pytest.approx(1 / 0.75)
    assert row["detection_top_tile_share"] == pytest.approx(0.75)
    assert row["knn_species_accuracy"] == pytest.approx(1.0)
    assert row["knn_species_n_tiles"] == 24 and row["knn_species_n_groups"] == 8
    assert row["knn_species_grouping"] == "file"
    assert row["knn_species_majority_share"] == pytest.approx(16 / 24)


def test_cluster_agreement_of_a_mixed_space_matches_the_hand_computation(table):
    # labelled tiles: cluster X = {A: 8, B: 8}, cluster Y = {A: 8}
    row = table.loc["mixed"]
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))   # both marginals are (2/3, 1/3)
    mutual_information = (math.log(3 / 4) + 2 * math.log(3 / 2)) / 3
    assert row["nmi"] == pytest.approx(mutual_information / entropy)
    assert row["v_measure"] == pytest.approx(mutual_information / entropy)
    pairs = 3 * math.comb(8, 2)
    marginal_pairs = math.comb(16, 2) + math.comb(8, 2)
    expected_pairs = marginal_pairs ** 2 / math.comb(24, 2)
    assert row["ari"] == pytest.approx((pairs - expected_pairs) / (marginal_pairs - expected_pairs))
    assert row["purity"] == pytest.approx(2 / 3)


def test_knn_of_recorder_habitat_and_hour_are_exact_in_the_spaces_that_encode_them(table):
    assert table.loc["recorder", "knn_recorder_accuracy"] == pytest.approx(1.0)
    assert table.loc["recorder", "knn_habitat_accuracy"] == pytest.approx(1.0)
    assert table.loc["hour", "knn_hour_accuracy"] == pytest.approx(1.0)
    assert table.loc["hour", "knn_hour_n_classes"] == 2
    # every space is scored on the same tiles with the same tasks
    assert table["knn_recorder_n_tiles"].tolist() == [32] * 4
    low, high = table.loc["recorder", ["knn_recorder_interval_low", "knn_recorder_interval_high"]]
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    assert table.loc["recorder", "knn_recorder_interval_method"] == (
        "percentile bootstrap over 8 files, 200 resamples; fixed out-of-fold predictions")


def test_folds_are_grouped_by_file_so_near_duplicates_never_leak():
    # Every file holds four identical tiles at its own point and its own hour class: a split by
    # tile would score 1.0 (each tile's nearest neighbour is its twin); grouped by file, a class
    # is never in training when it is tested, so the accuracy is exactly 0.
    index, detections = _archive()
    index["timestamp"] = pd.Timestamp("2024-05-24") + pd.to_timedelta(
        index["tile_id"] // TILES_PER_FILE, unit="h")
    file_space = {"file": 10.0 * np.eye(N_FILES, dtype=np.float32)[index["tile_id"] // TILES_PER_FILE]}
    config = _config(knn_tasks=("hour",), knn_min_groups_per_class=1)
    row = compare.compare_output_spaces(file_space, index, detections, config).iloc[0]
    assert row["knn_hour_n_classes"] == 8
    assert row["knn_hour_accuracy"] == 0.0
    # with the default of two files per class, no hour class is learnable: a NaN and a note
    row = compare.compare_output_spaces(file_space, index, detections, _config(knn_tasks=("hour",))).iloc[0]
    assert math.isnan(row["knn_hour_accuracy"])
    assert "kNN hour" in row["notes"]


def test_by_default_species_habitat_and_hour_are_grouped_by_recorder_and_say_when_they_cannot_be():
    # Two recorders cannot fill four folds grouped by recorder: NaN and a note naming the grouping,
    # not a silent fallback to files. The recorder task is grouped by file and still scored.
    index, detections = _archive()
    row = compare.compare_output_spaces(_spaces(index, detections), index, detections,
                                        _config(group_column="recorder")).set_index("output_space").loc["species"]
    for task in ("species", "habitat", "hour"):
        assert math.isnan(row[f"knn_{task}_accuracy"]) and row[f"knn_{task}_grouping"] == "recorder"
    for task in ("species", "hour"):
        assert f"kNN {task}: 2 recorder groups cannot fill 4 grouped folds" in row["notes"]
    # each habitat is one recorder's: no habitat is heard in two recorder groups
    assert "kNN habitat: 0 usable tiles (< 2) after leaving out 2 classes heard in fewer than 2 recorder" in row["notes"]
    assert row["knn_recorder_grouping"] == "file" and row["knn_recorder_n_groups"] == 8
    assert not math.isnan(row["knn_recorder_accuracy"])
    assert compare.CompareConfig().group_column == "recorder"


def test_no_confident_detection_gives_nan_and_notes_not_a_crash():
    index, detections = _archive()
    spaces = _spaces(index, detections)
    row = compare.compare_output_spaces({"recorder": spaces["recorder"]}, index, detections,
                                        _config(confidence_threshold=0.95)).iloc[0]
    assert row["n_labelled_tiles"] == 0
    assert math.isnan(row["nmi"]) and math.isnan(row["knn_species_accuracy"])
    assert "cluster agreement" in row["notes"] and "kNN species" in row["notes"]
    assert row["detection_rate_overall"] == 0.0
    assert row["knn_recorder_accuracy"] == pytest.approx(1.0)  # the other tasks still run


def test_tiles_birdnet_skipped_or_with_nan_rows_leave_every_space():
    index, detections = _archive()
    spaces = _spaces(index, detections)
    detections.loc[31, ["top_species", "top_confidence", "skip_reason"]] = [None, np.nan, "truncated"]
    spaces["birdnet"] = spaces["species"].copy()
    spaces["birdnet"][31] = np.nan                    # BirdNET writes NaN embeddings for skipped tiles
    spaces["recorder"][0] = np.nan                    # and another space loses a different tile
    result = compare.compare_output_spaces(spaces, index, detections, _config()).set_index("output_space")
    assert result["n_tiles"].tolist() == [30] * 5
    assert result.loc["species", "n_labelled_tiles"] == 23
    assert result.loc["species", "nmi"] == pytest.approx(1.0)


def test_reused_cluster_labels_and_cluster_species_shares():
    index, detections = _archive()
    spaces = _spaces(index, detections)
    config = _config()
    labels = compare.tile_labels(index, detections, config)
    rows = compare.comparable_rows(spaces, labels)
    clusters = compare.cluster_spaces(spaces, config.cluster, rows)
    table = compare.compare_output_spaces(spaces, index, detections, config, cluster_labels=clusters)
    assert table.set_index("output_space").loc["species", "nmi"] == pytest.approx(1.0)

    shares = compare.cluster_species_shares(clusters["mixed"], labels["pseudo_label"])
    assert shares.columns.tolist() == ["Aus a_Species A", "Bus b_Species B", compare.NO_DETECTION]
    assert sorted(shares["Aus a_Species A"].round(6).tolist()) == [0.0, 0.5, 1.0]
    assert shares[compare.NO_DETECTION].iloc[-1] == 1.0   # the none cluster comes last
    assert compare.best_space(table, ["mixed", "species"]) == "species"


def test_config_round_trips_and_rejects_bad_values():
    config = _config(knn_tasks=("species", "hour"))
    assert compare.CompareConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        compare.CompareConfig(knn_tasks=("weather",))
    with pytest.raises(ValueError):
        compare.CompareConfig.from_dict({"confidence": 0.5})


def test_memory_mapped_float16_spaces_score_as_their_float32_copies(tmp_path):
    """Notebook 06 hands BirdNET's float16 embeddings and the other spaces over memory-mapped,
    never copied whole: the table is the one of the in-memory float32 copies, NaN rows included."""
    from soundscape_ssl.analysis.cluster import fit_clusters

    index, detections = _archive()
    spaces = _spaces(index, detections)
    spaces["species"][5] = np.nan                      # a row left out of every space
    mapped = {}
    for name, space in spaces.items():
        np.save(tmp_path / f"{name}.npy", space.astype(np.float16))
        mapped[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    copies = {name: np.asarray(space, dtype=np.float32) for name, space in mapped.items()}
    config = _config()
    from_maps = compare.compare_output_spaces(mapped, index, detections, config)
    from_copies = compare.compare_output_spaces(copies, index, detections, config)
    pd.testing.assert_frame_equal(from_maps, from_copies)
    # cluster_spaces reads the comparable rows where they lie: as fitting on the copied-out rows
    keep = compare.comparable_rows(mapped, compare.tile_labels(index, detections, config))
    assert not keep[5]
    labels = compare.cluster_spaces(mapped, config.cluster, keep)["mixed"]
    assert (labels[~keep] == -1).all()
    np.testing.assert_array_equal(labels[keep], fit_clusters(copies["mixed"][keep], config.cluster,
                                                             progress=False).labels)
