"""Tests of per-tile ground truth: hand-made examples with known answers, then the synthetic archive."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from soundscape_ssl.recordings.groundtruth import (
    GroundTruthConfig,
    box_mask,
    tile_boxes,
    tile_event_overlaps,
    tile_ground_truth,
    tile_label_overlaps,
)
from soundscape_ssl.recordings.synth import SynthConfig, generate_archive, read_annotations

COLUMNS = ["file", "start_s", "end_s", "f_low_hz", "f_high_hz", "label", "kind", "snr_db"]


@pytest.fixture()
def annotations() -> pd.DataFrame:
    return pd.DataFrame([
        ("A/a.wav", 0.5, 2.0, 3000, 4000, "whistler", "bird", 10.0),    # tile 0: 1.5 s
        ("A/a.wav", 1.0, 1.5, 3000, 4000, "whistler", "bird", 12.0),    # inside the first: counted once
        ("A/a.wav", 0.0, 9.0, 4000, 5000, "cricket", "insect", 20.0),   # the whole file
        ("A/a.wav", 2.95, 3.5, 5000, 8000, "chipper", "bird", 5.0),     # clips tile 0 by 50 ms only
        ("A/a.wav", 4.0, 4.03, 5000, 8000, "chipper", "bird", 5.0),     # 30 ms chip inside tile 1
        ("A/a.wav", 7.0, 8.0, 5000, 8000, "buzzer", "bird", -10.0),     # inaudible
        ("B/b.wav", 0.0, 3.0, 50, 400, "wind", "wind", 3.0),
        ("B/b.wav", 0.0, 3.0, 600, 13000, "rain", "rain", 15.0),
    ], columns=COLUMNS)


@pytest.fixture()
def tiles() -> pd.DataFrame:
    # A non-default index: results must follow it.
    return pd.DataFrame({"relpath": ["A/a.wav"] * 3 + ["B/b.wav", "C/c.wav"],
                         "offset_s": [0.0, 3.0, 6.0, 0.0, 0.0]}, index=[10, 11, 12, 13, 14])


def test_dominant_label_on_a_hand_made_example(annotations: pd.DataFrame, tiles: pd.DataFrame) -> None:
    truth = tile_ground_truth(annotations, tiles, tile_s=3.0)
    assert truth.index.tolist() == [10, 11, 12, 13, 14]
    # A bird beats the louder, longer cricket chorus; the clipped chip does not count in tile 0.
    assert truth["label"].tolist() == ["whistler", "chipper", "cricket", "rain", "background"]
    assert truth["kind"].tolist() == ["bird", "bird", "insect", "rain", "background"]
    assert truth["overlap_s"].tolist() == pytest.approx([1.5, 0.53, 3.0, 3.0, 0.0])
    assert truth.loc[10, "snr_db"] == 12.0 and np.isnan(truth.loc[14, "snr_db"])
    assert truth["labels"].tolist() == ["cricket;whistler", "chipper;cricket", "cricket", "rain;wind", ""]
    assert truth["n_labels"].tolist() == [2, 2, 1, 2, 0]


def test_overlap_matrix_counts_each_label_once(annotations: pd.DataFrame, tiles: pd.DataFrame) -> None:
    overlaps = tile_label_overlaps(annotations, tiles, tile_s=3.0)
    assert list(overlaps.columns) == ["buzzer", "chipper", "cricket", "rain", "whistler", "wind"]
    assert overlaps.index.tolist() == tiles.index.tolist()
    expected = pd.DataFrame(0.0, index=tiles.index, columns=overlaps.columns)
    expected.loc[10, ["cricket", "whistler"]] = [3.0, 1.5]
    expected.loc[11, ["chipper", "cricket"]] = [0.53, 3.0]
    expected.loc[12, "cricket"] = 3.0
    expected.loc[13, ["rain", "wind"]] = [3.0, 3.0]
    np.testing.assert_allclose(overlaps.to_numpy(), expected.to_numpy(), atol=1e-9)
    chosen = tile_label_overlaps(annotations, tiles, tile_s=3.0, labels=["wind", "owl"])
    assert chosen.loc[13].tolist() == [3.0, 0.0]


def test_thresholds_change_what_counts(annotations: pd.DataFrame, tiles: pd.DataFrame) -> None:
    everything = GroundTruthConfig(min_overlap_s=0.0, min_snr_db=-np.inf)
    overlaps = tile_label_overlaps(annotations, tiles, tile_s=3.0, config=everything)
    assert overlaps.loc[10, "chipper"] == pytest.approx(0.05)
    assert overlaps.loc[12, "buzzer"] == pytest.approx(1.0)
    # Without a foreground kind the longest (then loudest) label wins: the cricket chorus.
    flat = tile_ground_truth(annotations, tiles, tile_s=3.0, config=GroundTruthConfig(foreground_kinds=()))
    assert flat.loc[10, "label"] == "cricket"
    assert flat.loc[13, "label"] == "rain"  # tie on time with wind, rain is louder
    missing_snr = annotations.drop(columns="snr_db")
    assert tile_ground_truth(missing_snr, tiles, tile_s=3.0).loc[12, "label"] == "buzzer"


def test_tile_duration_from_a_column_and_bad_input(annotations: pd.DataFrame, tiles: pd.DataFrame,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with_column = tiles.assign(tile_s=3.0)
    pd.testing.assert_frame_equal(tile_ground_truth(annotations, with_column),
                                  tile_ground_truth(annotations, tiles, tile_s=3.0))
    with pytest.raises(ValueError, match="tile_s"):
        tile_ground_truth(annotations, tiles)
    with pytest.raises(ValueError, match="lacks columns"):
        tile_ground_truth(annotations.drop(columns="f_low_hz"), tiles, tile_s=3.0)
    elsewhere = tiles.assign(relpath="other/" + tiles["relpath"])
    with caplog.at_level(logging.WARNING, logger="soundscape_ssl.recordings.groundtruth"):
        truth = tile_ground_truth(annotations, elsewhere, tile_s=3.0)
    assert (truth["label"] == "background").all()
    assert "no tile file matches" in caplog.text


def test_empty_inputs_give_background(tiles: pd.DataFrame) -> None:
    nothing = pd.DataFrame(columns=COLUMNS)
    truth = tile_ground_truth(nothing, tiles, tile_s=3.0)
    assert truth.index.tolist() == tiles.index.tolist() and (truth["label"] == "background").all()
    assert tile_label_overlaps(nothing, tiles, tile_s=3.0).shape == (len(tiles), 0)
    assert tile_ground_truth(nothing, tiles.iloc[:0], tile_s=3.0).empty
    assert tile_boxes(nothing, "A/a.wav", 0.0, 3.0).empty


def test_tile_boxes_are_tile_relative_and_clipped(annotations: pd.DataFrame) -> None:
    boxes = tile_boxes(annotations, "A/a.wav", offset_s=1.75, tile_s=3.0)
    # Tile [1.75, 4.75): the second whistler (1.0-1.5 s) ends before it; rows in time order.
    assert boxes["label"].tolist() == ["whistler", "cricket", "chipper", "chipper"]
    assert boxes["start_s"].tolist() == pytest.approx([0.0, 0.0, 1.2, 2.25])
    assert boxes["end_s"].tolist() == pytest.approx([0.25, 3.0, 1.75, 2.28])
    assert boxes["f_low_hz"].tolist() == [3000, 4000, 5000, 5000]
    assert boxes["f_high_hz"].tolist() == [4000, 5000, 8000, 8000]
    assert boxes["counts"].all()
    late = tile_boxes(annotations, "A/a.wav", offset_s=5.5, tile_s=3.0, counting_only=True)
    assert late["label"].tolist() == ["cricket"]  # the inaudible buzzer is left out
    assert tile_boxes(annotations, "A/a.wav", offset_s=5.5, tile_s=3.0)["label"].tolist() == ["cricket", "buzzer"]


def test_box_mask_marks_the_cells_inside_boxes() -> None:
    boxes = pd.DataFrame({"start_s": [0.5], "end_s": [1.5], "f_low_hz": [1000.0], "f_high_hz": [3000.0]})
    mask = box_mask(boxes, frame_times_s=np.array([0.25, 0.75, 1.25, 1.75]),
                    bin_freqs_hz=np.array([500.0, 1000.0, 2000.0, 4000.0]))
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(mask, expected)
    assert not box_mask(boxes.iloc[:0], np.arange(3.0), np.arange(5.0)).any()


def test_ground_truth_of_a_synthetic_archive(tmp_path: Path) -> None:
    config = SynthConfig(recorders=2, grassland_recorders=1, days=1, recording_start_hours=(5.5, 12.0),
                         file_s=12.0, rainy_days=())
    archive = generate_archive(tmp_path / "archive", config)
    annotations = read_annotations(archive)
    files = sorted(annotations["file"].unique())
    tiles = pd.DataFrame([(f, offset) for f in files for offset in np.arange(0.0, 12.0, 3.0)],
                         columns=["relpath", "offset_s"])
    truth = tile_ground_truth(annotations, tiles, tile_s=3.0)
    overlaps = tile_label_overlaps(annotations, tiles, tile_s=3.0)
    # Consistency: the dominant label is present in the multi-label matrix with the same seconds.
    labelled = truth[truth["label"] != "background"]
    assert len(labelled) > len(tiles) // 2
    for tile, row in labelled.iterrows():
        assert overlaps.loc[tile, row["label"]] == pytest.approx(row["overlap_s"])
        assert 0 < row["overlap_s"] <= 3.0
    assert ((overlaps > 0).sum(axis=1) == truth["n_labels"]).all()
    # Every loud bird call lies in at least one tile that names it.
    loud = annotations[(annotations["kind"] == "bird") & (annotations["snr_db"] > 10)]
    assert len(loud) > 5
    for event in loud.itertuples():
        hit = tiles.index[(tiles["relpath"] == event.file) & (tiles["offset_s"] < event.end_s)
                          & (tiles["offset_s"] + 3.0 > event.start_s)]
        assert any(event.label in truth.loc[i, "labels"].split(";") for i in hit), event
    pairs = tile_event_overlaps(annotations, tiles, tile_s=3.0)
    assert ((pairs["start_s"] >= 0) & (pairs["end_s"] <= 3.0) & (pairs["start_s"] < pairs["end_s"])).all()
