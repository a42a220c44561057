"""Collection statistics on a small hand-made inventory whose numbers are known by hand."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundscape_ssl.report import collection_stats as stats
from soundscape_ssl.recordings.archive import scan_archive

H = 1.0 / 60.0  # one minute in hours


@pytest.fixture()
def files() -> pd.DataFrame:
    """Four recorders; recording times chosen to cross midnight and hour boundaries.

    A (grassland): 23:30 + 60 min (0.5 h on the 24th, 0.5 h on the 25th, hours 23 and 0),
                   06:00 + 30 min on the 25th.
    B (canopy):    06:15 + 10 min on the 24th; 05:50 + 20 min on the 26th (10 min in hour 5,
                   10 min in hour 6).
    C (canopy):    2 h without a start time (name had none).
    D (no habitat): 12:00 + 1 min on the 25th.
    """
    rows = [
        ("A", "grassland", "A/a1.wav", "2021-05-24 23:30:00", 3600.0, 44100, 16, 1_000_000_000),
        ("A", "grassland", "A/a2.wav", "2021-05-25 06:00:00", 1800.0, 44100, 16, 500_000_000),
        ("B", "canopy", "B/b1.wav", "2021-05-24 06:15:00", 600.0, 22000, 16, 100_000_000),
        ("B", "canopy", "B/b2.wav", "2021-05-26 05:50:00", 1200.0, 22000, 24, 200_000_000),
        ("C", "canopy", "C/c1.wav", None, 7200.0, 48000, 16, 300_000_000),
        ("D", None, "D/d1.wav", "2021-05-25 12:00:00", 60.0, 44100, None, 5_000_000),
    ]
    frame = pd.DataFrame(rows, columns=["recorder", "habitat", "relpath", "start_time",
                                        "duration_s", "sample_rate_hz", "bit_depth", "bytes"])
    frame["start_time"] = pd.to_datetime(frame["start_time"]).astype("datetime64[ns]")
    frame["bit_depth"] = frame["bit_depth"].astype("Int64")
    frame["path"] = "/archive/" + frame["relpath"]
    return frame


def test_collection_summary(files):
    summary = stats.collection_summary(files).set_index("habitat")
    assert list(summary.index) == ["canopy", "grassland", "unassigned", "all"]
    assert summary["n_recorders"].to_dict() == {
        "canopy": 2, "grassland": 1, "unassigned": 1, "all": 4}
    assert summary["n_files"].to_dict() == {"canopy": 3, "grassland": 2, "unassigned": 1, "all": 6}
    assert summary.loc["grassland", "total_hours"] == pytest.approx(1.5)
    assert summary.loc["canopy", "total_hours"] == pytest.approx(2.5)  # incl. C's untimed 2 h
    assert summary.loc["all", "total_hours"] == pytest.approx(4.0 + H)
    assert summary.loc["all", "total_gb"] == pytest.approx(2.105)
    assert summary.loc["canopy", "first_start"] == pd.Timestamp("2021-05-24 06:15:00")
    assert summary.loc["canopy", "last_end"] == pd.Timestamp("2021-05-26 06:10:00")
    assert summary.loc["all", "first_start"] == pd.Timestamp("2021-05-24 06:15:00")
    assert summary.loc["grassland", "last_end"] == pd.Timestamp("2021-05-25 06:30:00")
    assert summary["n_days"].to_dict() == {"canopy": 2, "grassland": 2, "unassigned": 1, "all": 3}
    assert summary.loc["canopy", "n_files_without_time"] == 1
    assert summary.loc["all", "sample_rates_hz"] == "22000, 44100, 48000"
    assert summary.loc["canopy", "bit_depths"] == "16, 24"
    assert summary.loc["unassigned", "bit_depths"] == ""


def test_quarantine_summary():
    quarantine = pd.DataFrame({
        "path": ["/a/x.wav", "/a/y.wav", "/a/z.flac"],
        "relpath": ["x.wav", "y.wav", "z.flac"],
        "bytes": [0, 4_000_000_000, 12],
        "reason": ["empty_file", "truncated", "truncated"],
        "detail": ["0 bytes", "cut", "cut"],
    })
    table = stats.quarantine_summary(quarantine)
    assert list(table["reason"]) == ["truncated", "empty_file"]
    assert list(table["n_files"]) == [2, 1]
    assert table.loc[0, "total_gb"] == pytest.approx(4.000000012)
    assert table.loc[0, "example_relpath"] == "x.wav" or table.loc[0, "example_relpath"] == "y.wav"
    assert "more audio than the file holds" in table.loc[0, "meaning"]
    empty = stats.quarantine_summary(quarantine.iloc[:0])
    assert empty.empty and list(empty.columns) == list(table.columns)


def test_coverage_matrix_splits_at_midnight(files):
    coverage = stats.coverage_matrix(files)
    assert list(coverage.index) == ["B", "A", "D"]  # canopy, grassland, unassigned; C untimed
    assert list(coverage.columns) == list(pd.date_range("2021-05-24", "2021-05-26", freq="D"))
    expected = np.array([
        [10 * H, 0.0, 20 * H],   # B
        [0.5, 1.0, 0.0],         # A: 23:30-00:30 split across two days, plus 30 min on the 25th
        [0.0, H, 0.0],           # D
    ])
    np.testing.assert_allclose(coverage.to_numpy(), expected)
    timed_hours = files.loc[files["start_time"].notna(), "duration_s"].sum() / 3600.0
    assert coverage.to_numpy().sum() == pytest.approx(timed_hours)


def test_hours_by_hour_of_day_splits_at_hour_boundaries(files):
    by_habitat = stats.hours_by_hour_of_day(files)
    assert list(by_habitat.columns) == ["canopy", "grassland", "unassigned"]
    assert list(by_habitat.index) == list(range(24))
    expected = pd.DataFrame(0.0, index=range(24), columns=by_habitat.columns)
    expected.loc[23, "grassland"] = 0.5
    expected.loc[0, "grassland"] = 0.5
    expected.loc[6, "grassland"] = 0.5
    expected.loc[6, "canopy"] = 10 * H + 10 * H  # 06:15-06:25 and 06:00-06:10
    expected.loc[5, "canopy"] = 10 * H  # 05:50-06:00
    expected.loc[12, "unassigned"] = H
    np.testing.assert_allclose(by_habitat.to_numpy(), expected.to_numpy(), atol=1e-12)

    overall = stats.hours_by_hour_of_day(files, by=None)
    assert list(overall.columns) == ["all"]
    np.testing.assert_allclose(overall["all"].to_numpy(), by_habitat.sum(axis=1).to_numpy())
    with pytest.raises(ValueError):
        stats.hours_by_hour_of_day(files, by="recorder")


def test_recording_spanning_many_bins_and_ending_on_a_boundary():
    files = pd.DataFrame({
        "recorder": ["X", "X"], "habitat": ["wetland", "wetland"],
        "start_time": pd.to_datetime(["2021-06-01 22:00:00", "2021-06-04 23:00:00"]).astype(
            "datetime64[ns]"),
        # 22:00 on the 1st to 00:00 on the 3rd (ends exactly at midnight); 23:00 -> 00:00
        "duration_s": [26 * 3600.0, 3600.0],
    })
    coverage = stats.coverage_matrix(files)
    # The 3rd gets nothing: an end exactly on midnight does not reach into the next day.
    np.testing.assert_allclose(coverage.loc["X"].to_numpy(), [2.0, 24.0, 0.0, 1.0])
    hours = stats.hours_by_hour_of_day(files)["wetland"]
    assert hours[22] == pytest.approx(2.0) and hours[23] == pytest.approx(3.0)
    assert hours.drop([22, 23]).to_numpy() == pytest.approx(np.ones(22))


def test_hours_per_recorder(files):
    table = stats.hours_per_recorder(files)
    assert list(table["recorder"]) == ["B", "C", "A", "D"]
    assert list(table["habitat"]) == ["canopy", "canopy", "grassland", "unassigned"]
    assert list(table["n_files"]) == [2, 1, 2, 1]
    np.testing.assert_allclose(table["hours"], [0.5, 2.0, 1.5, H])
    np.testing.assert_allclose(table["gb"], [0.3, 0.3, 1.5, 0.005])


def test_figures_and_save_figure(files, tmp_path):
    per_recorder = stats.hours_per_recorder(files)
    coverage_figure = stats.plot_coverage_heatmap(
        stats.coverage_matrix(files), per_recorder.set_index("recorder")["habitat"])
    axes = coverage_figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == [
        "B (canopy)", "A (grassland)", "D (unassigned)"]
    assert axes.images[0].get_array().shape == (3, 3)
    assert axes.images[0].get_clim() == (0.0, 1.0)  # A's busiest day

    hour_figure = stats.plot_hours_by_hour_of_day(stats.hours_by_hour_of_day(files))
    assert len(hour_figure.axes[0].patches) == 24 * 3  # one bar per hour per habitat

    recorder_figure = stats.plot_hours_per_recorder(per_recorder)
    bars = recorder_figure.axes[0].patches
    assert len(bars) == 4
    np.testing.assert_allclose([bar.get_height() for bar in bars], per_recorder["hours"])
    assert bars[0].get_facecolor() == bars[1].get_facecolor()  # both canopy
    assert bars[0].get_facecolor() != bars[2].get_facecolor()
    legend = [t.get_text() for t in recorder_figure.axes[0].get_legend().get_texts()]
    assert legend == ["canopy", "grassland", "unassigned"]

    png, pdf = stats.save_figure(recorder_figure, tmp_path / "figures", "hours_per_recorder")
    assert png == tmp_path / "figures" / "hours_per_recorder.png"
    assert pdf.read_bytes().startswith(b"%PDF")
    height_px, width_px = matplotlib.image.imread(png).shape[:2]
    width_in, height_in = recorder_figure.get_size_inches()
    assert (width_px, height_px) == (round(width_in * 150), round(height_in * 150))


def test_statistics_of_a_scanned_inventory(tmp_path):
    """The functions accept scan_archive's real dtypes (string columns, NA habitat, Int64)."""
    for recorder, stamp in (("S4A00001", "20210524_235500"), ("S4A00002", "20210525_060000")):
        (tmp_path / recorder).mkdir()
        sf.write(tmp_path / recorder / f"{recorder}_{stamp}.wav", np.zeros(8000 * 600), 8000)
    (tmp_path / "S4A00002" / "untimed.wav").write_bytes(
        (tmp_path / "S4A00002" / "S4A00002_20210525_060000.wav").read_bytes())
    (tmp_path / "sites.csv").write_text("recorder,habitat,lat,lon\nS4A00001,grassland,1,2\n")
    files = scan_archive(tmp_path, show_progress=False).files
    summary = stats.collection_summary(files).set_index("habitat")
    assert summary.loc["all", "n_files"] == 3
    assert summary.loc["all", "total_hours"] == pytest.approx(0.5)
    assert summary.loc["unassigned", "n_files_without_time"] == 1
    coverage = stats.coverage_matrix(files)
    np.testing.assert_allclose(coverage.to_numpy(), [[5 / 60, 5 / 60], [0.0, 10 / 60]])
    assert stats.hours_by_hour_of_day(files).to_numpy().sum() == pytest.approx(20 / 60)


def test_planted_event_counts_by_label_and_habitat():
    annotations = pd.DataFrame({
        "kind": ["bird", "bird", "bird", "rain", "bird"],
        "label": ["trill", "trill", "whistle", "rain", "trill"],
        "habitat": ["canopy", "grassland", "canopy", "canopy", "canopy"],
    })
    counts = stats.planted_event_counts(annotations)
    assert list(counts.index) == [("bird", "trill"), ("bird", "whistle"), ("rain", "rain")]
    assert counts.loc[("bird", "trill"), "canopy"] == 2
    assert counts.loc[("bird", "trill"), "grassland"] == 1
    assert counts["total"].tolist() == [3, 1, 1]
    figure = stats.plot_planted_events(counts)
    assert len(figure.axes[0].patches) == 2 * 3  # one bar per habitat and label
