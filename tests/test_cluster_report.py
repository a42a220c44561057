"""Cluster naming from tile statistics and the cluster figures."""

from __future__ import annotations

import numpy as np
import pandas as pd

from soundscape_ssl.report import cluster_report
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig


def test_describe_clusters_names_silence_noise_and_signal() -> None:
    index = pd.DataFrame({
        "rms_dbfs": [-75, -72, -40, -42, -45, -44],
        "spectral_flatness": [0.3, 0.3, 0.6, 0.55, 0.05, 0.1],
        "recorder": ["A", "B", "A", "A", "A", "B"],
    })
    labels = np.array([0, 0, 1, 1, 2, 2])
    table = cluster_report.describe_clusters(index, labels, near_silent_rms_dbfs=-60, noise_flatness=0.4)
    assert table["verdict"].tolist() == ["near-silent", "broadband noise", "signal"]
    assert table["n_tiles"].tolist() == [2, 2, 2]
    assert table.loc[1, "top_recorder_share"] == 1.0 and table.loc[2, "n_recorders"] == 2


def test_map_panels_legend_for_few_categories_colourbar_for_numbers() -> None:
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(50, 2))
    figure = cluster_report.plot_map_panels(coords, {
        "habitat": pd.Series(["canopy", "grassland"] * 25),
        "cluster": pd.Series(np.arange(50) % 30, dtype="category"),
        "level": pd.Series(np.linspace(-80, -20, 50)),
    }, "map")
    habitat_axes, cluster_axes, level_axes = figure.axes[:3]
    assert [t.get_text() for t in habitat_axes.get_legend().get_texts()] == ["canopy", "grassland"]
    assert cluster_axes.get_legend() is None  # 30 categories: no legend, and the title says why
    assert cluster_axes.get_title() == "cluster (30 of them: too many for a legend)"
    hours = cluster_report.plot_map_panels(coords, {"hour": pd.Series([12, 4, 21, 5, 0] * 10)}, "map")
    assert [t.get_text() for t in hours.axes[0].get_legend().get_texts()] == ["0", "4", "5", "12", "21"]
    assert len(figure.axes) == 4  # three panels + the level colour bar


def test_contingency_heatmap_and_gallery_draw() -> None:
    table = pd.DataFrame([[5, 0], [1, 4], [0, 3]], columns=["trill", "whistle"])
    figure = cluster_report.plot_contingency_heatmap(table, "clusters vs labels")
    image = figure.axes[0].images[0].get_array()
    assert np.allclose(image.sum(axis=1), 1.0)  # rows normalised
    tiles = [[np.zeros((128, 256))] * 2, [np.ones((128, 256))]]
    gallery = cluster_report.plot_cluster_gallery(tiles, ["c0", "c1"], SpectrogramConfig())
    assert len(gallery.axes) == 5   # 2 x 2 panels + the shared level colour bar
    gallery.canvas.draw()
    first, second, third = gallery.axes[0], gallery.axes[1], gallery.axes[2]
    assert first.get_ylabel() == "c0" and third.get_ylabel() == "c1"
    assert [t.get_text() for t in first.get_yticklabels()][:2] == ["0.5", "1"]   # kHz on the first column
    assert not any(t.get_text() for t in first.get_xticklabels())   # c1 is below it
    assert any(t.get_text() for t in second.get_xticklabels())      # nothing below: time labelled
