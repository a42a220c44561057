"""Fingerprints, separation and indices against clusters: known answers on small constructed tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from soundscape_ssl.analysis import fingerprints
from soundscape_ssl.analysis.compare import CompareConfig, SEPARATION_TASKS
from soundscape_ssl.analysis.metrics import KnnConfig
from soundscape_ssl.report import fingerprint_plots


def test_tile_times_give_hour_day_and_iso_week():
    index = pd.DataFrame({"timestamp": pd.to_datetime(["2024-05-24 05:59:59", "2024-12-30 23:00:00", None])})
    times = fingerprints.tile_times(index)
    assert times["hour"].tolist()[:2] == [5, 23] and pd.isna(times["hour"].iloc[2])
    assert times["day"].tolist()[:2] == ["2024-05-24", "2024-12-30"]
    assert times["week"].tolist()[:2] == ["2024-W21", "2025-W01"]     # ISO: 30 Dec 2024 is in week 1 of 2025


def test_cluster_groups_name_clusters_by_verdict_and_commonest_kind():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    table = pd.DataFrame({"cluster": [0, 1, 2], "verdict": ["signal", "near-silent", "broadband noise"]})
    kinds = ["bird", "bird", "insect", "background", "background", "rain"]
    groups, per_cluster = fingerprints.cluster_groups(clusters, table, kinds)
    assert groups.tolist() == ["signal: bird"] * 3 + ["near-silent: silence"] * 2 + ["broadband noise: rain"]
    assert per_cluster.set_index("cluster").loc[0, "kind_share"] == pytest.approx(2 / 3)
    plain, _ = fingerprints.cluster_groups(clusters, table)
    assert plain.tolist()[3] == "near-silent"


def test_activity_shares_and_diel_curves_count_tiles():
    keys = pd.DataFrame({"recorder": ["A", "A", "A", "B", "B", None], "hour": [5, 5, 6, 5, 5, 5]})
    shares = fingerprints.activity_shares(keys, ["x", "y", "x", "y", "y", "x"])
    assert shares.loc[("A", 5), "x"] == 0.5 and shares.loc[("A", 6), "x"] == 1.0
    assert shares.loc[("B", 5), "y"] == 1.0 and shares["n_tiles"].sum() == 5   # the row without a key is out
    curves = fingerprints.diel_curves([5, 5, 5, 6], ["signal: bird", "g2", "g2", "g2"], names=("bird", "rain"),
                                      group_kind={"signal: bird": "bird", "g2": "rain"})
    assert curves.loc[5, "bird"] == pytest.approx(1 / 3) and curves.loc[6, "rain"] == 1.0
    assert curves["n_tiles"].tolist() == [3, 1]


def _archive_index(n_recorders: int = 6, files_per_recorder: int = 8, tiles_per_file: int = 5) -> pd.DataFrame:
    rows = []
    for r in range(n_recorders):
        for f in range(files_per_recorder):
            start = pd.Timestamp("2024-05-24") + pd.Timedelta(days=7 * (f % 2), hours=6 + 12 * (f // 2 % 2))
            for t in range(tiles_per_file):
                rows.append({"recorder": f"R{r}", "habitat": "grass" if r < 3 else "canopy",
                             "relpath": f"R{r}/f{f}.wav", "timestamp": start + pd.Timedelta(seconds=3 * t)})
    return pd.DataFrame(rows)


def test_separation_table_reads_what_a_space_encodes_on_grouped_folds():
    index = _archive_index()
    rng = np.random.default_rng(0)
    hours = index["timestamp"].dt.hour.to_numpy()
    # A space that encodes the hour and nothing else, and a space of noise.
    hour_space = np.c_[(hours == 6) * 5.0, (hours == 18) * 5.0] + rng.normal(0, 0.1, (len(index), 2))
    noise = rng.normal(size=(len(index), 4))
    config = CompareConfig(knn_tasks=SEPARATION_TASKS, knn=KnnConfig(k=5, n_folds=3, n_bootstrap=100))
    table = fingerprints.separation_table({"hour_space": hour_space, "noise": noise}, index, config)
    by = table.set_index(["task", "space"])
    assert by.loc[("hour", "hour_space"), "accuracy"] == 1.0
    assert by.loc[("hour", "noise"), "accuracy"] < 0.75
    assert by.loc[("hour", "hour_space"), "grouping"] == "recorder"
    assert by.loc[("recorder", "noise"), "grouping"] == "file"
    assert by.loc[("week", "hour_space"), "majority_share"] == 0.5
    # Habitat by recorder: 6 recorders fill 3 folds; the hour space knows nothing of habitat.
    assert by.loc[("habitat", "hour_space"), "accuracy"] <= 0.75
    summary = fingerprints.separation_summary(table)
    assert summary.loc["hour", "hour_space"].startswith("1.00 [") and summary.loc["hour", "grouped by"] == "recorder"
    # One recorder: habitat and the recorder-grouped tasks cannot fill folds; a note says so, no exception.
    single = fingerprints.separation_table({"noise": noise[:40]}, index.iloc[:40], config).set_index("task")
    assert np.isnan(single.loc["hour", "accuracy"]) and "groups" in single.loc["hour", "note"]
    assert isinstance(fingerprint_plots.plot_separation(table, "t"), Figure)


def test_index_space_fills_gaps_and_drops_empty_or_constant_indices():
    table = pd.DataFrame({"a": [1.0, np.nan, 3.0], "b": [np.nan] * 3, "c": [2.0] * 3, "d": [1.0, 2.0, np.inf]})
    values, names = fingerprints.index_space(table, ["a", "b", "c", "d"])
    assert names == ["a", "d"]
    np.testing.assert_array_equal(values, [[1.0, 1.0], [2.0, 2.0], [3.0, 1.5]])


def test_index_effects_and_diel_tracking_find_the_planted_index():
    rng = np.random.default_rng(1)
    clusters = np.repeat([0, 1, 2], 40)
    hours = np.tile(np.arange(24), 5)
    informative = clusters * 10.0 + rng.normal(0, 1, clusters.size)          # ordered by cluster
    noise = rng.normal(0, 1, clusters.size)
    values = np.c_[informative, noise]
    effects = fingerprints.index_cluster_effects(values, ["informative", "noise"], clusters)
    assert effects["index"].tolist() == ["informative", "noise"]
    # perfectly ordered clusters of 40: (H - k + 1) / (n - k) = 0.887; noise: about 0
    assert effects.loc[0, "eta_squared"] > 0.85 and effects.loc[1, "eta_squared"] < 0.05
    assert effects.loc[0, "highest_cluster"] == 2 and effects.loc[0, "lowest_cluster"] == 0
    curve = pd.Series(np.sin(np.arange(24) / 24 * 2 * np.pi), index=np.arange(24))
    tracking_values = np.c_[np.sin(hours / 24 * 2 * np.pi) * 3 + 1, noise]
    tracking = fingerprints.index_diel_tracking(tracking_values, ["follows", "noise"], hours, curve)
    assert tracking.loc[0, "index"] == "follows" and tracking.loc[0, "spearman_rho"] == pytest.approx(1.0, abs=1e-3)
    assert tracking.loc[0, "n_hours"] == 24
    assert isinstance(fingerprint_plots.plot_index_effects(effects, "t"), Figure)
    profiles = fingerprints.index_diel_profiles(tracking_values, ["follows", "noise"], hours, ["follows", "absent"])
    assert list(profiles.columns) == ["follows", "n_tiles"] and profiles["n_tiles"].sum() == len(hours)
    assert profiles["follows"].mean() == pytest.approx(0.0) and profiles["follows"].std(ddof=0) == pytest.approx(1.0)
    assert profiles["follows"].idxmax() == 6                                 # sin peaks at a quarter day


def test_fingerprint_figures_draw_panels_and_curves():
    keys = pd.DataFrame({"recorder": ["A", "A", "B", "B"], "hour": [5, 6, 5, 6]})
    shares = fingerprints.activity_shares(keys, ["x", "y", "y", "y"])
    figure = fingerprint_plots.plot_activity_heatmaps(shares, "fingerprint")
    assert sum(axes.get_visible() for axes in figure.axes if axes.get_label() != "<colorbar>") == 2
    curves = fingerprints.diel_curves([5, 6], ["bird", "rain"], names=("bird", "rain"))
    assert isinstance(fingerprint_plots.plot_diel_curves(curves, "diel"), Figure)
    with pytest.raises(ValueError, match="two-level"):
        fingerprint_plots.plot_activity_heatmaps(pd.DataFrame(), "empty")


def test_rows_of_keeps_a_memory_map_when_every_row_has_indices(tmp_path) -> None:
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.save(tmp_path / "space.npy", values)
    mapped = np.load(tmp_path / "space.npy", mmap_mode="r")
    assert fingerprints.rows_of(mapped, np.arange(6)) is mapped          # no N x D copy
    picked = fingerprints.rows_of(mapped, np.array([0, 3, 5]))
    assert not isinstance(picked, np.memmap)
    np.testing.assert_array_equal(picked, values[[0, 3, 5]])
    np.testing.assert_array_equal(fingerprints.rows_of(mapped, np.array([5, 4, 3, 2, 1, 0])), values[::-1])
