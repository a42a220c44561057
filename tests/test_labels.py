"""Labelling clusters: names table, name propagation with a margin confidence, Raven tables, the
`label` command and its refusals, the measure against a known truth. Hand-made clusterings only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from soundscape_ssl.analysis import labels
from soundscape_ssl.analysis.cluster import ClusterConfig, ClusterResult
from soundscape_ssl.pipeline import cli

# Three centroids in a 2-D space that needs no standardising: the distances are read off by eye.
CENTROIDS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=np.float32)


def make_result(rows: np.ndarray) -> ClusterResult:
    rows = np.asarray(rows, dtype=np.float32)
    squared = ((rows[:, None, :] - CENTROIDS[None]) ** 2).sum(axis=2)
    assigned = squared.argmin(axis=1).astype(np.int32)
    return ClusterResult(labels=assigned, distances=np.sqrt(squared[np.arange(len(rows)), assigned]).astype(np.float32),
                         centroids=CENTROIDS, scaler_mean=np.zeros(2), scaler_scale=np.ones(2),
                         cluster_sizes=np.bincount(assigned, minlength=3).astype(np.int64),
                         fit_indices=np.arange(len(rows)), inertia=0.0, silhouette=float("nan"), n_iter=1,
                         config=ClusterConfig(n_clusters=3))


def test_margin_confidence_orders_tiles_by_how_far_they_are_from_another_name():
    rows = np.array([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
    result = make_result(rows)
    own, other, confidence = labels.name_margins(rows, result, {0: "Wren", 1: "Robin"}, chunk_rows=2, progress=False)
    np.testing.assert_allclose(own, [0.0, 1.0, 4.0], atol=1e-6)
    np.testing.assert_allclose(other, [10.0, 9.0, 6.0], atol=1e-6)
    np.testing.assert_allclose(confidence, [1.0, 1 - 1 / 9, 1 - 4 / 6], atol=1e-6)
    assert confidence[0] > confidence[1] > confidence[2]
    # Cluster 1 with the same name is no rival: the nearest other name is cluster 2 (unnamed).
    _, other, confidence = labels.name_margins(rows, result, {0: "Wren", 1: "Wren"}, progress=False)
    np.testing.assert_allclose(other, [10.0, np.hypot(1, 10), np.hypot(4, 10)], atol=1e-5)
    np.testing.assert_allclose(confidence[2], 1 - 4 / np.hypot(4, 10), atol=1e-6)
    # Every cluster one name: nothing to confuse it with.
    _, other, confidence = labels.name_margins(rows, result, {0: "x", 1: "x", 2: "x"}, progress=False)
    assert np.isinf(other).all() and (confidence == 1.0).all()


def test_another_embedding_than_the_clustered_one_is_refused():
    rows = np.array([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
    with pytest.raises(ValueError, match="1 of 3 rows lie elsewhere"):
        labels.name_margins(rows + np.array([[0, 0], [0, 0], [0.5, 0]]), make_result(rows), {}, progress=False)


def hand_made_tiles() -> tuple[pd.DataFrame, np.ndarray]:
    """Two recordings; clusters chosen so the merged selections are known."""
    index = pd.DataFrame({
        "tile_id": np.arange(10),
        "relpath": ["s1/rec1.wav"] * 6 + ["s2/rec2.wav"] * 4,
        "offset_s": [0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 0.0, 3.0, 9.0, 12.0],
        "valid_s": [3.0] * 9 + [1.5],  # the last tile of rec2 is padded: 1.5 s of audio
        "recorder": ["s1"] * 6 + ["s2"] * 4,
        "timestamp": pd.date_range("2024-05-01", periods=10, freq="3s"),
    })
    #             rec1: W  W  R  R  ig W    rec2: W  W  _gap_ W  unnamed
    clusters = np.array([0, 0, 1, 1, 2, 0, 0, 0, 0, 3])
    return index, clusters


def test_names_propagate_and_touching_tiles_of_one_name_merge():
    index, clusters = hand_made_tiles()
    names = {0: "Wren", 1: "Robin", 2: "ignore"}
    confidence_inputs = np.linspace(0.1, 1.0, 10), np.full(10, 2.0)
    tiles = labels.propagate_names(index, clusters, names, *confidence_inputs)
    assert tiles["name"].iloc[:9].tolist() == ["Wren", "Wren", "Robin", "Robin", "ignore", "Wren", "Wren", "Wren", "Wren"]
    assert pd.isna(tiles["name"].iloc[9])  # cluster 3 has no name
    assert tiles["labelled"].tolist() == [True] * 4 + [False] + [True] * 4 + [False]
    np.testing.assert_allclose(tiles["confidence"], 1 - np.linspace(0.1, 1.0, 10) / 2, rtol=1e-6)
    selections = labels.merge_selections(tiles, tile_s=3.0)
    assert selections[["relpath", "begin_s", "end_s", "label", "n_tiles"]].values.tolist() == [
        ["s1/rec1.wav", 0.0, 6.0, "Wren", 2],
        ["s1/rec1.wav", 6.0, 12.0, "Robin", 2],
        ["s1/rec1.wav", 15.0, 18.0, "Wren", 1],   # after the ignored tile: a new selection
        ["s2/rec2.wav", 0.0, 6.0, "Wren", 2],
        ["s2/rec2.wav", 9.0, 12.0, "Wren", 1],    # 6-9 s has no tile: not adjacent
    ]
    # Overlapping tiles (hop 1.5 s < tile 3 s) touch; a padded last tile ends where its audio ends.
    overlapping = pd.DataFrame({"relpath": "r.wav", "offset_s": [0.0, 1.5, 3.0], "valid_s": [3.0, 3.0, 1.0],
                                "name": "Wren", "labelled": True, "confidence": [0.2, 0.4, 0.6]})
    merged = labels.merge_selections(overlapping, tile_s=3.0)
    assert merged[["begin_s", "end_s", "n_tiles"]].values.tolist() == [[0.0, 4.5, 3]]
    assert merged["mean_confidence"].iloc[0] == pytest.approx(0.4)


def test_raven_table_write_read_round_trip_is_exact(tmp_path):
    selections = pd.DataFrame({"relpath": "a.wav", "begin_s": [0.0, 0.1 + 0.2, 1e-7, 3600.123456789],
                               "end_s": [3.0, 6.0, 3.0000001, 3603.0], "label": ["Wren", "Robin", "x y", "Ü"],
                               "n_tiles": 1, "mean_confidence": [0.5, 0.25, 1.0, 0.1234]})
    table = labels.raven_table(selections, 50.0, 15000.0)
    path = labels.write_raven_table(table, tmp_path / "a.Table.1.selections.txt")
    assert path.read_text().splitlines()[0] == ("Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\t"
                                                "Low Freq (Hz)\tHigh Freq (Hz)\tLabel\tConfidence")
    assert path.read_text().splitlines()[1] == "1\tSpectrogram 1\t1\t0.0\t3.0\t50.0\t15000.0\tWren\t0.500"
    back = labels.read_raven_table(path)
    pd.testing.assert_frame_equal(back, table)
    assert back["Begin Time (s)"].iloc[1] == 0.1 + 0.2  # the very same float
    # Header only: an empty table reads back empty, with its columns.
    empty = labels.raven_table(selections.iloc[:0], 50.0, 15000.0)
    labels.write_raven_table(empty, tmp_path / "empty.txt")
    assert list(labels.read_raven_table(tmp_path / "empty.txt").columns) == list(empty.columns)


def test_raven_files_as_raven_writes_them_are_read_and_broken_ones_refused(tmp_path):
    raven = ("\ufeffSelection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\t"
             "Delta Time (s)\tAnnotation\n"
             "1\tWaveform 1\t1\t1.5\t2.25\t0\t11025\t0.75\tsong\n"
             "1\tSpectrogram 1\t1\t1.5\t2.25\t400.5\t8000\t0.75\tsong\n\n")
    (tmp_path / "raven.txt").write_text(raven, encoding="utf-8")
    table = labels.read_raven_table(tmp_path / "raven.txt")
    assert table["View"].tolist() == ["Waveform 1", "Spectrogram 1"]
    assert table["Low Freq (Hz)"].tolist() == [0.0, 400.5] and table["Selection"].dtype == np.int64
    assert table["Delta Time (s)"].tolist() == ["0.75", "0.75"]  # other columns stay text
    (tmp_path / "no_channel.txt").write_text(raven.replace("\tChannel", "\tChan"))
    with pytest.raises(labels.RavenTableError, match=r"line 1: missing Raven column\(s\) \['Channel'\]"):
        labels.read_raven_table(tmp_path / "no_channel.txt")
    (tmp_path / "short.txt").write_text(raven.replace("\t0.75\tsong\n1\tSp", "\n1\tSp"))
    with pytest.raises(labels.RavenTableError, match="line 2: 7 fields, the header has 9"):
        labels.read_raven_table(tmp_path / "short.txt")
    (tmp_path / "text.txt").write_text(raven.replace("\t2.25\t400.5", "\tlate\t400.5"))
    with pytest.raises(labels.RavenTableError, match="line 3: End Time \\(s\\) 'late' is not a number"):
        labels.read_raven_table(tmp_path / "text.txt")


def test_names_table_counts_majorities_and_carries_the_clustering_identity(tmp_path):
    rows = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [9.0, 0.0], [0.0, 9.0]])
    result = make_result(rows)  # clusters 0, 0, 0, 1, 2
    described = pd.DataFrame({"cluster": [0, 1, 2], "n_tiles": [3, 1, 1], "verdict": ["signal", "near-silent", "signal"]})
    table = labels.cluster_names_table(described, "toy_band", result.centroids, result.labels,
                                       planted_labels=["wren", "robin", "wren", "rain", None])
    assert table["cluster"].tolist() == [0, 1, 2]  # largest first, then by id
    assert table["planted_label"].tolist() == ["wren", "rain", ""]
    assert table["planted_share"].tolist() == [pytest.approx(0.667), 1.0, 0.0]
    assert (table["birdnet_species"] == "").all() and table["birdnet_share"].isna().all()
    assert (table["fingerprint"] == labels.clustering_fingerprint(CENTROIDS)).all()
    assert labels.clustering_fingerprint(CENTROIDS + 1e-3) != labels.clustering_fingerprint(CENTROIDS)
    assert (table["name"] == "").all() and list(table.columns) == list(labels.NAMES_COLUMNS)
    # A tie goes to the alphabetically first value; excluded values never win.
    majority, share = labels.majority_per_cluster(np.array([0, 0, 0]), ["b", "a", "none"], 1, exclude=["none"])
    assert majority.tolist() == ["a"] and share.tolist() == [pytest.approx(1 / 3)]
    # Rerunning notebook 04 keeps an expert's names; a named file of another clustering is moved aside.
    path = tmp_path / "cluster_names.csv"
    labels.write_cluster_names(table.assign(name=["Wren", "", ""]), path)
    labels.write_cluster_names(table.assign(planted_label="new"), path)
    rewritten = pd.read_csv(path, keep_default_na=False)
    assert rewritten["name"].tolist() == ["Wren", "", ""] and (rewritten["planted_label"] == "new").all()
    other = table.assign(fingerprint="0123456789abcdef")
    labels.write_cluster_names(other, path)
    assert pd.read_csv(path, keep_default_na=False)["name"].tolist() == ["", "", ""]
    aside = tmp_path / f"cluster_names.{labels.clustering_fingerprint(CENTROIDS)}.csv"
    assert pd.read_csv(aside, keep_default_na=False)["name"].tolist() == ["Wren", "", ""]


def test_birdnet_species_are_read_when_a_finished_run_covers_the_tiles(tmp_path):
    species, why = labels.birdnet_species_per_tile(tmp_path / "birdnet", np.arange(3))
    assert species is None and "no finished BirdNET run" in why
    (tmp_path / "birdnet").mkdir()
    (tmp_path / "birdnet" / "config.json").write_text("{}")
    pd.DataFrame({"tile_id": [0, 1, 2], "top_species": ["A_a", "B_b", "C_c"], "top_confidence": [0.9, 0.2, 0.7],
                  "skip_reason": [None, None, "unreadable"]}).to_parquet(tmp_path / "birdnet" / "detections.parquet")
    species, _ = labels.birdnet_species_per_tile(tmp_path / "birdnet", np.arange(3), confidence_threshold=0.5)
    assert species.tolist() == ["A_a", None, None]
    assert labels.birdnet_species_per_tile(tmp_path / "birdnet", np.arange(4))[0] is None


@pytest.fixture()
def toy_run(tmp_path) -> tuple[Path, Path]:
    """A run folder with a tile store index, a stored embedding and its clustering, and a names file."""
    run = tmp_path / "run"
    index, clusters = hand_made_tiles()
    # Rows placed so that tile i lands in clusters[i]; cluster 3 does not exist here, so use 3 clusters.
    clusters = np.minimum(clusters, 2)
    rows = CENTROIDS[clusters] + np.linspace(0.0, 1.0, len(clusters))[:, None] * np.array([[1.0, 0.5]], np.float32)
    result = make_result(rows)
    assert np.array_equal(result.labels, clusters)
    result.save(run / "clusters" / "toy_band")
    (run / "tiles").mkdir(parents=True)
    (run / "tiles" / "config.json").write_text(json.dumps({"stage": "tiles", "config": {"tile_s": 3.0, "f_min_hz": 50.0,
                                                                                       "f_max_hz": 15000.0}}))
    index.to_parquet(run / "tiles" / "index.parquet")
    (run / "embeddings" / "toy").mkdir(parents=True)
    np.save(run / "embeddings" / "toy" / "embeddings_band.npy", rows.astype(np.float32))
    (run / "embeddings" / "toy" / "config.json").write_text(json.dumps(
        {"stage": "embed", "arrays": {"band": {"file": "embeddings_band.npy", "shape": [10, 2]}}}))
    described = pd.DataFrame({"cluster": [0, 1, 2], "n_tiles": np.bincount(clusters), "verdict": "signal"})
    names = labels.cluster_names_table(described, "toy_band", result.centroids, result.labels)
    names["name"] = names["cluster"].map({0: "Wren", 1: "Robin", 2: "IGNORE"})
    names_path = tmp_path / "cluster_names.csv"
    names.to_csv(names_path, index=False)
    return run, names_path


def test_label_command_writes_tiles_and_one_raven_table_per_recording(toy_run, capsys):
    run, names_path = toy_run
    assert cli.main(["label", "--run", str(run), "--names", str(names_path)]) == 0
    assert "8 of 10 tiles labelled from 2 named clusters (1 ignored)" in capsys.readouterr().out
    tiles = pq.read_table(run / "labels" / "tiles.parquet").to_pandas()
    assert tiles["name"].tolist() == ["Wren", "Wren", "Robin", "Robin", "ignore", "Wren", "Wren", "Wren", "Wren", "ignore"]
    assert tiles[["tile_id", "offset_s", "recorder", "timestamp", "cluster", "confidence"]].notna().all().all()
    rec1 = labels.read_raven_table(run / "labels" / "raven" / "s1" / "rec1.Table.1.selections.txt")
    assert rec1[["Begin Time (s)", "End Time (s)", "Label"]].values.tolist() == [[0.0, 6.0, "Wren"], [6.0, 12.0, "Robin"],
                                                                                 [15.0, 18.0, "Wren"]]
    assert (rec1["Low Freq (Hz)"] == 50.0).all() and (rec1["High Freq (Hz)"] == 15000.0).all()
    assert (rec1["View"] == "Spectrogram 1").all() and (rec1["Channel"] == 1).all()
    rec2 = labels.read_raven_table(run / "labels" / "raven" / "s2" / "rec2.Table.1.selections.txt")
    assert rec2[["Begin Time (s)", "End Time (s)"]].values.tolist() == [[0.0, 6.0], [9.0, 12.0]]
    # A second naming replaces the tables: no selection of the first survives.
    names = pd.read_csv(names_path, keep_default_na=False)
    names_path.write_text(names.assign(name=names["name"].replace({"Robin": ""})).to_csv(index=False))
    assert cli.main(["label", "--run", str(run), "--names", str(names_path)]) == 0
    rec1 = labels.read_raven_table(run / "labels" / "raven" / "s1" / "rec1.Table.1.selections.txt")
    assert rec1["Label"].tolist() == ["Wren", "Wren"]


def set_field(text: str, row: int, column: str, value: str) -> str:
    """The names CSV with one cell of data row `row` (1 = first under the header) replaced."""
    lines = text.splitlines()
    position = lines[0].split(",").index(column)
    fields = lines[row].split(",")
    fields[position] = value
    lines[row] = ",".join(fields)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("edit, message", [
    (lambda text: "", "is empty"),
    (lambda text: text.splitlines()[0] + "\n", "has a header but no rows"),
    (lambda text: text.replace(",name", ",label"), "lacks column(s) ['name']"),
    (lambda text: text + text.splitlines()[1] + "\n", "row 4: cluster 0 is named again (first in row 1)"),
    (lambda text: set_field(text, 3, "cluster", "7"), "row 3: unknown cluster 7 (this clustering has 0..2)"),
    (lambda text: set_field(text, 3, "cluster", "two"), "row 3: cluster 'two' is not an integer"),
    (lambda text: set_field(text, 2, "fingerprint", "0123456789abcdef"),
     "row 2: fingerprint '0123456789abcdef' is not this clustering's"),
    (lambda text: text.replace("toy_band", "mae_mean"), "row 1: space 'mae_mean' is not 'toy_band'"),
    # a spreadsheet's byte order mark must not hide the first column (space)
    (lambda text: "\ufeff" + text.replace("toy_band", "mae_mean"), "row 1: space 'mae_mean' is not 'toy_band'"),
])
def test_bad_names_files_fail_with_one_line_naming_the_row(toy_run, capsys, edit, message):
    run, names_path = toy_run
    names_path.write_text(edit(names_path.read_text()))
    assert cli.main(["label", "--run", str(run), "--names", str(names_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("soundscape-ssl label: error: ")
    assert message in error
    assert not (run / "labels" / "tiles.parquet").exists()


def test_name_largest_by_majority_and_precision_against_a_known_truth():
    table = pd.DataFrame({"cluster": [0, 1, 2, 3], "size": [5, 9, 9, 1],
                          "planted_label": ["wren", "robin", "", "rain"], "name": ""})
    named = labels.name_largest_by_majority(table, 3)
    assert named["name"].tolist() == ["wren", "robin", "", ""]  # 1 and 2 (size 9), then 0; 2 has no majority
    names = ["wren", "wren", "wren", "robin", "robin", None, "ignore", ""]
    truth = ["wren", "wren", "robin", "robin", "rain", "rain", "wren", "wren"]
    sets = ["wren", "wren", "robin;wren", "robin", "rain", "rain", "wren", "wren"]
    scores = labels.score_propagated_labels(names, truth, sets, n_decisions=2).set_index("name")
    assert scores.loc["wren", ["tiles_labelled", "hits_dominant", "hits_any"]].tolist() == [3, 2, 3]
    assert scores.loc["robin", ["tiles_labelled", "hits_dominant", "hits_any"]].tolist() == [2, 1, 1]
    assert scores.loc["all", "precision_dominant"] == pytest.approx(3 / 5)
    assert scores.loc["all", "precision_any"] == pytest.approx(4 / 5)
    assert scores.loc["wren", "base_rate"] == pytest.approx(4 / 8)
    assert scores.loc["all", "base_rate"] == pytest.approx((3 * 4 / 8 + 2 * 2 / 8) / 5)
    assert scores.loc["all", "tiles_per_decision"] == pytest.approx(5 / 2)


def test_precision_by_confidence_bins_tiles_from_least_to_most_confident():
    names = ["a", "a", "a", "a", "b", "b", "b", "b", None, "ignore"]
    truth = ["a", "x", "a", "a", "x", "x", "b", "b", "a", "a"]
    confidence = [0.9, 0.1, 0.8, 0.7, 0.2, 0.15, 0.6, 0.65, 1.0, 1.0]
    table = labels.precision_by_confidence(names, truth, confidence, n_bins=2)
    assert table["tiles"].tolist() == [4, 4]  # the unnamed and ignored tiles are not scored
    assert table["precision"].tolist() == [0.25, 1.0]  # 0.1, 0.15, 0.2 wrong; 0.6 right | all right
    assert table["confidence_high"].iloc[0] == 0.6 and table["confidence_low"].iloc[1] == 0.65


def test_measure_labelling_names_the_largest_clusters_by_the_planted_truth_and_scores_them(toy_run, tmp_path):
    run, _ = toy_run  # clusters of the 10 tiles: 0 0 1 1 2 0 | 0 0 0 2 (rec1 | rec2)
    pd.DataFrame({"cluster": [0, 1, 2], "n_tiles": [6, 2, 2], "verdict": "signal"}).to_csv(
        run / "clusters" / "toy_band" / "clusters.csv", index=False)
    archive = tmp_path / "archive"
    archive.mkdir()
    events = [("s1/rec1.wav", 0.0, 3.0, "wren", "bird"), ("s1/rec1.wav", 3.0, 6.0, "wren", "bird"),
              ("s1/rec1.wav", 6.0, 9.0, "robin", "bird"), ("s1/rec1.wav", 9.0, 12.0, "robin", "bird"),
              ("s1/rec1.wav", 9.0, 12.0, "rain", "rain"), ("s1/rec1.wav", 12.0, 15.0, "rain", "rain"),
              ("s2/rec2.wav", 0.0, 3.0, "wren", "bird"),
              ("s2/rec2.wav", 3.0, 3.5, "wren", "bird"), ("s2/rec2.wav", 3.0, 6.0, "robin", "bird"),
              ("s2/rec2.wav", 9.0, 12.0, "wren", "bird")]
    pd.DataFrame([{"file": f, "start_s": a, "end_s": b, "f_low_hz": 1000.0, "f_high_hz": 4000.0, "label": label,
                   "kind": kind, "snr_db": 10.0, "individual_id": ""} for f, a, b, label, kind in events]
                 ).to_csv(archive / "annotations.csv", index=False)
    scores, by_confidence, summary = labels.measure_labelling(run, archive, tmp_path / "out", n_largest=2, progress=False)
    named = pd.read_csv(tmp_path / "out" / "cluster_names_named.csv", keep_default_na=False)
    assert named.set_index("cluster")["name"].to_dict() == {0: "wren", 1: "robin", 2: ""}
    scores = scores.set_index("name")
    # wren: tiles 0 1 5 6 7 8, dominant wren in 0 1 6 8, wren counts in 7 too (robin louder), 5 is background
    assert scores.loc["wren", ["tiles_labelled", "hits_dominant", "hits_any"]].tolist() == [6, 4, 5]
    assert scores.loc["robin", ["tiles_labelled", "hits_dominant", "hits_any"]].tolist() == [2, 2, 2]
    assert scores.loc["all", ["precision_dominant", "precision_any", "tiles_per_decision"]].tolist() == [0.75, 0.875, 4.0]
    assert summary.n_labelled_tiles == 8 and not (run / "labels").exists()  # the run is only read
    assert by_confidence["tiles"].sum() == 8


def test_the_space_to_label_must_be_named_when_it_is_not_the_only_one(toy_run, tmp_path, capsys):
    run, names_path = toy_run
    argv = ["label", "--run", str(run), "--names", str(names_path), "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--space", "dino_mean"]) == 1
    assert "clusters/dino_mean holds no finished clustering (finished: ['toy_band'])" in capsys.readouterr().err
    ClusterResult.load(run / "clusters" / "toy_band").save(run / "clusters" / "other_band")
    assert cli.main(argv) == 1
    assert "holds 2 clusterings ['other_band', 'toy_band']: name one with --space" in capsys.readouterr().err
    assert cli.main(argv + ["--space", "toy_band"]) == 0
    assert (tmp_path / "out" / "tiles.parquet").is_file() and not (run / "labels").exists()
    assert cli.main(["label", "--run", str(tmp_path), "--names", str(names_path)]) == 1
    assert "has no clusters/ folder" in capsys.readouterr().err
